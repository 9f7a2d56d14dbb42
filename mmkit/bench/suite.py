"""``mmkit bench``: every figure of one preset, measured in one run, as a JSON-ready report.

Presets (sizes and thread counts are the ones training uses):

- ``tiny``: the encoders the demo trains (projected to the demo LLM's width) and the demo's
  training step at the demo's thread count, with every ratio: mmkit vs the plain LLaVA-style loop,
  cached vs online features, packed and grouped vs padded, wrapped encoder vs the raw modules;
- ``small``: the training step with a ~110M-parameter LLM (32,000-token vocabulary) vs the plain loop;
- ``real``: each encoder's realistic presets from its plugin (``EncoderSpec.presets``), projected to
  a 7B LLM's width, and the ``small`` step.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch

from mmkit.bench.report import CONFIGURATIONS
from mmkit.bench.stats import Stat

FORMAT = "mmkit-bench/1"
PRESETS = ("tiny", "small", "real")


@attrs.frozen
class Plan:
    rounds: int
    min_seconds: float
    batch_sizes: tuple[int, ...]
    steps: int  # optimizer steps per round and variant (the first is not counted)
    max_samples: int | None
    small_steps: int


def plan_for(preset: str, quick: bool) -> Plan:
    if quick:  # CI smoke: every figure once, tiny sizes
        return Plan(rounds=1, min_seconds=0.01, batch_sizes=(2,), steps=2, max_samples=48, small_steps=2)
    if preset == "real":
        return Plan(rounds=3, min_seconds=0.5, batch_sizes=(1, 4), steps=4, max_samples=256, small_steps=3)
    if preset == "small":  # compute-bound steps of a ~110M LLM: about a second each on a CPU; 3 rounds swung 1.1x-1.3x
        return Plan(rounds=6, min_seconds=0.2, batch_sizes=(1, 8, 32), steps=3, max_samples=256, small_steps=3)
    return Plan(rounds=5, min_seconds=0.2, batch_sizes=(1, 8, 32), steps=8, max_samples=512, small_steps=3)


class Figures:
    """Named figures; ``compare=False`` for descriptions (time shares, padding) that are not goals."""

    def __init__(self) -> None:
        self.data: dict[str, dict[str, Any]] = {}

    def add(self, name: str, stat: Stat, *, compare: bool = True, **extra: Any) -> None:
        self.data[name] = {**stat.to_dict(), "compare": compare, **extra}


def run(preset: str = "tiny", *, modalities: Sequence[str] | None = None, quick: bool = False,
        progress: Callable[[str], None] = lambda _msg: None, host: Any = None) -> dict[str, Any]:
    from mmkit.bench.machine import machine_info, matmul_peak
    from mmkit.plugins import get_host
    from mmkit.training.config import DEMO_DEFAULTS

    if preset not in PRESETS:
        from mmkit.errors import ConfigError

        raise ConfigError(f"--preset {preset!r}: use one of {', '.join(PRESETS)}")
    host = host or get_host()
    chosen = tuple(modalities or host.modalities())
    for m in chosen:
        host.modality(m)  # a clear error naming the installed modalities
    plan = plan_for(preset, quick)
    started = time.perf_counter()
    threads_before = torch.get_num_threads()
    figures = Figures()
    notes: list[str] = []
    from mmkit.modeling.loading import device

    dev = device()
    try:
        if preset == "tiny":
            torch.set_num_threads(int(DEMO_DEFAULTS["num_threads"]))
        progress(f"matmul peak at {torch.get_num_threads()} thread(s)")
        peak = matmul_peak(dev)
        machine = machine_info(dev)
        machine["peak_flops"] = peak["flops"]
        machine["peak_cached"] = peak["cached"]
        machine["peak_measured_busy"] = peak["busy"]
        with tempfile.TemporaryDirectory(prefix="mmkit-bench-") as tmp:
            root = Path(tmp)
            if preset in ("tiny", "real"):
                _encoders(preset, plan, host, chosen, dev, figures, progress)
            step_preset = "demo" if preset == "tiny" else "small"
            demo_modalities = tuple(m for m in chosen if host.modality(m).demo is not None)
            # The plain LLaVA-style loop the step is measured against stacks fixed-size inputs: the
            # step figures leave a variable-size modality (contract 1.1) out, and the notes say so.
            variable = tuple(m for m in demo_modalities if _variable_size(host, m))
            if variable:
                notes.append(f"{', '.join(variable)}: variable-size inputs; their encoder and projector rows time "
                             "the demo's inputs (the first of its training set, cycled to each batch size), and the "
                             "training-step figures leave them out (the plain LLaVA-style loop they compare with "
                             "stacks fixed-size inputs)")
                demo_modalities = tuple(m for m in demo_modalities if m not in variable)
            if not demo_modalities:
                what = "a demo task with fixed-size inputs" if variable else "a demo task"
                notes.append(f"no chosen modality has {what}: no training-step figures")
            else:
                _step(step_preset, plan, host, demo_modalities, root, figures, peak["flops"], progress, full=preset == "tiny")
    finally:
        torch.set_num_threads(threads_before)
    return {"format": FORMAT, "preset": preset, "quick": quick, "modalities": list(chosen), "machine": machine,
            "seconds": time.perf_counter() - started, "notes": notes, "figures": figures.data}


def _encoders(preset: str, plan: Plan, host: Any, chosen: Sequence[str], dev: torch.device, figures: Figures,
              progress: Callable[[str], None]) -> None:
    from mmkit.bench.components import bench_components, wrapper_overhead

    hidden = 64 if preset == "tiny" else 4096  # the demo LLM's width; a 7B LLM's
    # realistic sizes on a GPU run in bf16, as they would be trained; CPUs and the tiny preset in fp32
    dtype = torch.bfloat16 if preset == "real" and dev.type == "cuda" else torch.float32
    for m in chosen:
        if preset == "tiny":
            presets: list[str | None] = [None]
        else:
            presets = list(host.encoder(host.modality(m).encoder).presets) or [None]
        for p in presets:
            label = p or "demo"
            progress(f"{m} encoder ({label}) and projector")
            rows = bench_components(host, m, batch_sizes=plan.batch_sizes, hidden=hidden, rounds=plan.rounds,
                                    min_seconds=plan.min_seconds, preset=p, device=dev, dtype=dtype)
            for r in rows:
                key = f"{m}/{label}/bs{r['batch_size']}"
                info = {"encoder": r["encoder"], "projector": r["projector"], "hidden": hidden, "dtype": r["dtype"],
                        "inputs": r["inputs"]}
                figures.add(f"encoder/{key}/inputs_per_s", r["encoder_inputs_per_s"], **info)
                figures.add(f"encoder/{key}/tokens_per_s", r["encoder_tokens_per_s"], **info)
                figures.add(f"projector/{key}/inputs_per_s", r["projector_inputs_per_s"], **info)
                figures.add(f"projector/{key}/tokens_per_s", r["projector_tokens_per_s"], **info)
        if preset == "tiny":
            size = max(plan.batch_sizes)
            figures.add(f"ratio/{m}/wrapped_vs_raw_encoder",
                        wrapper_overhead(host, m, batch_size=size, hidden=hidden, rounds=plan.rounds,
                                         min_seconds=plan.min_seconds), batch_size=size)


def _variable_size(host: Any, modality: str) -> bool:
    """Whether the modality's demo encoder has a token count per input (``num_tokens is None``)."""
    from mmkit.modeling.components import build_encoder
    from mmkit.modeling.encoder import is_variable

    return is_variable(build_encoder(host, host.modality(modality)))


