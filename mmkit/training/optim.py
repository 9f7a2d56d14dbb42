"""The optimizer step without DeepSpeed where DeepSpeed adds nothing.

On one process at ZeRO stage 0 in fp32 (no partitioning, no offload, no loss scaling, no master
weights), DeepSpeed's engine is a torch AdamW step plus overhead: an all-reduce of every gradient on
a single process, its clipping loop, timers and bookkeeping around each call. :class:`PlainEngine`
does the same arithmetic directly: the loss divided by the accumulation steps, ``loss.backward()``,
at the boundary ``torch.nn.utils.clip_grad_norm_`` and ``torch.optim.AdamW`` (foreach/fused where
available), gradients set to ``None``, then the LR schedule. Everything else (several processes,
ZeRO 1-3, offload, bf16 with master weights, fp16 loss scaling) stays on DeepSpeed.

It answers the engine methods the trainer and ``mmkit.training.checkpoint`` call, so neither knows
which one runs. Its checkpoint is safe to load: tensors in safetensors, everything else in JSON.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from mmkit.errors import CheckpointMismatchError

FORMAT = 1
OPTIMIZER_FILE = "optimizer.safetensors"
MODULE_FILE = "trainable.safetensors"
STATE_FILE = "engine.json"
#: DeepSpeed's file for a ZeRO-0 checkpoint of one model-parallel rank (what a multi-process ZeRO-0
#: run wrote; a plain run resuming it reads the optimizer state from it).
DEEPSPEED_STATES = "mp_rank_00_model_states.pt"


def use_plain_step(choice: str, *, world_size: int, zero_stage: int, precision: str) -> bool:
    """Whether the plain torch step runs: ``choice`` is ``auto``, ``deepspeed`` or ``torch``."""
    possible = world_size == 1 and zero_stage == 0 and precision == "fp32"
    if choice == "deepspeed":
        return False
    if choice == "torch" and not possible:
        from mmkit.errors import ConfigError

        raise ConfigError(f"optimizer_step: torch needs one process, ZeRO stage 0 and fp32 (now {world_size} "
                          f"process(es), ZeRO stage {zero_stage}, {precision}); use auto or deepspeed")
    return possible


class _Writer:
    """Writes the checkpoint files; ``mmkit.training.checkpoint`` wraps ``save`` exactly as it wraps
    DeepSpeed's ``checkpoint_engine.save`` (fault injection, errors held back until every writer ran)."""

    def save(self, payload: Any, path: str) -> None:
        if isinstance(payload, dict) and all(_is_tensor(v) for v in payload.values()):
            from safetensors.torch import save_file

            save_file({k: v.detach().contiguous().cpu() for k, v in payload.items()}, path, metadata={"format": "pt"})
        else:
            with open(path, "w", encoding="utf-8") as fh:
                json.dump(payload, fh, indent=1, sort_keys=True)
                fh.flush()
                os.fsync(fh.fileno())


def _is_tensor(value: Any) -> bool:
    import torch

    return isinstance(value, torch.Tensor)


