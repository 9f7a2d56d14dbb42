"""`mmkit --help` start-up time (target: under a second). Reported by pytest-benchmark; the
functional guard is tests/test_cli_plugins.py::test_cli_start_up_imports_no_torch."""

import subprocess
import sys


def test_help_startup(benchmark):
    def run():
        return subprocess.run([sys.executable, "-m", "mmkit_cli", "--help"], capture_output=True, text=True)

    result = benchmark.pedantic(run, rounds=3, iterations=1)
    assert result.returncode == 0 and "plugins" in result.stdout
