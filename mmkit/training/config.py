"""Training configuration: a frozen attrs class, loaded from YAML (safe_load) with CLI overrides,
and saved resolved with every run.

Each field says, where it is defined, what it means (``help``), which values it accepts (its type
and a ``check``) and what a resumed run may do with it (``resume``). The CLI options
(``cli/train_cmd.py``) and the resume compatibility lists (``checkpoint/compat.py``) are derived from that.

Values are parsed by type, not trusted: YAML 1.1 reads ``2e-4`` as a string, so numbers given as
strings are parsed as numbers, and anything that is not a number is refused naming the field. All
bad fields are reported at once (:class:`ConfigProblems`), each with the values it accepts.
"""

from __future__ import annotations

import difflib
import math
import os
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs
import yaml

from mmkit.errors import ConfigError

# -- resume rules ---------------------------------------------------------------------------------
#: a resumed run refuses when the value changed: it changes what is trained (model, data, order)
MUST_MATCH = "must_match"
#: may change when resuming (a longer schedule, another learning rate); the change is reported
MAY_CHANGE = "may_change"
#: may change silently: it does not change what is trained (logging, paths, process plumbing)
IGNORED = "ignored"
RESUME_RULES = (MUST_MATCH, MAY_CHANGE, IGNORED)


class ConfigProblems(ConfigError):
    """Every bad value of a configuration at once: ``problems`` is a list of ``(field, message)``."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = list(problems)
        lines = [message for _, message in self.problems]
        if len(lines) == 1:
            text = lines[0]
        else:
            text = f"{len(lines)} problems in the configuration:\n" + "\n".join(f"  - {line}" for line in lines)
        super().__init__(text)

    def __reduce__(self):
        return (ConfigProblems, (self.problems,))


# -- accepted values ------------------------------------------------------------------------------
@attrs.frozen
class Check:
    """A rule on a parsed value; ``text`` names the accepted values (for errors and --help)."""

    ok: Callable[[Any], bool]
    text: str
    choices: tuple[Any, ...] = ()
    #: what is wrong with a refused value, when "out of range" would not say it
    explain: Callable[[Any], str] | None = None

    def __call__(self, value: Any) -> bool:
        return self.ok(value)


def at_least(low: float, note: str = "") -> Check:
    return Check(lambda v: v >= low, f">= {low}{note}")


def above(low: float, note: str = "") -> Check:
    return Check(lambda v: v > low, f"> {low}{note}")


def within(low: float, high: float, *, high_open: bool = False) -> Check:
    if high_open:
        return Check(lambda v: low <= v < high, f"in [{low}, {high})")
    return Check(lambda v: low <= v <= high, f"in [{low}, {high}]")


def one_of(*choices: Any) -> Check:
    names = [str(c) for c in choices]
    text = ", ".join(names[:-1]) + f" or {names[-1]}" if len(names) > 1 else names[0]
    return Check(lambda v: v in choices, text, tuple(choices))


def option(default: Any = attrs.NOTHING, *, help: str, resume: str, check: Check | None = None,
           factory: Callable[[], Any] | None = None, flag: bool | str = False) -> Any:
    """A :class:`TrainConfig` field. ``flag``: the field has its own ``mmkit train`` option
    (``True``: ``--field-name``; a string: that option name), else it is set with ``--set``."""
    if resume not in RESUME_RULES:
        raise ValueError(f"resume={resume!r}: use one of {RESUME_RULES}")
    metadata = {"help": help, "resume": resume, "check": check, "flag": flag}
    if factory is not None:
        return attrs.field(factory=factory, metadata=metadata)
    return attrs.field(default=default, metadata=metadata)


def _data_weight(entries: tuple[str, ...]) -> bool:
    return not _bad_weights(entries)


def _bad_weights(entries: tuple[str, ...]) -> list[str]:
    """Entries ``FILE:WEIGHT`` whose weight is not a finite positive number (the parse rule of
    :meth:`mmkit.data.sources.DataSource.parse`: a trailing ``:NUMBER`` is a weight)."""
    bad = []
    for entry in entries:
        head, sep, tail = entry.rpartition(":")
        if not (sep and head):
            continue
        try:
            weight = float(tail)
        except ValueError:
            continue
        if not (math.isfinite(weight) and weight > 0):
            bad.append(entry)
    return bad


_WEIGHTS = Check(_data_weight, "FILE or FILE:WEIGHT with a finite WEIGHT > 0",
                 explain=lambda entries: f"{', '.join(map(repr, _bad_weights(entries)))}: the weight is not a "
                                         "finite number > 0")


# -- the configuration ----------------------------------------------------------------------------
@attrs.frozen
class TrainConfig:
    # what to train
    modalities: tuple[str, ...] = option(
        (), resume=MUST_MATCH, flag=True,
        help="Comma-separated modality names (`mmkit plugins list` shows them). Default: every installed modality "
             "with a demo.")
    llm: str | None = option(
        None, resume=MUST_MATCH, flag=True,
        help="Hugging Face causal LM (hub id or local path). Omit to train the embedded demo.")
    data: tuple[str, ...] = option(
        (), resume=MUST_MATCH, flag=True, check=_WEIGHTS,
        help="Training file (LLaVA/LAMM/generic JSON or JSONL); repeat to mix, FILE:WEIGHT to weight (the share "
             "of the file's records used per epoch; above 1 repeats records).")
    eval_data: tuple[str, ...] = option((), resume=IGNORED, flag=True, help="Held-out file(s) scored after training.")
    data_format: str | None = option(None, resume=MUST_MATCH, flag=True, help="Reader name (default: detect per file).")
    data_root: str | None = option(None, resume=MUST_MATCH, flag=True, help="Root for relative input paths.")
    allow_outside_root: bool = option(
        False, resume=MAY_CHANGE, help="Accept input paths that resolve outside data_root.")
    allow_base_mismatch: bool = option(False, resume=IGNORED, flag="allow-different-base", help=(
        "Accept a base LLM whose weights, tokenizer or chat template differ from the one an --init-from run or "
        "checkpoint was trained on (same shapes; a deliberate swap)."))
    trust_checkpoint: bool = option(False, resume=IGNORED, flag=True, help=(
        "Resume from a checkpoint whose optimizer files need full unpickling (can run code from the file): "
        "only for checkpoints you wrote yourself."))
    output_dir: str = option("runs/mmkit", resume=IGNORED, flag=True,
                             help="Run directory (default runs/demo for the demo, else runs/mmkit).")
    stage: str = option("instruct", resume=MUST_MATCH, flag=True, check=one_of("align", "instruct"),
                        help="align (projectors only) or instruct (projectors + LoRA).")
    init_from: str | None = option(None, resume=MUST_MATCH, flag=True,
                                   help="An align run's output dir to start the instruct stage from.")
    # components
    encoders: dict[str, str] = option(factory=dict, resume=MUST_MATCH, flag="encoder",
                                      help="MODALITY=ENCODER_NAME (default: the modality's own).")
    encoder_pretrained: dict[str, str] = option(factory=dict, resume=MUST_MATCH, flag="encoder-pretrained",
                                                help="MODALITY=HUB_ID_OR_PATH of the encoder's weights.")
    encoder_options: dict[str, dict[str, Any]] = option(
        factory=dict, resume=MUST_MATCH,
        help="Per modality, options for its encoder (e.g. encoder_options.MODALITY.feature_layer=-2).")
    projectors: dict[str, str] = option(factory=dict, resume=MUST_MATCH, flag="projector",
                                        help="MODALITY=PROJECTOR_NAME (default: the modality's own).")
    projector_options: dict[str, dict[str, Any]] = option(factory=dict, resume=MUST_MATCH,
                                                          help="Per modality, options for its projector.")
    lora_r: int = option(16, resume=MUST_MATCH, flag=True, check=at_least(1), help="LoRA rank.")
    lora_alpha: int = option(32, resume=MUST_MATCH, check=at_least(1), help="LoRA alpha (scale = alpha / r).")
    lora_dropout: float = option(0.05, resume=MAY_CHANGE, check=within(0, 1, high_open=True),
                                 help="Dropout on the LoRA path.")
    lora_mode: str = option("per_modality", resume=MUST_MATCH, flag=True, check=one_of("per_modality", "shared"),
                            help="per_modality (an adapter per modality) or shared (one adapter).")
    lora_targets: tuple[str, ...] = option((), resume=MUST_MATCH,
                                           help="LLM module names to adapt (default: the plugins' choice).")
    encoder_lora: bool = option(False, resume=MUST_MATCH, help="Adapt the encoders with LoRA too.")
    template: str | None = option(
        None, resume=MUST_MATCH, flag=True,
        help="Prompt template: a name from mmkit's template library or a path to a Jinja chat template file; "
             "default: the tokenizer's own.")
    max_length: int = option(2048, resume=MUST_MATCH, check=at_least(1),
                             help="Longest sample in tokens, modality tokens included.")
    # optimisation
    epochs: float = option(1.0, resume=MAY_CHANGE, flag=True, check=above(0),
                           help="Passes over the training data (fractions allowed); max_steps wins when set.")
    max_steps: int | None = option(None, resume=MAY_CHANGE, flag=True, check=at_least(1, " (or unset: from epochs)"),
                                   help="Optimizer steps to train.")
    micro_batch_size: int = option(8, resume=MAY_CHANGE, flag=True, check=at_least(1),
                                   help="Samples per process per forward pass (packed: sequences).")
    grad_accum: int = option(1, resume=MAY_CHANGE, flag=True, check=at_least(1),
                             help="Micro-batches per optimizer step (derived when global_batch_size is set).")
    #: samples per optimizer step over all processes; when set, grad_accum is derived from it
    #: (global_batch_size / (micro_batch_size x processes)), so the loss curve does not depend on
    #: the process count. Unset: the global batch is micro_batch_size x grad_accum x processes.
    global_batch_size: int | None = option(
        None, resume=MAY_CHANGE, flag=True, check=at_least(1, " (or unset: micro_batch_size x grad_accum x processes)"),
        help="Samples per optimizer step over all processes (grad_accum is then derived).")
    lr: float = option(2e-4, resume=MAY_CHANGE, flag=True, check=above(0), help="Learning rate (LoRA).")
    projector_lr: float | None = option(None, resume=MAY_CHANGE, flag=True,
                                        check=above(0, " (or unset: lr)"),
                                        help="Learning rate of projectors and markers.")
    weight_decay: float = option(0.0, resume=MAY_CHANGE, check=at_least(0), help="AdamW weight decay.")
    warmup_ratio: float = option(0.03, resume=MAY_CHANGE, check=within(0, 1),
                                 help="Share of the steps spent warming the learning rate up.")
    max_grad_norm: float = option(1.0, resume=MAY_CHANGE, check=at_least(0, " (0: no clipping)"),
                                  help="Gradient clipping norm (0: no clipping).")
    zero_stage: int = option(0, resume=IGNORED, flag=True, check=one_of(0, 1, 2, 3),  # see the process-count note
                             help="DeepSpeed ZeRO stage 0-3.")
    zero3_max_live_parameters: int = option(
        1_000_000_000, resume=IGNORED, check=at_least(0),
        help="ZeRO-3: most parameters gathered at once, and the reuse distance within which a gathered one is kept "
             "(DeepSpeed's stage3_max_live_parameters / stage3_max_reuse_distance); lower it to trade speed for memory.")
    precision: str = option("fp32", resume=MUST_MATCH, flag=True, check=one_of("fp32", "bf16", "fp16"),
                            help="fp32, bf16 or fp16.")
    gradient_checkpointing: bool = option(False, resume=MAY_CHANGE, flag=True,
                                          help="Recompute activations in the backward pass to save memory.")
    attn_implementation: str | None = option(
        None, resume=MAY_CHANGE, flag=True, check=one_of("eager", "sdpa", "flash_attention_2"),
        help="LLM attention kernel: eager, sdpa or flash_attention_2 (default: the best available; flash-attention "
             "only when installed and on a CUDA GPU in bf16/fp16).")
    quantize: str | None = option(
        None, resume=MUST_MATCH, flag=True, check=one_of("4bit", "8bit"),
        help="Load the LLM in 4bit (QLoRA, NF4) or 8bit through bitsandbytes (CUDA GPUs only; not with ZeRO-3).")
    encoder_gradient_checkpointing: bool = option(
        False, resume=MAY_CHANGE, help="Recompute the encoders' activations in the backward pass (with encoder_lora).")
    seed: int = option(0, resume=MUST_MATCH, flag=True, check=within(0, 2**32 - 1),
                       help="Seed of the initialisation, the data order and dropout.")
    shuffle: bool = option(True, resume=MUST_MATCH,
                           help="Reshuffle the training samples every epoch (from the seed).")
    num_workers: int = option(0, resume=IGNORED, check=at_least(0),
                              help="Data-loading worker processes (0: load in the training process).")
    #: Tiny models run fastest on one thread, where thread hand-offs would cost more than the arithmetic.
    num_threads: int | None = option(None, resume=IGNORED, check=at_least(1, " (or auto: torch's default)"),
                                     help="torch intra-op threads (auto: torch's default).")
    skip_bad_records: bool = option(False, resume=MUST_MATCH, flag=True,
                                    help="Skip and count records that fail to load.")
    # data path (mmkit/data: packing.py, feature_cache.py)
    batching: str = option(
        "pad", resume=MUST_MATCH, flag=True, check=one_of("pad", "grouped", "packed"),
        help="pad (random batches, padded), grouped (by modality and length, as LLaVA groups them) or packed "
             "(several samples per sequence, attention kept inside each; micro_batch_size then counts sequences).")
    #: default 2 x max_length: rows that fit two of the longest samples leave little room unfilled
    #: (padding 1.9% on the demo, 1.4% on a LLaVA-like mix, against 5.7% / 6.6% at 1 x)
    pack_max_tokens: int | None = option(
        None, resume=MUST_MATCH, flag=True,
        # >= 1 here; >= max_length is a rule between fields (_cross_checks), named in the accepted values
        check=Check(lambda v: v >= 1, ">= max_length (or unset: 2 x max_length)"),
        help="Tokens per packed sequence with --batching packed, modality tokens counted.")
    cache_features: str | None = option(
        None, resume=MAY_CHANGE, flag=True,
        help="Directory caching frozen-encoder features: each input is encoded once, later epochs and runs read "
             "them (keyed on the file's bytes and the encoder's identity). 'auto': a cache inside the run, "
             "filled by the loader workers in the first epoch (none with encoder_lora).")
    # bookkeeping
    log_every: int = option(10, resume=IGNORED, check=at_least(1), help="Steps between logged losses.")
    save_every: int = option(0, resume=IGNORED, flag=True, check=at_least(0, " (0: only at the end)"),
                             help="Checkpoint every N steps (0: only at the end; always at the end).")
    keep_last: int = option(2, resume=IGNORED, check=at_least(1), help="Checkpoints kept (the newest).")
    resume: str = option(
        "auto", resume=IGNORED, flag=True,
        help="auto (continue from the newest checkpoint in the output dir), never (start over: earlier "
             "checkpoints there are removed), or a checkpoint/run directory.")
    on_world_size_change: str = option(
        "refuse", resume=IGNORED, check=one_of("refuse", "reset_optimizer"),
        help="Resuming with another process count or ZeRO stage under ZeRO 1-3: refuse, or reset_optimizer "
             "(weights, schedule and data position restored, optimizer moments reset).")
    on_nonfinite_loss: str = option(
        "skip", resume=IGNORED, check=one_of("skip", "stop"),
        help="A NaN/inf loss: skip the optimizer step and count it, or stop naming the step and records.")
    on_out_of_memory: str = option(
        "stop", resume=IGNORED, check=one_of("stop", "skip"),
        help="Out of memory in a micro-batch: stop with advice, or skip (that step's update is skipped on "
             "every process and counted; ZeRO stage 0 only).")
    optimizer_step: str = option(  # each engine resumes the other's checkpoint (ZeRO 0); a switch is reported
        "auto", resume=MAY_CHANGE, check=one_of("auto", "deepspeed", "torch"),
        help="auto: a plain torch AdamW step where DeepSpeed adds nothing (one process, ZeRO 0, fp32), "
             "DeepSpeed's engine otherwise; deepspeed or torch to choose.")
    # processes
    num_procs: int = option(1, resume=IGNORED, flag=True, check=at_least(1),
                            help="Data-parallel processes on this machine (gloo on CPU, NCCL on GPUs). "
                                 "Several machines: see README.")
    collective_timeout_s: float = option(
        1800.0, resume=IGNORED, check=above(0),
        help="Seconds a collective may wait before failing (a dead or stuck process makes the others exit).")
    eval_max_new_tokens: int = option(16, resume=IGNORED, check=at_least(1),
                                      help="Tokens generated per answer when scoring eval_data.")
    eval_batch_size: int = option(64, resume=IGNORED, check=at_least(1), help="Batch size when scoring eval_data.")
    tensorboard: bool = option(True, resume=IGNORED, help="Also log to TensorBoard (output_dir/tensorboard).")

    def __attrs_post_init__(self) -> None:
        problems: list[tuple[str, str]] = []
        for field in attrs.fields(type(self)):
            try:
                value = parse_value(field, getattr(self, field.name))
            except _Bad as bad:
                problems.append((field.name, bad.message))
                continue
            object.__setattr__(self, field.name, value)  # frozen: the parsed value replaces the raw one
        bad_fields = {name for name, _ in problems}
        # a rule between fields is checked only when those fields parsed
        problems += [(name, message) for name, message, uses in self._cross_checks()
                     if not ({name, *uses} & bad_fields)]
        if problems:
            raise ConfigProblems(problems)

    def _cross_checks(self) -> list[tuple[str, str, tuple[str, ...]]]:
        """``(field, message, other fields it depends on)`` for rules between fields."""
        out = []
        if self.pack_max_tokens is not None and self.pack_max_tokens < self.max_length:
            out.append(("pack_max_tokens", f"pack_max_tokens {self.pack_max_tokens} is below max_length "
                        f"{self.max_length}: a sample of max_length tokens must fit in one packed sequence",
                        ("max_length",)))
        if self.cache_features not in (None, "auto") and self.encoder_lora:
            out.append(("cache_features", "cache_features with encoder_lora: a trained encoder's features cannot "
                        "be cached", ("encoder_lora",)))
        if not self.resume:
            out.append(("resume", "resume: use auto, never, or a checkpoint directory", ()))
        if self.data and self.llm is None:
            out.append(("data", "--data needs --llm (the embedded demo brings its own data)", ("llm",)))
        return out

    @property
    def is_demo(self) -> bool:
        return self.llm is None

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


attrs.resolve_types(TrainConfig)
FIELDS = {f.name for f in attrs.fields(TrainConfig)}


def fields_with_rule(rule: str) -> tuple[str, ...]:
    """The fields whose resume rule is ``rule`` (one of :data:`RESUME_RULES`), in definition order."""
    if rule not in RESUME_RULES:
        raise ValueError(f"unknown resume rule {rule!r}")
    return tuple(f.name for f in attrs.fields(TrainConfig) if f.metadata.get("resume") == rule)


# -- parsing values by type -----------------------------------------------------------------------
class _Bad(Exception):
    def __init__(self, message: str):
        self.message = message


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}
_UNSET = {"none", "null", "auto", "~", ""}


def accepted(field: attrs.Attribute) -> str:
    """The values a field accepts, in words (for errors and --help)."""
    tp, _ = base_type(field.type)
    check: Check | None = field.metadata.get("check")
    if check is not None and check.choices:
        return check.text
    words = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp)
    if words is None:
        origin = typing.get_origin(tp)
        words = "a list of strings (or a comma-separated string)" if origin is tuple else "a mapping"
    if check is not None and tp in (int, float):
        words += f" {check.text}"
    elif check is not None:
        words = check.text
    return words


def base_type(tp: Any) -> tuple[Any, bool]:
    """``(the type, whether None is allowed)`` of an annotation such as ``int | None``."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(tp))
    return tp, False


