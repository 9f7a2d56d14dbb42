"""Rich tables of an ``mmkit bench`` report and of a comparison with an earlier one."""

from __future__ import annotations

from typing import Any

from mmkit.bench.compare import Change

#: The step variants the bench measures, named as a user configures them.
CONFIGURATIONS = {"padded": "defaults", "online": "online", "cached": "cached", "packed": "packed",
                  "grouped": "grouped", "stock": "stock inputs"}
_ORDER = ("padded", "online", "cached", "packed", "grouped", "stock", "plain")


def _num(value: float, unit: str = "") -> str:
    if unit == "fraction":
        return f"{100 * value:.1f}%"
    if unit == "x":
        return f"{value:.2f}x"
    if unit == "FLOP/s":
        return f"{value / 1e9:,.1f} G"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def spread(fig: dict[str, Any]) -> str:
    unit = fig.get("unit", "")
    if fig.get("rounds", 1) <= 1:
        return _num(fig["median"], unit)
    return f"{_num(fig['median'], unit)} [{_num(fig['min'], unit)}-{_num(fig['max'], unit)}]"


def machine_line(report: dict[str, Any]) -> str:
    m = report["machine"]
    load = m.get("load_average")
    busy = ""
    if load and m.get("cpu_cores") and load[0] > 0.5 * m["cpu_cores"]:
        busy = " [yellow](machine busy: figures measured under contention)[/]"
    return (f"[bold]{m['device_name']}[/] ({m['device']}, {m['cpu_cores']} cores) | threads {m['threads']} | "
            f"torch {m['torch']} | matmul peak {m['peak_flops'] / 1e9:,.1f} GFLOP/s"
            f"{' (cached)' if m.get('peak_cached') else ' (measured now)'}"
            f"{' [yellow](measured on a busy machine: MFU overstated)[/]' if m.get('peak_measured_busy') else ''}"
            f" | load {load}{busy}")


