"""Training configuration: a frozen attrs class, loaded from YAML (safe_load) with CLI overrides,
and saved resolved with every run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import yaml

from mmkit.errors import ConfigError


def _tuple(value: Any) -> tuple:
    if value is None:
        return ()
    if isinstance(value, str):
        return tuple(v.strip() for v in value.split(",") if v.strip())
    return tuple(value)


@attrs.frozen
class TrainConfig:
    # what to train
    modalities: tuple[str, ...] = attrs.field(default=(), converter=_tuple)
    llm: str | None = None  # hub id or local path; None: the embedded demo
    data: tuple[str, ...] = attrs.field(default=(), converter=_tuple)  # files, "path:weight" to mix
    eval_data: tuple[str, ...] = attrs.field(default=(), converter=_tuple)
    data_format: str | None = None  # reader name; None: detect per file
    data_root: str | None = None
    allow_outside_root: bool = False
    output_dir: str = "runs/mmkit"
    stage: str = "instruct"  # "align": projectors only; "instruct": projectors + LoRA
    init_from: str | None = None  # an align run's output dir, for the instruct stage
    # components
    encoders: dict[str, str] = attrs.field(factory=dict)
    encoder_pretrained: dict[str, str] = attrs.field(factory=dict)
    encoder_options: dict[str, dict[str, Any]] = attrs.field(factory=dict)
    projectors: dict[str, str] = attrs.field(factory=dict)
    projector_options: dict[str, dict[str, Any]] = attrs.field(factory=dict)
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_mode: str = "per_modality"  # or "shared"
    lora_targets: tuple[str, ...] = attrs.field(default=(), converter=_tuple)
    encoder_lora: bool = False
    #: prompt template: a name from mmkit's template library or a path to a Jinja chat template file;
    #: default: the tokenizer's own
    template: str | None = None
    max_length: int = 2048
    # optimisation
    epochs: float = 1.0
    max_steps: int | None = None
    micro_batch_size: int = 8
    grad_accum: int = 1
    #: samples per optimizer step over all processes; when set, grad_accum is derived from it
    #: (global_batch_size / (micro_batch_size x processes)), so the loss curve does not depend on
    #: the process count. Unset: the global batch is micro_batch_size x grad_accum x processes.
    global_batch_size: int | None = None
    lr: float = 2e-4
    projector_lr: float | None = None  # default: lr
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    max_grad_norm: float = 1.0
    zero_stage: int = 0
    precision: str = "fp32"  # fp32 | bf16 | fp16
    gradient_checkpointing: bool = False
    seed: int = 0
    shuffle: bool = True  # reshuffle the training samples every epoch (from the seed)
    num_workers: int = 0
    #: torch intra-op threads (None: torch's default). Tiny models run fastest on one thread, where
    #: thread hand-offs would cost more than the arithmetic.
    num_threads: int | None = None
    skip_bad_records: bool = False
    # data path (mmkit/data: packing.py, feature_cache.py)
    #: "pad" (random batches padded to the longest), "grouped" (batches of one modality group and
    #: similar lengths, as LLaVA groups them) or "packed" (several samples per sequence; then
    #: micro_batch_size counts sequences of up to pack_max_tokens tokens)
    batching: str = "pad"
    #: default 2 x max_length: rows that fit two of the longest samples leave little room unfilled
    #: (padding 1.9% on the demo, 1.4% on a LLaVA-like mix, against 5.7% / 6.6% at 1 x)
    pack_max_tokens: int | None = None
    #: a directory of cached frozen-encoder features: each input is encoded once, later epochs and
    #: runs read the features (keyed on the file's bytes and the encoder's identity)
    cache_features: str | None = None
    # bookkeeping
    log_every: int = 10
    save_every: int = 0  # steps between checkpoints; 0: only at the end
    keep_last: int = 2
    #: "auto": continue from the newest checkpoint in output_dir when there is one; "never": start
    #: over (earlier checkpoints in output_dir are removed); or a checkpoint / run directory
    resume: str = "auto"
    #: resuming with another process count or ZeRO stage under ZeRO 1-3: "refuse", or
    #: "reset_optimizer" (weights, schedule and data position restored, optimizer moments reset)
    on_world_size_change: str = "refuse"
    #: a NaN/inf loss: "skip" the optimizer step and count it, or "stop" naming the step and records
    on_nonfinite_loss: str = "skip"
    # processes
    num_procs: int = 1  # processes on this machine (several machines: DeepSpeed's launcher, see README)
    #: seconds a collective may wait before failing (a dead or stuck process makes the others exit)
    collective_timeout_s: float = 1800.0
    eval_max_new_tokens: int = 16
    eval_batch_size: int = 64
    tensorboard: bool = True

    def __attrs_post_init__(self) -> None:
        if self.batching not in ("pad", "grouped", "packed"):
            raise ConfigError(f"batching {self.batching!r}: use pad, grouped or packed")
        if self.pack_max_tokens is not None and self.pack_max_tokens < self.max_length:
            raise ConfigError(f"pack_max_tokens {self.pack_max_tokens} is below max_length {self.max_length}: "
                              "a sample of max_length tokens must fit in one packed sequence")
        if self.cache_features and self.encoder_lora:
            raise ConfigError("cache_features with encoder_lora: a trained encoder's features cannot be cached")
        if self.stage not in ("align", "instruct"):
            raise ConfigError(f"stage {self.stage!r}: use 'align' or 'instruct'")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ConfigError(f"precision {self.precision!r}: use fp32, bf16 or fp16")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"zero_stage {self.zero_stage}: use 0, 1, 2 or 3")
        if self.lora_mode not in ("per_modality", "shared"):
            raise ConfigError(f"lora_mode {self.lora_mode!r}: use per_modality or shared")
        if self.on_nonfinite_loss not in ("skip", "stop"):
            raise ConfigError(f"on_nonfinite_loss {self.on_nonfinite_loss!r}: use skip or stop")
        if self.on_world_size_change not in ("refuse", "reset_optimizer"):
            raise ConfigError(f"on_world_size_change {self.on_world_size_change!r}: use refuse or reset_optimizer")
        if self.num_procs < 1:
            raise ConfigError(f"num_procs {self.num_procs}: must be at least 1")
        if self.global_batch_size is not None and self.global_batch_size < 1:
            raise ConfigError(f"global_batch_size {self.global_batch_size}: must be at least 1")
        if self.keep_last < 1:
            raise ConfigError(f"keep_last {self.keep_last}: keep at least 1 checkpoint")
        if self.save_every < 0:
            raise ConfigError(f"save_every {self.save_every}: use 0 (only at the end) or a number of steps")
        if not self.resume:
            raise ConfigError("resume: use auto, never, or a checkpoint directory")
        if self.data and self.llm is None:
            raise ConfigError("--data needs --llm (the embedded demo brings its own data)")

    @property
    def is_demo(self) -> bool:
        return self.llm is None

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


FIELDS = {f.name for f in attrs.fields(TrainConfig)}

#: The embedded demo's settings, sized for a 2-core CPU; explicit options still win.
DEMO_DEFAULTS: dict[str, Any] = {
    "output_dir": "runs/demo",
    "epochs": 12.0,
    "micro_batch_size": 32,
    # One adapter shared by all modalities learns the "read the modality tokens" skill from every
    # sample; on this tiny demo that beat per-modality adapters for the same CPU time.
    "lora_mode": "shared",
    "lr": 5e-3,
    "projector_lr": 5e-3,
    "num_threads": 1,
    # One loader process prepares the next batch (point sampling, image processing, tokenising) on
    # the second core while this one trains: 1.4x the step rate of loading in-line.
    "num_workers": 1,
    "warmup_ratio": 0.05,
    "lora_r": 16,
    "lora_alpha": 32,
    "lora_dropout": 0.0,
    "max_length": 128,
    "log_every": 10,
    "eval_max_new_tokens": 4,
}


def load_yaml(path: str | Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of options at the top level")
    return data


def resolve_config(yaml_path: str | Path | None, overrides: dict[str, Any]) -> TrainConfig:
    """Defaults < demo defaults (when no --llm) < YAML file < CLI overrides."""
    values: dict[str, Any] = {}
    if yaml_path is not None:
        values.update(load_yaml(yaml_path))
    values.update({k: v for k, v in overrides.items() if v is not None})
    unknown = set(values) - FIELDS
    if unknown:
        raise ConfigError(f"unknown option(s): {', '.join(sorted(unknown))}")
    if values.get("llm") is None:
        values = {**DEMO_DEFAULTS, **values}
    try:
        return TrainConfig(**values)
    except TypeError as exc:
        raise ConfigError(str(exc)) from None


def parse_assignments(items: list[str] | None) -> dict[str, Any]:
    """``--set key=value`` pairs; values are parsed as YAML scalars (``3``, ``true``, ``1e-4``)."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected key=value")
        out[key.strip()] = yaml.safe_load(raw)
    return out


def save_config(config: TrainConfig, path: Path) -> None:
    from mmkit.training.atomic import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False))