def parse_value(field: attrs.Attribute, value: Any) -> Any:
    """``value`` parsed as ``field``'s type and checked; raises :class:`_Bad` naming the field and
    the accepted values."""
    name, raw = field.name, value
    tp, optional = base_type(field.type)

    def bad(reason: str) -> _Bad:
        return _Bad(f"{name} {raw!r}: {reason}use {accepted(field)}")

    if value is None or (optional and tp is not str and isinstance(value, str) and value.strip().lower() in _UNSET):
        if optional:
            return None
        if typing.get_origin(tp) in (tuple, dict):
            return typing.get_origin(tp)()
        raise bad("a value is required; ")
    if tp is bool:
        return _as_bool(value, bad)
    value = _as_type(tp, value, bad)
    _check(field, value, raw)
    return value


def _as_bool(value: Any, bad: Callable[[str], _Bad]) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise bad("")


def _as_type(tp: Any, value: Any, bad: Callable[[str], _Bad]) -> Any:
    """``value`` as an int, float, str, tuple of str or mapping (``tp``), or :class:`_Bad`."""
    origin = typing.get_origin(tp)
    if tp is int:
        parsed = _as_int(value)
        if parsed is None:
            raise bad("not an integer; ")
        return parsed
    if tp is float:
        parsed = _as_float(value)
        if parsed is None:
            raise bad("not a number; ")
        if not math.isfinite(parsed):
            raise bad("not a finite number; ")
        return parsed
    if tp is str:
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        if not isinstance(value, str):
            raise bad("not a string; ")
        return value
    if origin is tuple:
        parsed = _as_str_tuple(value)
    elif origin is dict:
        parsed = _as_mapping(value, typing.get_args(tp)[1])
    else:
        return value
    if parsed is None:
        raise bad("")
    return parsed