def print_report(report: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    figs = report["figures"]
    console.print(f"mmkit bench --preset {report['preset']}{' --quick' if report.get('quick') else ''}: "
                  f"median \\[min-max] over rounds, {report['seconds']:.0f} s")
    console.print(machine_line(report))
    enc_keys = sorted({k.rsplit("/", 1)[0].split("/", 1)[1] for k in figs if k.startswith("encoder/")},
                      key=lambda k: (k.split("/")[0], k.split("/")[1], int(k.split("/")[2][2:])))
    if enc_keys:
        table = Table(title="encoders and projectors (random init, no grad)")
        for col in ("modality", "preset", "batch", "encoder inputs/s", "encoder tokens/s", "projector inputs/s",
                    "projector tokens/s"):
            table.add_column(col, justify="left" if col in ("modality", "preset") else "right")
        for key in enc_keys:
            modality, preset, batch = key.split("/")
            table.add_row(modality, preset, batch[2:], spread(figs[f"encoder/{key}/inputs_per_s"]),
                          spread(figs[f"encoder/{key}/tokens_per_s"]), spread(figs[f"projector/{key}/inputs_per_s"]),
                          spread(figs[f"projector/{key}/tokens_per_s"]))
        console.print(table)
    steps = sorted({tuple(k.split("/")[1:3]) for k in figs if k.startswith("step/")},
                   key=lambda pv: (pv[0], _ORDER.index(pv[1]) if pv[1] in _ORDER else 9))
    if steps:
        table = Table(title="training step")
        for col in ("preset", "variant", "samples/s", "real tokens/s", "ms/step", "padding"):
            table.add_column(col, justify="left" if col in ("preset", "variant") else "right")
        for preset, variant in steps:
            base = f"step/{preset}/{variant}"
            table.add_row(preset, variant if variant != "plain" else "plain LLaVA",
                          spread(figs[f"{base}/samples_per_s"]), spread(figs[f"{base}/tokens_per_s"]),
                          spread(figs[f"{base}/step_ms"]), _num(figs[f"{base}/padding"]["median"], "fraction"))
        console.print(table)
        phases = ("data", "encoders", "projectors", "llm_forward", "backward", "optimizer", "logging", "other")
        table = Table(title="where a step's time goes")
        for col in ("variant", "data", "enc", "proj", "LLM fwd", "bwd", "optim", "log", "other"):
            table.add_column(col, justify="left" if col == "variant" else "right")
        for preset, variant in steps:
            base = f"step/{preset}/{variant}"
            table.add_row(f"{preset}/{variant}", *(_num(figs[f"{base}/share/{p}"]["median"], "fraction")
                                                  for p in phases))
        console.print(table)
        _configurations_table(figs, steps, console)
        for preset in sorted({p for p, _ in steps}):
            mfu = figs.get(f"step/{preset}/padded/mfu")
            if mfu:
                console.print(f"step/{preset}: MFU {spread(mfu)} of the measured matmul peak "
                              f"({figs[f'step/{preset}/padded/model_flops_per_s']['median'] / 1e9:,.2f} GFLOP/s "
                              "of counted model FLOPs)")
    ratios = sorted(k for k in figs if k.startswith("ratio/"))
    if ratios:
        table = Table(title="ratios (interleaved rounds, same load; >1: the first is faster)")
        table.add_column("ratio")
        table.add_column("median \\[min-max]", justify="right")
        for k in ratios:
            table.add_row(k.removeprefix("ratio/"), spread(figs[k]))
        console.print(table)
    for note in report.get("notes", []):
        console.print(f"[yellow]note:[/] {note}")


def _configurations_table(figs: dict[str, Any], steps: list[tuple[str, str]], console: Any) -> None:
    """One row per configuration: its real tokens/s against the plain loop's (same rounds), and the
    step shares that explain the difference."""
    from rich.table import Table

    rows = [(p, v) for p, v in steps if f"ratio/{p}/{v}_vs_plain_tokens" in figs]
    if not rows:
        return
    table = Table(title="each configuration against the plain LLaVA-style loop: real tokens/s per wall and per "
                        "CPU second (online: no feature cache, encoding every step; cached: --cache-features DIR, "
                        "warm; packed/grouped: --batching; stock inputs: online with weight-free preprocessing "
                        "left to every forward)")
    for col in ("step", "vs plain", "CPU vs plain", "enc share", "data share"):
        table.add_column(col, justify="left" if col == "step" else "right")
    for preset, variant in rows:
        base = f"step/{preset}/{variant}"
        shares = (_num(figs[f"{base}/share/{p}"]["median"], "fraction") for p in ("encoders", "data"))
        table.add_row(f"{preset}/{CONFIGURATIONS.get(variant, variant)}",
                      spread(figs[f"ratio/{preset}/{variant}_vs_plain_tokens"]),
                      spread(figs.get(f"ratio/{preset}/{variant}_vs_plain_cpu") or {"median": float("nan")}), *shares)
    console.print(table)


def print_comparison(changes: list[Change], flagged: list[Change], only_base: list[str], only_new: list[str],
                     threshold: float, console: Any) -> None:
    from rich.table import Table

    table = Table(title=f"change against the base report (flagged: worse by more than {threshold:.0%})")
    for col in ("figure", "base", "now", "change", ""):
        table.add_column(col, justify="left" if col == "figure" else "right")
    bad = {c.name for c in flagged}
    for c in changes:
        mark = "[red]WORSE[/]" if c.name in bad else ""
        table.add_row(c.name, _num(c.base, c.unit), _num(c.new, c.unit), f"{100 * c.change:+.1f}%", mark)
    console.print(table)
    if only_base:
        console.print(f"only in the base report: {', '.join(only_base[:10])}{' ...' if len(only_base) > 10 else ''}")
    if only_new:
        console.print(f"new figures: {', '.join(only_new[:10])}{' ...' if len(only_new) > 10 else ''}")
