"""``mmkit train --num-procs N``: data-parallel training in N processes on this machine, started by
torch's elastic launcher (what ``torchrun`` runs), not by a process manager of our own.

The parent writes the resolved configuration to ``OUTPUT_DIR/launch_config.yaml`` and runs exactly
``torchrun --standalone --nproc-per-node N --max-restarts 0 --log-dir OUTPUT_DIR/logs --tee 3 -m
mmkit.training.launch OUTPUT_DIR/launch_config.yaml``, in-process (torch's own argument parser
and ``elastic_launch``), so the workers get torchrun's environment (``RANK``, ``LOCAL_RANK``,
``WORLD_SIZE``, ``MASTER_ADDR``/``PORT``, ``TORCHELASTIC_*``) and thread limit
(``OMP_NUM_THREADS``: here ``cores // N``, where torchrun's default is 1; an existing value wins).

Each rank's output is shown with a ``[rankK]:`` prefix and kept in
``OUTPUT_DIR/logs/<run id>/attempt_0/K/{stdout,stderr}.log`` (torchrun's layout). When a worker
fails, the launcher stops the others and exits with that worker's status and a message naming it
and its log. Workers die with the launcher (Linux), so a killed launcher leaves no orphans.

Several machines: the same launcher with a rendezvous (see :data:`MULTI_NODE`).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import uuid
from pathlib import Path
from typing import Any

#: Set in the workers this launcher starts.
LAUNCHED_ENV = "MMKIT_LAUNCHED"
#: How long a worker asked to stop (SIGTERM, when another worker failed) may take to report its own error.
GRACE_S = 10.0

MULTI_NODE = """\
On every one of NODES machines (same code, data paths and options; MASTER = the first machine's
address; run.yaml holds the `mmkit train` options, or give them as flags):

  torchrun --nnodes NODES --nproc-per-node GPUS_PER_NODE \\
      --rdzv-backend c10d --rdzv-endpoint MASTER:29500 --rdzv-id RUN_NAME \\
      --log-dir OUTPUT_DIR/logs --tee 3 \\
      -m mmkit_cli train --config run.yaml

Or from the first machine with DeepSpeed's launcher and a hostfile ("HOST slots=GPUS" per line):

  deepspeed --hostfile hostfile --no_local_rank --module mmkit_cli train --config run.yaml

The process count comes from the launcher (--num-procs is then ignored).
"""


def launched_externally() -> bool:
    """Whether this process is already one worker of a group (our launcher, deepspeed, torchrun)."""
    return LAUNCHED_ENV in os.environ or "WORLD_SIZE" in os.environ


def thread_limit(num_procs: int) -> int:
    """OpenMP threads per worker: the cores this process may use, shared out between the workers."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, num_procs))


def torchrun_args(num_procs: int, config_path: Path, log_dir: Path) -> list[str]:
    """The torchrun command line (without the program name) that runs ``config_path``."""
    return ["--standalone", "--nproc-per-node", str(num_procs), "--max-restarts", "0", "--log-dir", str(log_dir),
            "--tee", "3", "-m", "mmkit.training.launch", str(config_path)]