def _check(field: attrs.Attribute, value: Any, raw: Any) -> None:
    """The field's ``check`` on its parsed value; a refusal names the accepted values."""
    name, check = field.name, field.metadata.get("check")
    if check is None or check(value):
        return
    if check.choices:
        close = difflib.get_close_matches(str(value), [str(c) for c in check.choices], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise _Bad(f"{name} {value!r}: use {check.text}{hint}")
    if check.explain is not None:
        raise _Bad(f"{name} {check.explain(value)}; use {check.text}")
    shown = raw.strip() if isinstance(raw, str) else repr(raw)  # "-5" from the command line: -5
    raise _Bad(f"{name} {shown}: out of range; use {accepted(field)}")


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() else None
    if isinstance(value, str):
        text = value.strip().replace("_", "")
        try:
            return int(text)
        except ValueError:
            pass
        number = _as_float(text)
        return int(number) if number is not None and math.isfinite(number) and number.is_integer() else None
    return None


def _as_float(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())  # "2e-4": a string under YAML 1.1
        except ValueError:
            return None
    return None


def _as_str_tuple(value: Any) -> tuple[str, ...] | None:
    if isinstance(value, str):
        return tuple(v.strip() for v in value.split(",") if v.strip())
    if isinstance(value, os.PathLike):
        return (os.fspath(value),)
    if isinstance(value, (list, tuple)):
        items = [os.fspath(v) if isinstance(v, os.PathLike) else v for v in value]
        if all(isinstance(v, str) for v in items):
            return tuple(items)
    return None


def _as_mapping(value: Any, inner: Any) -> dict[str, Any] | None:
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        return None
    if inner is str:
        if not all(isinstance(v, str) for v in value.values()):
            return None
        return dict(value)
    if typing.get_origin(inner) is dict:
        if not all(isinstance(v, Mapping) for v in value.values()):
            return None
        return {k: dict(v) for k, v in value.items()}
    return dict(value)


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
    # One loader process prepares the next batch (decoding and sampling inputs, tokenising) on
    # the second core while this one trains: 1.4x the step rate of loading in-line.
    "num_workers": 1,
    # The encoders are frozen: the loader worker encodes each input once, in the first epoch, into a
    # cache inside the run; later epochs read it (the same losses, without the encoders' per-step cost).
    "cache_features": "auto",
    "warmup_ratio": 0.05,
    "lora_r": 16,
    "lora_alpha": 32,
    "lora_dropout": 0.0,
    "max_length": 128,
    "log_every": 10,
    "eval_max_new_tokens": 4,
}


