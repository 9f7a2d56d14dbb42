"""``mmkit bench --compare base.json``: the change of every figure two runs share, and which ones
got worse beyond a threshold."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import attrs

from mmkit.errors import ConfigError


@attrs.frozen
class Change:
    name: str
    base: float
    new: float
    unit: str
    higher_is_better: bool

    @property
    def change(self) -> float:
        """Relative change of the median, signed so that negative is worse."""
        if self.base == 0:
            return 0.0
        rel = self.new / self.base - 1.0
        return rel if self.higher_is_better else -rel


def load_report(path: str | Path, *, preset: str | None = None, quick: bool | None = None) -> dict[str, Any]:
    """An earlier ``--json`` report. With ``preset`` / ``quick``, the run about to be compared: a report
    made at another preset or in the other mode measured other work, so its figures are no baseline."""
    try:
        report = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"--compare {path}: no such file") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--compare {path}: not a readable JSON file: {exc}") from None
    if not isinstance(report, dict) or not isinstance(report.get("figures"), dict):
        raise ConfigError(f"--compare {path}: not an `mmkit bench --json` report (no 'figures' mapping)")
    mode = {True: "--quick", False: "a full run"}
    if preset is not None and report.get("preset") != preset:
        raise ConfigError(f"--compare {path}: that report measured --preset {report.get('preset')}, this run "
                          f"--preset {preset}; compare runs of one preset")
    if quick is not None and bool(report.get("quick")) != quick:
        raise ConfigError(f"--compare {path}: that report is {mode[bool(report.get('quick'))]}, this run "
                          f"{mode[quick]}; a smoke run's figures are no baseline for a measurement, or back")
    return report


def compare(base: dict[str, Any], new: dict[str, Any]) -> tuple[list[Change], list[str], list[str]]:
    """``(changes of shared compared figures, names only in base, names only in new)``. Figures
    marked ``"compare": false`` (time shares, padding: descriptions, not goals) are left out."""
    changes = []
    bf, nf = base["figures"], new["figures"]
    for name in sorted(set(bf) & set(nf)):
        b, n = bf[name], nf[name]
        if not (b.get("compare", True) and n.get("compare", True)):
            continue
        try:
            changes.append(Change(name, float(b["median"]), float(n["median"]), str(n.get("unit", "")),
                                  bool(n.get("higher_is_better", True))))
        except (KeyError, TypeError, ValueError):
            raise ConfigError(f"figure {name!r}: no numeric 'median' in one of the reports") from None
    return changes, sorted(set(bf) - set(nf)), sorted(set(nf) - set(bf))


def regressions(changes: list[Change], threshold: float) -> list[Change]:
    """Figures worse than ``threshold`` (0.2: 20% slower)."""
    return [c for c in changes if c.change < -threshold]