def launch(config: Any, *, env: dict[str, str] | None = None) -> int:
    """Run ``config`` (a :class:`~mmkit.training.config.TrainConfig`) in ``config.num_procs``
    processes; returns the exit status (0 when every worker succeeded)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch
    from torch.distributed.run import config_from_args, get_args_parser

    from mmkit.training.config import save_config

    n = config.num_procs
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    config_path = out / "launch_config.yaml"
    save_config(config, config_path)
    args = get_args_parser().parse_args(torchrun_args(n, config_path, out / "logs"))
    # what torchrun's --standalone does before building the launch configuration
    args.rdzv_backend, args.rdzv_endpoint, args.rdzv_id = "c10d", "localhost:0", str(uuid.uuid4())

    saved_env = dict(os.environ)
    os.environ.update(env or {})
    os.environ[LAUNCHED_ENV] = "1"
    os.environ.setdefault("OMP_NUM_THREADS", str(thread_limit(n)))
    try:
        launch_config, entrypoint, cmd_args = config_from_args(args)
        launch_config.log_line_prefix_template = "[rank${rank}]:"  # string.Template
        _quiet_agent_logs()
        elastic_launch(launch_config, entrypoint)(*cmd_args)
        return 0
    except ChildFailedError as exc:
        return _report_failure(exc, n, out)
    finally:
        os.environ.clear()
        os.environ.update(saved_env)


def _quiet_agent_logs() -> None:
    """torchelastic logs its rendezvous and worker bookkeeping at INFO/WARNING; mmkit reports
    failures itself (:func:`_report_failure`)."""
    import logging

    for name in ("torch.distributed.elastic", "torch.distributed.launcher"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _describe(exitcode: int) -> str:
    if exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit status {exitcode}"


def _describe_peer(exitcode: int) -> str:
    # The launcher stops the surviving processes with SIGTERM once one has failed: that is not a fault
    # of theirs (a Python worker reports it as -15 or, through its handler, as 128 + 15).
    if exitcode in (-signal.SIGTERM, 128 + signal.SIGTERM):
        return "stopped"
    return _describe(exitcode)


def _report_failure(exc: Any, n: int, out: Path) -> int:
    """Name the rank that failed first (the root cause), its log, and how the others ended."""
    # the root cause: a process killed by a signal if any (its peers then fail in their collectives,
    # possibly within the same poll of the launcher), else the first to fail
    rank, failure = min(exc.failures.items(), key=lambda rf: (rf[1].exitcode >= 0, rf[1].timestamp, rf[0]))
    others = [f"process {r} {_describe_peer(f.exitcode)}" for r, f in sorted(exc.failures.items()) if r != rank]
    log = _rank_log(out / "logs", rank)
    message = (f"training process {rank} of {n} failed ({_describe(failure.exitcode)})"
               + (f"; {', '.join(others)}" if others else "; the other processes were stopped")
               + (f". Its output: {log}" if log else "")
               + f". Checkpoints (if any) are in {out / 'checkpoints'}: rerun the same command to resume.")
    print(f"error: {message}", file=sys.stderr, flush=True)  # the CLI's error format (the launcher has no log setup)
    code = failure.exitcode
    return code if code > 0 else 128 - code


def _rank_log(log_dir: Path, rank: int) -> str | None:
    """The failed rank's stderr log: torchrun's layout, ``LOG_DIR/<run id>/attempt_K/<rank>/``, newest run."""
    logs = sorted(log_dir.glob(f"*/attempt_*/{rank}/stderr.log"), key=lambda p: p.stat().st_mtime)
    return str(logs[-1]) if logs else None


# -- the worker -----------------------------------------------------------------------------------
def _die_with_parent() -> None:
    """torch starts each worker in its own session, so a SIGKILLed launcher's process group does
    not reach it: ask the kernel to kill this worker when the launcher dies (Linux)."""
    try:
        import ctypes

        parent = os.getppid()
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the launcher died before the request took effect
            os._exit(1)
    except (OSError, AttributeError):
        pass


def _grace_on_sigterm() -> None:
    """When another worker fails, the launcher stops this one with SIGTERM. A worker blocked in a
    collective with a dead peer is about to fail with its own error (which names the step and the
    intact checkpoint): let it report that, and exit at the latest :data:`GRACE_S` seconds later."""
    def handler(signum: int, _frame: Any) -> None:
        timer = threading.Timer(GRACE_S, lambda: os._exit(128 + signum))
        timer.daemon = True
        timer.start()

    signal.signal(signal.SIGTERM, handler)


def worker_main(argv: list[str] | None = None) -> None:
    """One worker: train the configuration file given on the command line."""
    from mmkit.errors import MmkitError

    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m mmkit.training.launch CONFIG.yaml", file=sys.stderr)
        sys.exit(2)
    if os.environ.get(LAUNCHED_ENV) or "TORCHELASTIC_RUN_ID" in os.environ:  # started by torch's launcher
        _die_with_parent()
        _grace_on_sigterm()
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
