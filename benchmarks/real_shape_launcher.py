"""``mmkit train --num-procs 2`` against the same run under plain ``torchrun``, interleaved.

    python benchmarks/real_shape_launcher.py [--rounds 2] [--steps 30]

Each round runs A (``mmkit train --num-procs 2``: mmkit starts torch's elastic launcher itself)
then B (``torchrun --standalone --nproc-per-node 2 -m mmkit_cli train ...``) on the tiny image +
point-cloud run of ``drill.py``, with torch's default thread count (no ``num_threads``) and no
``OMP_NUM_THREADS`` inherited, so each launcher sets its own thread limit. Interleaving (A B A B)
spreads the load of a shared machine over both. Prints every run's tokens/s (the run's own figure
over its training steps), the medians and their ratio.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "support"))  # the drill kit the tests use
    import drill

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args(argv)
    root = args.workdir or Path(tempfile.mkdtemp(prefix="mmkit_launcher_"))
    run = drill.write_tiny_run(root / "tiny", samples=32)
    env = drill.child_env()
    env.pop("OMP_NUM_THREADS", None)  # each launcher sets its own
    options = {"max_steps": args.steps, "global_batch_size": 8, "num_threads": "auto", "save_every": 0,
               "log_every": 10, "resume": "never"}
    rates: dict[str, list[float]] = {"mmkit --num-procs 2": [], "torchrun": []}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "mmkit_cli"]
    for r in range(args.rounds):
        for name in rates:
            out = root / f"{name.split()[0]}_{r}"
            cmd = drill.train_command(run, out, num_procs=2, **options)
            if name == "torchrun":  # the same mmkit train arguments, started by torchrun
                cmd = torchrun + cmd[cmd.index("train"):]
            t0 = time.monotonic()
            result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
            wall = time.monotonic() - t0
            if result.returncode != 0:
                print(result.stdout[-3000:], result.stderr[-3000:], file=sys.stderr)
                return 1
            rate = float(re.findall(r"([\d.]+) tokens/s", result.stdout + result.stderr)[-1])
            rates[name].append(rate)
            print(f"round {r + 1} {name:20s} {rate:8.0f} tokens/s  (wall {wall:.0f}s)", flush=True)
    a, b = (statistics.median(v) for v in rates.values())
    print(f"median: mmkit --num-procs 2 {a:.0f} tokens/s, torchrun {b:.0f} tokens/s, ratio {a / b:.3f}")
    print(f"OMP_NUM_THREADS set by mmkit: {max(1, len(os.sched_getaffinity(0)) // 2)} (cores // 2); torchrun: 1")
    return 0


if __name__ == "__main__":
    sys.exit(main())