class PlainEngine:
    """``module`` trained with torch's AdamW, the DeepSpeed engine's interface where the loop and the
    checkpoint use it (``__call__``, ``backward``, ``step``, ``is_gradient_accumulation_boundary``,
    ``train``, ``save_checkpoint``, ``load_checkpoint``, ``optimizer``, ``lr_scheduler``, ``global_steps``)."""

    def __init__(self, module: Any, param_groups: list[dict[str, Any]], *, lr: float, weight_decay: float,
                 max_grad_norm: float, grad_accum: int, device: Any, lr_scheduler: Any = None):
        import torch

        self.module = module.to(device)
        self.device = device
        self.grad_accum = grad_accum
        self.max_grad_norm = max_grad_norm
        # torch's fused AdamW (one kernel over every tensor; CPU too: 3x the foreach update, 5x the per-tensor
        # loop DeepSpeed's torch AdamW runs on CPU); foreach where a device or dtype has no fused kernel
        options = {"lr": lr, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": weight_decay}
        def groups() -> list[dict[str, Any]]:  # copies: torch writes its defaults into the dicts it is given
            return [{k: v for k, v in g.items() if k in ("params", "lr", "weight_decay")} for g in param_groups]

        try:
            self.optimizer = torch.optim.AdamW(groups(), fused=True, **options)
        except (RuntimeError, ValueError):
            self.optimizer = torch.optim.AdamW(groups(), foreach=True, **options)
        self.basic_optimizer = self.optimizer
        self.lr_scheduler = lr_scheduler(self.optimizer) if callable(lr_scheduler) else lr_scheduler
        self.global_steps = 0
        self.micro_steps = 0
        self.checkpoint_engine = _Writer()
        self._names = {id(p): n for n, p in module.named_parameters()}
        self._params = [p for group in self.optimizer.param_groups for p in group["params"]]

    # -- the step --------------------------------------------------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def train(self, mode: bool = True) -> PlainEngine:
        self.module.train(mode)
        return self

    def eval(self) -> PlainEngine:
        return self.train(False)

    def is_gradient_accumulation_boundary(self) -> bool:
        return (self.micro_steps + 1) % self.grad_accum == 0

    def backward(self, loss: Any) -> Any:
        # DeepSpeed's scale_wrt_gas: every micro-batch contributes 1/grad_accum of the step's gradient
        scaled = loss / self.grad_accum if self.grad_accum > 1 else loss
        scaled.backward()
        return loss

    def step(self) -> None:
        import torch

        if self.is_gradient_accumulation_boundary():
            for p in self._params:
                if p.grad is None:  # as DeepSpeed's reduction does: AdamW still moves them (momentum, decay)
                    p.grad = torch.zeros_like(p)
            if self.max_grad_norm > 0:
                grads = [p for p in self._params if p.grad is not None]
                if grads:
                    torch.nn.utils.clip_grad_norm_(grads, self.max_grad_norm, foreach=True)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.lr_scheduler is not None:
                self.lr_scheduler.step()
            self.global_steps += 1
        self.micro_steps += 1

    # -- checkpoints (DeepSpeed's signatures; safetensors + JSON inside ``save_dir/tag``) ----------------
    def save_checkpoint(self, save_dir: str, tag: str, save_latest: bool = False,
                        exclude_frozen_parameters: bool = True) -> bool:
        directory = Path(save_dir) / tag
        directory.mkdir(parents=True, exist_ok=True)
        tensors, groups, extra = self._optimizer_state()
        module = {n: p for n, p in self.module.named_parameters() if p.requires_grad or not exclude_frozen_parameters}
        self.checkpoint_engine.save(module, str(directory / MODULE_FILE))
        self.checkpoint_engine.save(tensors, str(directory / OPTIMIZER_FILE))
        self.checkpoint_engine.save({"format": FORMAT, "engine": "torch", "param_groups": groups, "state": extra,
                                     "lr_scheduler": _json_safe(self.lr_scheduler.state_dict())
                                     if self.lr_scheduler is not None else None,
                                     "global_steps": self.global_steps, "micro_steps": self.micro_steps},
                                    str(directory / STATE_FILE))
        return True

    def load_checkpoint(self, load_dir: str, tag: str, load_module_strict: bool = True,
                        load_optimizer_states: bool = True, load_lr_scheduler_states: bool = True
                        ) -> tuple[str | None, dict[str, Any] | None]:
        directory = Path(load_dir) / tag
        if (directory / STATE_FILE).is_file():
            saved = self._read_plain(directory)
        elif (directory / DEEPSPEED_STATES).is_file():
            saved = self._read_deepspeed(directory / DEEPSPEED_STATES)
        else:
            return None, None
        module_state, optimizer_state, scheduler_state, steps = saved
        from mmkit.modeling.persistence import load_state_strict

        # the trainable weights by name and shape (a frozen one present, or a trainable one missing, is refused)
        load_state_strict(self.module, module_state, what=str(directory))
        if load_optimizer_states:
            self.optimizer.load_state_dict(optimizer_state)
        if load_lr_scheduler_states and self.lr_scheduler is not None and scheduler_state is not None:
            self.lr_scheduler.load_state_dict(scheduler_state)
        self.global_steps = steps
        self.micro_steps = steps * self.grad_accum
        return str(directory), {}

    def _optimizer_state(self) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, dict[str, Any]]]:
        """Tensors keyed ``NAME/KEY`` by parameter name (not position), groups and non-tensor state as JSON."""
        state = self.optimizer.state_dict()
        order = [self._names[id(p)] for p in self._params]
        tensors: dict[str, Any] = {}
        extra: dict[str, dict[str, Any]] = {}
        for index, values in state["state"].items():
            name = order[index]
            for key, value in values.items():
                if _is_tensor(value):
                    tensors[f"{name}/{key}"] = value
                else:
                    extra.setdefault(name, {})[key] = value
        groups = [{**{k: v for k, v in group.items() if k != "params"},
                   "params": [order[i] for i in group["params"]]} for group in state["param_groups"]]
        return tensors, _json_safe(groups), _json_safe(extra)

    def _read_plain(self, directory: Path) -> tuple[dict[str, Any], dict[str, Any], Any, int]:
        return read_plain_state(directory, self.module, self.optimizer)

    def _read_deepspeed(self, path: Path) -> tuple[dict[str, Any], dict[str, Any], Any, int]:
        """A ZeRO-0 DeepSpeed checkpoint (another process count, or optimizer_step: deepspeed): its
        optimizer is torch's AdamW over the same parameter groups. Read with ``torch.load`` as the
        caller set it up (``mmkit.training.checkpoint.safe_torch_load``: tensors and known types only)."""
        import torch

        saved = torch.load(str(path), weights_only=True)
        optimizer = saved.get("optimizer")
        if not isinstance(optimizer, dict) or "state" not in optimizer:
            raise CheckpointMismatchError(f"{path}: no whole optimizer state (a ZeRO 1-3 checkpoint cannot be resumed "
                                          "by the plain step; use optimizer_step: deepspeed)")
        return saved.get("module") or {}, optimizer, saved.get("lr_scheduler"), int(saved.get("global_steps", 0))


