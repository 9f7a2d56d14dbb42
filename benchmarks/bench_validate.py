"""`mmkit data validate` on 100k synthetic records with small files: wall-clock time.

    python benchmarks/bench_validate.py [--records 100000] [--root /tmp/mmkit_bench_validate] [--workers N]

The data (60% image records with a distinct 16x16 PNG each, 20% point-cloud records with a distinct
128 x 3 .npy each, 20% text-only, 1% of the records broken in assorted ways) is written once under
--root and reused. Reports the time of the real command (a subprocess, start-up included), with
every file decoded. Reported, not asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def make_data(root: Path, n: int, seed: int = 0) -> Path:
    import numpy as np
    from PIL import Image

    data = root / f"train_{n}.jsonl"
    if data.is_file():
        return data
    rng = np.random.default_rng(seed)
    (root / "img").mkdir(parents=True, exist_ok=True)
    (root / "pcl").mkdir(parents=True, exist_ok=True)
    questions = ["What is shown?", "Describe the input in detail, please.", "Which object is this? Answer briefly."]
    tmp = data.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for i in range(n):
            q = questions[i % len(questions)]
            kind = i % 5
            rec: dict = {"id": f"r{i}"}
            if kind < 3:
                rel = f"img/{i:06d}.png"
                Image.fromarray(rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)).save(root / rel)
                rec["image"] = rel
                q = "<image>\n" + q
            elif kind == 3:
                rel = f"pcl/{i:06d}.npy"
                np.save(root / rel, rng.normal(size=(128, 3)).astype(np.float32))
                rec["pointcloud"] = rel
                q = "<pointcloud>\n" + q
            rec["conversations"] = [{"from": "human", "value": q}, {"from": "gpt", "value": f"answer {i}"}]
            if i % 100 == 7:  # 1% broken: a missing file, a missing placeholder, an empty turn
                j = (i // 100) % 3
                if j == 0 and "image" in rec:
                    rec["image"] = f"img/missing-{i}.png"
                elif j == 1:
                    rec["conversations"][0]["value"] = q.replace("<image>\n", "").replace("<pointcloud>\n", "")
                else:
                    rec["conversations"][1]["value"] = " "
            fh.write(json.dumps(rec) + "\n")
    os.replace(tmp, data)
    return data


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--root", type=Path, default=Path("/tmp/mmkit_bench_validate"))
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--no-decode", action="store_true")
    args = parser.parse_args()
    start = time.perf_counter()
    data = make_data(args.root, args.records)
    print(f"data: {data} ({args.records:,} records; prepared in {time.perf_counter() - start:.1f} s)")
    mmkit = Path(sys.executable).with_name("mmkit")
    cmd = [str(mmkit), "data", "validate", str(data), "--json"]
    if args.workers:
        cmd += ["--workers", str(args.workers)]
    if args.no_decode:
        cmd.append("--no-decode")
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    report = json.loads(proc.stdout)
    s = report["summary"]
    print(f"mmkit data validate: {seconds:.1f} s wall (exit {proc.returncode}); {s['records']:,} records, "
          f"{s['inputs_checked']:,} files decoded, {s['records_with_errors']:,} records with errors, "
          f"{os.cpu_count()} CPUs")
    for row in s["by_kind"]:
        print(f"  {row['severity']:7} {row['kind']:14} {row['count']:,}")


if __name__ == "__main__":
    main()
