"""Find the reader for each data file and read samples, with weighted mixtures."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from pathlib import Path

import attrs

from mmkit.data.readers import iter_raw_records
from mmkit.data.records import ReadContext, Sample
from mmkit.errors import DataError
from mmkit.plugins import PluginHost
from mmkit.specs import resolve


@attrs.frozen
class DataSource:
    path: Path
    weight: float = 1.0

    @classmethod
    def parse(cls, text: str) -> DataSource:
        """``file.json`` or ``file.json:0.5`` (a mixture weight: the share of the file's records used
        per epoch; above 1 repeats records)."""
        head, sep, tail = text.rpartition(":")
        if sep and head:
            try:
                return cls(Path(head), float(tail))
            except ValueError:
                pass
        return cls(Path(text))


def pick_reader(host: PluginHost, path: Path, name: str | None) -> str:
    if name is not None:
        host.reader(name)
        return name
    first = next((obj for _, obj in iter_raw_records(path)), None)
    for reader_name, spec in host.readers().items():
        if spec.detect is not None and resolve(spec.detect)(path, first):
            return reader_name
    raise DataError(str(path), None, "no reader recognises this file; pass --data-format "
                                     f"({', '.join(host.readers())})")


def iter_samples(host: PluginHost, path: Path, ctx: ReadContext, reader: str | None = None) -> Iterator[Sample]:
    name = pick_reader(host, path, reader)
    yield from resolve(host.reader(name).read)(path, context=ctx)


def read_mixture(host: PluginHost, sources: Sequence[DataSource], ctx: ReadContext, *, reader: str | None = None,
                 seed: int = 0) -> list[Sample]:
    """All samples of a weighted mixture: each file contributes ``weight x its size`` records."""
    rng = random.Random(seed)
    out: list[Sample] = []
    for source in sources:
        samples = list(iter_samples(host, source.path, ctx, reader))
        if not samples:
            raise DataError(str(source.path), None, "no records")
        whole, frac = divmod(source.weight, 1.0)
        picked = samples * int(whole) + rng.sample(samples, round(frac * len(samples)))
        out.extend(picked)
    return out