# -- loading --------------------------------------------------------------------------------------
def load_yaml(path: str | Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a directory") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise ConfigError(f"config file {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of options at the top level")
    return data


def in_file(where: str) -> str:
    return "" if where == "the command line" else f" in {where}"


def _did_you_mean(key: str) -> str:
    close = difflib.get_close_matches(key, sorted(FIELDS), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def set_dotted(values: dict[str, Any], key: str, value: Any, *, source: str = "--set") -> None:
    """``encoder_options.MODALITY.feature_layer = -2`` into ``values`` (nested mappings are merged,
    not replaced)."""
    parts = [p.strip() for p in key.split(".")]
    if any(not p for p in parts):
        raise ConfigError(f"{source} {key!r}: empty key part")
    node = values
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            where = ".".join(parts[: depth + 1])
            raise ConfigError(f"{source} {key!r}: {where} is {child!r}, not a mapping of options")
        else:
            child = node[part] = dict(child)  # a copy: never modify the caller's nested mapping
        node = child
    node[parts[-1]] = value


def resolve_config(yaml_path: str | Path | None, overrides: dict[str, Any]) -> TrainConfig:
    """Defaults < demo defaults (when no --llm) < YAML file < CLI overrides. Keys may be dotted
    (``encoder_options.MODALITY.feature_layer``). Unknown keys and every bad value are reported at
    once, each naming where it came from."""
    values: dict[str, Any] = {}
    origin: dict[str, str] = {}
    layers = []
    if yaml_path is not None:
        layers.append((str(yaml_path), load_yaml(yaml_path)))
    layers.append(("the command line", {k: v for k, v in overrides.items() if v is not None}))
    problems: list[tuple[str, str]] = []
    for where, layer in layers:
        for key, value in layer.items():
            if not isinstance(key, str):
                problems.append((str(key), f"{key!r} in {where}: option names are strings"))
                continue
            top = key.split(".", 1)[0].strip()
            if top not in FIELDS:
                problems.append((top, f"unknown option {top!r}{in_file(where)}{_did_you_mean(top)}"))
                continue
            if "." in key:
                set_dotted(values, key, value, source=where)
            else:
                values[top] = value
            origin[top] = where
    if values.get("llm") is None:
        values = {**DEMO_DEFAULTS, **values}
    try:
        config = TrainConfig(**{k: v for k, v in values.items() if k in FIELDS})
    except ConfigProblems as exc:
        problems += [(name, message + (f" (from {origin[name]})" if name in origin and yaml_path is not None else ""))
                     for name, message in exc.problems]
    if problems:
        raise ConfigProblems(problems)
    return config


def parse_assignments(items: list[str] | None) -> dict[str, Any]:
    """``--set key=value`` pairs; values are parsed as YAML (``3``, ``true``, ``1e-4``, ``[a, b]``);
    keys may be dotted (``encoder_options.MODALITY.feature_layer=-2``)."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        try:
            out[key.strip()] = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            reason = str(getattr(exc, "problem", None) or exc).strip()
            raise ConfigError(f"--set {item!r}: the value is not valid YAML ({reason}); quote it to pass a "
                              "string") from None
    return out


def save_config(config: TrainConfig, path: Path) -> None:
    from mmkit.atomic import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False))
