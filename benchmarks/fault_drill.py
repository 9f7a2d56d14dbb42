"""Fault drill: SIGKILL a training run at N random steps, resume it each time, and compare the final
trainable weights with an uninterrupted run of the same seed.

    python benchmarks/fault_drill.py --kills 3 --seed 1
    python benchmarks/fault_drill.py --kills 2 --num-procs 2 --zero-stage 3
    python benchmarks/fault_drill.py --kills 0 --full-disk

``--full-disk`` also fills the storage for real in each writer of a save (mmkit's safetensors, DeepSpeed's
torch.save, the metrics log: ``MMKIT_FAULT=full_in_*``, a file-size limit of zero for that write), checks
that the run stops with a storage error and keeps the previous checkpoint, then resumes it to the end and
compares with the uninterrupted run.

Each kill lands at a random moment after a random step has been logged (so also in the middle of
a checkpoint save); the run is then restarted with the same command, which resumes from the newest
complete checkpoint. Prints the largest absolute weight difference and the largest loss
difference; exits 1 when the weights differ by more than --tolerance.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "support"))  # the drill kit the tests use
    import drill

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=3, help="how many times to SIGKILL the run")
    parser.add_argument("--seed", type=int, default=0, help="picks the kill steps and delays")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps of the run")
    parser.add_argument("--save-every", type=int, default=2)
    parser.add_argument("--num-procs", type=int, default=1)
    parser.add_argument("--zero-stage", type=int, default=0)
    parser.add_argument("--tolerance", type=float, default=1e-6)
    parser.add_argument("--workdir", type=Path, default=None, help="keep the runs here (default: a temporary dir)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds allowed per run")
    parser.add_argument("--full-disk", action="store_true", help="also drill a full disk in each writer")
    args = parser.parse_args(argv)
    if args.kills >= args.steps:
        parser.error("--kills must be smaller than --steps")

    work = args.workdir or Path(tempfile.mkdtemp(prefix="mmkit-fault-drill-"))
    work.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    tiny = drill.write_tiny_run(work / "data")
    options = {"max_steps": args.steps, "save_every": args.save_every, "num_procs": args.num_procs,
               "zero_stage": args.zero_stage, "global_batch_size": 4, "keep_last": 2}

    reference, drilled = work / "uninterrupted", work / "drilled"
    for d in (reference, drilled):
        shutil.rmtree(d, ignore_errors=True)
    start = time.perf_counter()
    done = drill.run(drill.train_command(tiny, reference, **options), timeout=args.timeout)
    if done.returncode != 0:
        print(done.stdout[-3000:], file=sys.stderr)
        return 2
    print(f"uninterrupted run: {args.steps} steps in {time.perf_counter() - start:.1f}s")

    worst = 0.0
    if args.full_disk:
        worst = full_disk_drill(drill, tiny, work, reference, options, args)
        if worst < 0:
            return 1

    cmd = drill.train_command(tiny, drilled, **options)
    kill_steps = sorted(rng.sample(range(1, args.steps), args.kills))
    for i, step in enumerate(kill_steps, 1):
        delay = rng.uniform(0.0, 0.2)
        reached = drill.kill_at_step(cmd, drilled, step, delay_s=delay, timeout=args.timeout)
        kept = sorted(p.name for p in (drilled / "checkpoints").glob("step-*"))
        print(f"kill {i}: SIGKILL {delay:.2f}s after step {step} was logged (last logged {reached}); "
              f"complete checkpoints: {', '.join(kept) or 'none'}")
    start = time.perf_counter()
    done = drill.run(cmd, timeout=args.timeout)
    if done.returncode != 0:
        print(done.stdout[-3000:], file=sys.stderr)
        return 2
    print(f"final resume finished in {time.perf_counter() - start:.1f}s")

    diff = drill.max_weight_diff(reference, drilled)
    ref_loss, drill_loss = drill.logged_losses(reference), drill.logged_losses(drilled)
    loss_diff = max(abs(ref_loss[s] - drill_loss[s]) for s in ref_loss)
    print(f"kills: {args.kills} at steps {kill_steps}; processes {args.num_procs}, ZeRO stage {args.zero_stage}")
    print(f"largest trainable-weight difference: {diff:.3e} (tolerance {args.tolerance:g})")
    print(f"largest logged-loss difference:      {loss_diff:.3e}")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if max(diff, worst) <= args.tolerance else 1


FULL_DISK_KINDS = {"full_in_save": "mmkit's model files (safetensors)",
                   "full_in_engine_save": "DeepSpeed's optimizer files (torch.save)",
                   "full_in_log": "the metrics log (JSONL, TensorBoard)"}


def full_disk_drill(drill, tiny, work: Path, reference: Path, options: dict, args) -> float:
    """Each writer fills the disk once at the second save; returns the largest weight difference
    after resuming (-1 when a run did not fail as it should)."""
    from mmkit.training.checkpoint import list_checkpoints, verify

    at = 2 * args.save_every
    worst = 0.0
    for kind, writer in FULL_DISK_KINDS.items():
        out = work / kind
        shutil.rmtree(out, ignore_errors=True)
        cmd = drill.train_command(tiny, out, **options)
        failed = drill.run(cmd, timeout=args.timeout, env=drill.child_env({"MMKIT_FAULT": f"{kind}@{at}"}))
        text = " ".join(failed.stdout.split())
        kept = [p.name for p in list_checkpoints(out)]
        message = next((line for line in failed.stdout.splitlines() if line.startswith("error")), "")
        ok = (failed.returncode == 1 and "Traceback" not in text and "free space and rerun" in text
              and kept and all(verify(p, 0) is None for p in list_checkpoints(out)))
        print(f"full disk in {writer} at step {at}: exit {failed.returncode}; kept {', '.join(kept) or 'nothing'}; "
              f"{' '.join(message.split())[:400]}")
        if not ok:
            print(failed.stdout[-3000:], file=sys.stderr)
            return -1.0
        done = drill.run(cmd, timeout=args.timeout)  # space freed: the same command resumes
        if done.returncode != 0:
            print(done.stdout[-3000:], file=sys.stderr)
            return -1.0
        diff = drill.max_weight_diff(reference, out)
        worst = max(worst, diff)
        print(f"  resumed to step {args.steps}: largest trainable-weight difference {diff:.3e}")
    return worst


if __name__ == "__main__":
    sys.exit(main())
