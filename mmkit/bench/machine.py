"""What a benchmark ran on, and the machine's measured matmul peak (the MFU denominator).

The peak is measured, not looked up: a dense matmul at the thread count and dtype the step uses,
the best of a few rounds. It is measured once per machine and cached in the user's cache
directory (:func:`mmkit.cache.cache_root`), keyed by device, threads, dtype and torch.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

from mmkit.bench.stats import timed

PEAK_FILE = "matmul_peak.json"


def cache_dir() -> Path:
    from mmkit.cache import cache_root

    return cache_root()


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


def machine_info(device: torch.device) -> dict[str, Any]:
    info = {"cpu": cpu_name(), "cpu_cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "device": str(device),
            "device_name": device_name(device)}
    try:  # how busy the machine was: shared machines make every figure noisier
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    return info


def machine_busy() -> bool:
    """More runnable work than half the cores (1-minute load average): figures are contended."""
    try:
        return os.getloadavg()[0] > 0.5 * (os.cpu_count() or 1)
    except OSError:
        return False


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_peak(device: torch.device, dtype: torch.dtype, *, size: int | None = None, rounds: int = 3,
                 min_seconds: float = 0.3) -> float:
    """FLOP/s of a dense ``size x size`` matmul: the best of ``rounds``."""
    n = size or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    torch.mm(a, b)
    _sync(device)
    best = 0.0
    for _ in range(rounds):
        calls, elapsed = timed(lambda: torch.mm(a, b), min_seconds=min_seconds, sync=lambda: _sync(device))
        best = max(best, 2.0 * n**3 * calls / elapsed)
    return best


def matmul_peak(device: torch.device, dtype: torch.dtype = torch.float32, *, refresh: bool = False) -> dict[str, Any]:
    """``{"flops": ..., "cached": bool, "key": ...}``: the cached peak for this machine, measured on first use."""
    key = f"{device_name(device)}|{device.type}|threads={torch.get_num_threads()}|{dtype}|torch={torch.__version__}"
    path = cache_dir() / PEAK_FILE
    table: dict[str, Any] = {}
    try:
        loaded = json.loads(path.read_text())
        if isinstance(loaded, dict):
            table = loaded
    except (OSError, ValueError):
        pass  # no cache yet, or an unreadable one: measure again
    entry = table.get(key)
    valid = isinstance(entry, dict) and isinstance(entry.get("flops"), (int, float))
    busy = machine_busy()
    # A peak measured while other work shared the cores is too low: measure again once the machine
    # is quieter, and keep the best figure ever measured (the hardware's, not the load's).
    if valid and not refresh and not (entry.get("busy") and not busy):
        return {"flops": float(entry["flops"]), "cached": True, "key": key, "busy": bool(entry.get("busy"))}
    flops = measure_peak(device, dtype)
    if valid and float(entry["flops"]) > flops:
        flops, busy = float(entry["flops"]), bool(entry.get("busy"))
    table[key] = {"flops": flops, "busy": busy, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(table, indent=2, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home: the figure is still right, just not cached
    return {"flops": flops, "cached": False, "key": key, "busy": busy}
