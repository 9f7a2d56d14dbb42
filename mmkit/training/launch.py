"""``mmkit train --num-procs N``: data-parallel training in N processes on this machine.

The parent writes the resolved configuration to ``OUTPUT_DIR/launch_config.yaml`` and starts N
workers (``python -m mmkit.training.launch CONFIG``) with the environment torch.distributed reads
(``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``). It waits for them;
when one fails it gives the others a moment to report their own errors, stops them, and exits with
the failed worker's status and a message naming it. Workers die with the parent (Linux), so a
killed launcher leaves no orphans.

Several machines: use DeepSpeed's launcher with a hostfile, which sets the same variables, e.g.
``deepspeed --hostfile hosts --no_local_rank $(which mmkit) train ...`` (see README).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

LAUNCHED_ENV = "MMKIT_LAUNCHED"
#: How long the other workers may take to report their own errors once one has failed.
GRACE_S = 10.0


def launched_externally() -> bool:
    """Whether this process is already one worker of a group (our launcher, deepspeed, torchrun)."""
    return LAUNCHED_ENV in os.environ or "WORLD_SIZE" in os.environ


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


def launch(config: Any, *, console: Any = None, env: dict[str, str] | None = None, poll_s: float = 0.2) -> int:
    """Run ``config`` (a :class:`~mmkit.training.config.TrainConfig`) in ``config.num_procs``
    processes; returns the exit status (0 when every worker succeeded)."""
    from mmkit.training.config import save_config
    from mmkit.training.distributed import free_port

    n = config.num_procs
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    config_path = out / "launch_config.yaml"
    save_config(config, config_path)
    port = free_port()
    base = {**os.environ, **(env or {})}
    procs: list[subprocess.Popen] = []
    for rank in range(n):
        worker_env = {**base, LAUNCHED_ENV: "1", "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(n),
                      "LOCAL_WORLD_SIZE": str(n), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, "-m", "mmkit.training.launch", str(config_path)],
                                      env=worker_env, preexec_fn=_die_with_parent))

    def forward(signum: int, _frame: Any) -> None:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    stopped: list[int] = []
    try:
        failed: tuple[int, int] | None = None
        deadline = None
        while True:
            codes = [proc.poll() for proc in procs]
            bad = [(r, c) for r, c in enumerate(codes) if c not in (None, 0)]
            if failed is None and bad:
                # the root cause: a process killed by a signal if any, else the first to fail
                failed = min(bad, key=lambda rc: (rc[1] >= 0, rc[0]))
                deadline = time.monotonic() + GRACE_S
            if all(c is not None for c in codes):
                break
            if deadline is not None and time.monotonic() > deadline:
                stopped = _stop(procs)
                break
            time.sleep(poll_s)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if failed is None:
        return 0
    rank, code = failed
    others = [f"process {r} {'stopped' if r in stopped else _describe(p.returncode)}"
              for r, p in enumerate(procs) if r != rank and p.returncode != 0]
    message = (f"training process {rank} of {n} failed ({_describe(code)})"
               + (f"; {', '.join(others)}" if others else "")
               + f". Checkpoints (if any) are in {out / 'checkpoints'}: rerun the same command to resume.")
    if console is not None:
        console.print(f"[red]error:[/] {message}")
    else:
        print(f"error: {message}", file=sys.stderr)
    return code if code > 0 else 128 - code


def _stop(procs: list[subprocess.Popen]) -> list[int]:
    """Terminate (then kill) the processes still running; returns their ranks."""
    running = [r for r, proc in enumerate(procs) if proc.poll() is None]
    for r in running:
        procs[r].terminate()
    end = time.monotonic() + 5
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return running


def worker_main(argv: list[str] | None = None) -> None:
    """One worker: train the configuration file given on the command line."""
    from mmkit.errors import MmkitError

    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m mmkit.training.launch CONFIG.yaml", file=sys.stderr)
        sys.exit(2)
    try:
        from mmkit.training.config import resolve_config
        from mmkit.training.recipe import train

        train(resolve_config(argv[0], {}))
    except MmkitError as exc:
        rank = os.environ.get("RANK", "0")
        print(f"error (process {rank}): {exc}", file=sys.stderr, flush=True)
        sys.stderr.flush()
        os._exit(1)  # skip interpreter teardown: a broken process group can block it
    sys.stdout.flush()
    sys.stderr.flush()


if __name__ == "__main__":
    worker_main()