def _step(preset: str, plan: Plan, host: Any, modalities: tuple[str, ...], root: Path, figures: Figures,
          peak: float, progress: Callable[[str], None], *, full: bool) -> None:
    """The training step of ``preset``: every variant and the plain loop, measured in interleaved
    rounds, then their figures and their ratios to the plain loop."""
    from mmkit.bench import step as st

    rig, variants, counts, flops = _measure_steps(preset, plan, host, modalities, root, progress, full=full)
    recs = {name: rig.variants[name].rec for name in variants}
    recs["plain"] = rig.plain_rec
    per_round = {name: st.round_figures(rec, counts[name]) for name, rec in recs.items()}
    _step_figures(figures, preset, rig, per_round, recs, counts, peak, flops)
    _step_ratios(figures, preset, rig, variants, per_round, full=full)


def _measure_steps(preset: str, plan: Plan, host: Any, modalities: tuple[str, ...], root: Path,
                   progress: Callable[[str], None], *, full: bool
                   ) -> tuple[Any, list[str], dict[str, int], tuple[float, int]]:
    """Build the rig (data, model, engine per variant, the plain loop), count one padded step's FLOPs
    and padded slots, and run the rounds."""
    from mmkit.bench import step as st

    progress(f"training step ({preset} preset): building data, model and engine")
    rig = st.build_rig(preset, root, modalities=modalities, host=host, max_samples=plan.max_samples)
    st.add_variant(rig, "padded")
    variants = ["padded"]
    if rig.cfg.cache_features:  # the defaults cache features: also measure encoding every step (the plain loop's way)
        st.add_variant(rig, "online", cache_features=None)
        variants.append("online")
    if full:
        progress("filling the feature cache for the cached variant")
        st.add_variant(rig, "cached", cache_features=str(root / "feature_cache"))
        st.add_variant(rig, "packed", batching="packed")
        st.add_variant(rig, "grouped", batching="grouped")
        variants += ["cached", "packed", "grouped"]
        if st.stock_encoders(rig):  # an encoder moved weight-free work into preprocess: measure what it bought
            st.add_stock(rig)
            variants.append("stock")
    st.add_plain(rig)
    steps = plan.steps if preset == "demo" else plan.small_steps
    # a packed step holds several times the samples of a padded one: fewer steps, similar time
    counts = {name: max(2, (steps + 1) // 2) if name == "packed" else steps for name in [*variants, "plain"]}
    flops = st.step_flops(rig)
    order = [*variants, "plain"]
    for r in range(plan.rounds):
        progress(f"training step ({preset}): round {r + 1} of {plan.rounds}")
        # the order rotates each round: no variant always runs first, or always right after the same
        # one (a burst of load, or a previous loader's leftover work, then hits every variant alike)
        for name in order[r % len(order):] + order[:r % len(order)]:
            if name == "plain":
                st.run_plain(rig, steps)
            else:
                st.run_variant(rig, name, counts[name])
    rig.log.close()
    return rig, variants, counts, flops


def _step_figures(figures: Figures, preset: str, rig: Any, per_round: dict[str, list[dict[str, float]]],
                  recs: dict[str, Any], counts: dict[str, int], peak: float, step_flops: tuple[float, int]) -> None:
    """Throughput, step time, padding and phase shares of each variant; MFU of the padded one."""
    from mmkit.bench import step as st

    flops, slots = step_flops
    base = f"step/{preset}"
    info = {"micro_batch_size": rig.cfg.micro_batch_size, "threads": torch.get_num_threads(),
            "llm_params": sum(p.numel() for p in rig.assembled.model.llm.parameters())}
    for name, rounds in per_round.items():
        figures.add(f"{base}/{name}/samples_per_s", Stat([x["samples_per_s"] for x in rounds], "samples/s"), **info,
                    steps_per_round=counts[name] - 1)
        figures.add(f"{base}/{name}/tokens_per_s", Stat([x["tokens_per_s"] for x in rounds], "tokens/s"), **info)
        figures.add(f"{base}/{name}/step_ms", Stat([1e3 * x["step_s"] for x in rounds], "ms", higher_is_better=False))
        figures.add(f"{base}/{name}/cpu_ms", Stat([1e3 * x["cpu_step_s"] for x in rounds], "ms", higher_is_better=False),
                    what="the training process's CPU time per step (loader workers excluded)")
        figures.add(f"{base}/{name}/padding", Stat([x["padding"] for x in rounds], "fraction", higher_is_better=False),
                    compare=False)
        for phase, share in st.phase_shares(recs[name], counts[name]).items():
            figures.add(f"{base}/{name}/share/{phase}", Stat([share], "fraction", higher_is_better=False),
                        compare=False)
    # MFU: counted FLOPs per padded slot x slots/s of the padded variant, against the measured peak
    per_slot = flops / max(slots, 1)
    figures.add(f"{base}/padded/mfu", Stat([per_slot * x["slots_per_s"] / peak for x in per_round["padded"]],
                                           "fraction"), flops_per_slot=per_slot, peak_flops=peak)
    figures.add(f"{base}/padded/model_flops_per_s",
                Stat([per_slot * x["slots_per_s"] for x in per_round["padded"]], "FLOP/s"))



def _step_ratios(figures: Figures, preset: str, rig: Any, variants: list[str],
                 per_round: dict[str, list[dict[str, float]]], *, full: bool) -> None:
    """Each variant against the plain loop (and cached/online, packed/grouped against padded),
    ratios of rounds measured side by side."""
    from mmkit.bench import step as st
    from mmkit.bench.stats import ratio

    def series(name: str, key: str) -> list[float]:
        return [x[key] for x in per_round[name]]

    figures.add(f"ratio/{preset}/mmkit_vs_plain", ratio(series("padded", "samples_per_s"), series("plain", "samples_per_s")),
                what="samples/s of mmkit's default step over the plain LLaVA-style loop, same batches")
    # one row per configuration against the same baseline: what each one buys (real tokens/s, the
    # figure that counts packed and grouped batches fairly)
    for name in variants:
        figures.add(f"ratio/{preset}/{name}_vs_plain_tokens", ratio(series(name, "tokens_per_s"),
                                                                    series("plain", "tokens_per_s")),
                    what=f"real tokens/s of mmkit's {CONFIGURATIONS.get(name, name)} step over the plain loop's")
        figures.add(f"ratio/{preset}/{name}_vs_plain_cpu", ratio(series(name, "cpu_tokens_per_s"),
                                                                 series("plain", "cpu_tokens_per_s")),
                    what="the same in real tokens per CPU-second of the training process: steadier than wall "
                         "time on a shared machine, blind to waiting for data")
    if full:
        figures.add(f"ratio/{preset}/cached_vs_online", ratio(series("cached", "samples_per_s"),
                                                                series(st.online(rig), "samples_per_s")))
        figures.add(f"ratio/{preset}/cached_vs_plain", ratio(series("cached", "samples_per_s"),
                                                               series("plain", "samples_per_s")))
        if "stock" in variants:
            for unit, key in (("", "tokens_per_s"), ("_cpu", "cpu_tokens_per_s")):
                figures.add(f"ratio/{preset}/preprocessed_vs_stock_inputs{unit}",
                            ratio(series(st.online(rig), key), series("stock", key)),
                            what="the default step over the same step fed the encoders' stock inputs (the "
                                 "weight-free work their preprocess does, done in every forward instead)")
        for name in ("packed", "grouped"):
            figures.add(f"ratio/{preset}/{name}_vs_padded", ratio(series(name, "tokens_per_s"),
                                                                    series("padded", "tokens_per_s")),
                        what="real (non-padding) tokens/s")
