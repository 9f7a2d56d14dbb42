"""A lone process picks its own rendezvous port; another process can take that port before the store
binds it (many runs at once on one machine), which must not fail the run."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import os, socket
from unittest import mock
import mmkit.training.distributed as D
busy = socket.socket(); busy.bind(("127.0.0.1", 0)); busy.listen()
taken = busy.getsockname()[1]
picks = iter([taken])
real = D.free_port
os.environ.pop("MASTER_PORT", None)
with mock.patch.object(D, "free_port", side_effect=lambda: next(picks, None) or real()):
    print(D.init_distributed())
print("port", os.environ["MASTER_PORT"], "taken", taken)
"""


def test_a_lone_process_retries_when_its_chosen_port_was_taken() -> None:
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(0, 1)" in result.stdout
    port, taken = result.stdout.split("port ")[-1].split(" taken ")
    assert int(port) != int(taken)


def test_a_port_given_by_a_launcher_is_never_changed() -> None:
    script = SCRIPT.replace('os.environ.pop("MASTER_PORT", None)', 'os.environ["MASTER_PORT"] = str(taken)')
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "DistNetworkError" in result.stderr
    # a clear error naming the port and what to do, not torch's raw exception
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("mmkit.errors.ConfigError: cannot open the process group") and "unset MASTER_PORT" in error
    assert "MASTER_ADDR=127.0.0.1 MASTER_PORT=" in error and "address already in use" in error