def read_plain_state(directory: Path, module: Any, optimizer: Any) -> tuple[dict[str, Any], dict[str, Any], Any, int]:
    """A plain step's checkpoint in ``directory``: trainable weights, the optimizer's state dict (parameters
    matched by name, the groups checked), the LR schedule's state and the optimizer steps done."""
    from safetensors.torch import load_file

    meta = json.loads((directory / STATE_FILE).read_text(encoding="utf-8"))
    if meta.get("format") != FORMAT:
        raise CheckpointMismatchError(f"{directory / STATE_FILE}: format {meta.get('format')!r}, expected {FORMAT}")
    names = {id(p): n for n, p in module.named_parameters()}
    groups_now = [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]
    groups_saved = [g["params"] for g in meta["param_groups"]]
    if groups_now != groups_saved:
        raise CheckpointMismatchError(
            f"{directory}: the optimizer's parameter groups differ from this run's "
            f"(saved {[len(g) for g in groups_saved]} parameters per group, now {[len(g) for g in groups_now]})")
    index = {name: i for i, name in enumerate(n for g in groups_now for n in g)}
    state: dict[int, dict[str, Any]] = {}
    for key, value in load_file(str(directory / OPTIMIZER_FILE)).items():
        name, _, field = key.rpartition("/")
        state.setdefault(index[name], {})[field] = value
    for name, values in meta["state"].items():
        state.setdefault(index[name], {}).update(values)
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in meta["param_groups"]]
    weights = load_file(str(directory / MODULE_FILE))
    return weights, {"state": state, "param_groups": groups}, meta.get("lr_scheduler"), int(meta["global_steps"])


def accept_plain_checkpoints(engine: Any) -> None:
    """Let a DeepSpeed ZeRO-0 engine resume a plain step's checkpoint (a one-process run continued with
    more processes: at ZeRO 0 the optimizer state is whole, and DeepSpeed's optimizer is torch's AdamW
    over the same groups). Its own checkpoints load as before."""
    original = engine.load_checkpoint

    def load_checkpoint(load_dir: str, tag: str, *args: Any, **kwargs: Any) -> Any:
        directory = Path(load_dir) / tag
        if not (directory / STATE_FILE).is_file():
            return original(load_dir, tag, *args, **kwargs)
        from mmkit.modeling.persistence import load_state_strict

        optimizer = getattr(engine, "basic_optimizer", None) or engine.optimizer
        weights, state, schedule, steps = read_plain_state(directory, engine.module, optimizer)
        load_state_strict(engine.module, weights, what=str(directory))
        optimizer.load_state_dict(state)
        if engine.lr_scheduler is not None and schedule is not None:
            engine.lr_scheduler.load_state_dict(schedule)
        engine.global_steps = steps
        return str(directory), {}

    engine.load_checkpoint = load_checkpoint


def _json_safe(value: Any) -> Any:
    import torch

    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    return value
