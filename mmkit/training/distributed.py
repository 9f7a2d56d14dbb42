"""Process-group setup for DeepSpeed: gloo on CPU, NCCL on GPUs; works for a lone process too."""

from __future__ import annotations

import contextlib
import io
import os
import socket
import sys
from collections.abc import Iterator
from datetime import timedelta
from typing import Any


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def _without_build_notice() -> Iterator[None]:
    """DeepSpeed prints "DeepSpeed ... built successfully" on stdout each time it loads its CPU
    communication op, at the start of every run: that one line is dropped, anything else printed
    passes through."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured):
            yield
    finally:
        kept = [line for line in captured.getvalue().splitlines(keepends=True)
                if not (line.startswith("DeepSpeed ") and line.rstrip().endswith("built successfully"))]
        sys.stdout.write("".join(kept))


def init_distributed(timeout_s: float | None = None) -> tuple[int, int]:
    """Initialise (once) and return ``(rank, world_size)``.

    ``timeout_s`` bounds every collective: when another process dies or stops responding, the
    others fail with an error after that long instead of waiting forever.
    """
    import deepspeed
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        own_port = "MASTER_PORT" not in os.environ
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":  # NCCL reports a timed-out collective as an error instead of blocking
            os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        kwargs = {}
        if timeout_s:
            kwargs["timeout"] = timedelta(seconds=timeout_s)
            _default_group_timeout(kwargs["timeout"])
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        for attempt in range(5):
            try:
                with _without_build_notice():
                    deepspeed.init_distributed(dist_backend=backend, verbose=False, **kwargs)
                break
            except dist.DistNetworkError as exc:
                # A lone process picked a free port, but another process may take it before the
                # store binds it: pick another (a port given by a launcher is never changed).
                if not own_port or attempt == 4:
                    from mmkit.errors import ConfigError

                    reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else ""
                    given = ("MASTER_PORT came from the environment (a launcher's, or inherited from a parent "
                             "process that trained in-process): if that port is in use, free it, or unset "
                             "MASTER_PORT for a single-process run" if not own_port
                             else "five free ports were each taken before the store could bind them")
                    raise ConfigError(f"cannot open the process group at MASTER_ADDR={os.environ['MASTER_ADDR']} "
                                      f"MASTER_PORT={os.environ['MASTER_PORT']} (DistNetworkError: {reason}); "
                                      f"{given}") from None
                os.environ["MASTER_PORT"] = str(free_port())
    return dist.get_rank(), dist.get_world_size()


def _default_group_timeout(timeout: timedelta) -> None:
    """DeepSpeed creates its data-parallel groups with ``new_group(ranks)`` and no timeout, which
    torch then takes from a module default (30 minutes for gloo, 10 for NCCL): set that default too,
    so a collective in any group gives up after ``timeout``."""
    from torch.distributed import distributed_c10d

    for name in ("default_pg_timeout", "default_pg_nccl_timeout"):
        if isinstance(getattr(distributed_c10d, name, None), timedelta):
            setattr(distributed_c10d, name, timeout)


# -- small collectives (no-ops for a lone process) -------------------------------------------------
def _world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_initialized() else 1


def barrier() -> None:
    import torch.distributed as dist

    if _world() > 1:
        dist.barrier()


def all_reduce_sum(values: list[float]) -> list[float]:
    """Element-wise sum over processes."""
    import torch
    import torch.distributed as dist

    from mmkit.modeling.loading import device

    if _world() == 1:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device())
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def all_true(flag: bool) -> bool:
    """Whether ``flag`` holds on every process."""
    return all_reduce_sum([0.0 if flag else 1.0])[0] == 0.0


def any_true(flag: bool) -> bool:
    return all_reduce_sum([1.0 if flag else 0.0])[0] > 0.0


def broadcast_object(obj: Any, src: int = 0) -> Any:
    import torch.distributed as dist

    if _world() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_objects(obj: Any) -> list[Any]:
    import torch.distributed as dist

    if _world() == 1:
        return [obj]
    out: list[Any] = [None] * _world()
    dist.all_gather_object(out, obj)
    return out


