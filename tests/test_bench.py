"""``mmkit bench``: statistics, the comparison logic, the plain LLaVA-style baseline's equivalence
with mmkit's step, and one quick smoke run of every figure. Nothing here asserts a speed."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from mmkit import EncoderSpec, MarkerSpec, ModalitySpec, hookimpl
from mmkit.bench.compare import compare, load_report, regressions
from mmkit.bench.stats import Stat, interleaved, ratio
from mmkit.errors import ConfigError
from mmkit.plugins import PluginHost, set_host


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    # the matmul peak is cached per machine; tests keep theirs out of the user's cache directory
    monkeypatch.delenv("MMKIT_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "bench-cache"))


def _app():
    import typer

    from mmkit_cli import bench_cmd

    app = typer.Typer()
    app.callback()(lambda: None)  # a group, so the command is called as `bench`
    bench_cmd.register(app)
    return app


# -- statistics and comparison ------------------------------------------------------------------
def test_stat_summarises_rounds_and_ratios_pair_rounds():
    s = Stat([3.0, 1.0, 2.0, 10.0], "items/s")
    assert (s.median, s.min, s.max) == (2.5, 1.0, 10.0)
    assert s.to_dict()["rounds"] == 4
    r = ratio([2.0, 6.0, 3.0], [1.0, 3.0, 3.0])
    assert r.values == (2.0, 2.0, 1.0) and r.unit == "x"


def test_interleaved_alternates_the_functions_round_by_round():
    order: list[str] = []
    out = interleaved({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, {"a": 2, "b": 1},
                      rounds=3, min_seconds=0.0, warmup=0)
    assert order == ["a", "b"] * 3
    assert len(out["a"]) == len(out["b"]) == 3 and all(v > 0 for v in out["a"])


def _report(**figures: tuple[float, bool] | tuple[float, bool, bool]) -> dict[str, Any]:
    figs = {}
    for name, spec in figures.items():
        value, higher = spec[0], spec[1]
        figs[name.replace("__", "/")] = {"median": value, "min": value, "max": value, "unit": "items/s",
                                         "higher_is_better": higher,
                                         "compare": spec[2] if len(spec) > 2 else True}
    return {"format": "mmkit-bench/1", "figures": figs}


def test_compare_flags_only_what_got_worse_beyond_the_threshold():
    base = _report(enc__a=(100.0, True), enc__b=(100.0, True), step__ms=(50.0, False), share__x=(0.2, False, False),
                   gone=(1.0, True))
    new = _report(enc__a=(70.0, True), enc__b=(85.0, True), step__ms=(70.0, False), share__x=(0.9, False, False),
                  fresh=(1.0, True))
    changes, only_base, only_new = compare(base, new)
    by_name = {c.name: c for c in changes}
    assert set(by_name) == {"enc/a", "enc/b", "step/ms"}  # shares are descriptions, not compared
    assert by_name["enc/a"].change == pytest.approx(-0.30)
    assert by_name["step/ms"].change == pytest.approx(-0.40)  # lower is better: 50 -> 70 ms is worse
    assert [c.name for c in regressions(changes, 0.2)] == ["enc/a", "step/ms"]
    assert [c.name for c in regressions(changes, 0.5)] == []
    assert only_base == ["gone"] and only_new == ["fresh"]


def test_compare_rejects_a_file_that_is_not_a_report(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"benchmarks": []}')
    with pytest.raises(ConfigError, match="no 'figures'"):
        load_report(bad)
    with pytest.raises(ConfigError, match="no such file"):
        load_report(tmp_path / "missing.json")
    result = CliRunner().invoke(_app(), ["bench", "--compare", str(bad)])
    assert result.exit_code != 0 and "figures" in str(result.exception or result.output)


# -- a third-party modality, measured with no change, and a deliberately slowed encoder ---------
SLEEP = {"seconds": 0.0}


def _sleepy_encoder(*, pretrained=None, width: int = 8, tokens: int = 4):
    import torch

    from mmkit.modeling.encoder import ModalityEncoder

    class Sleepy(ModalityEncoder):
        def __init__(self):
            super().__init__()
            self.num_tokens, self.output_dim, self.input_shape = tokens, width, (tokens, width)
            self.proj = torch.nn.Linear(width, width)

        def forward(self, x):
            if SLEEP["seconds"]:
                time.sleep(SLEEP["seconds"])
            return self.proj(x)

        def preprocess(self, raw):
            return torch.as_tensor(raw, dtype=torch.float32)

        def identity(self):
            return {"class": "sleepy"}

    return Sleepy()


class SleepyPlugin:
    @hookimpl
    def mmkit_modalities(self):
        return [ModalitySpec(name="sleepy", data_keys=("sleepy",), markers=MarkerSpec("<sleepy>"),
                             load="json:loads", encoder="sleepy_enc")]

    @hookimpl
    def mmkit_encoders(self):
        return [EncoderSpec(name="sleepy_enc", modality="sleepy", build=_sleepy_encoder,
                            presets={"wide": {"width": 32, "tokens": 8}})]


@pytest.fixture
def sleepy_host():
    host = PluginHost(load_entrypoints=False)
    host.register(SleepyPlugin(), name="sleepy-plugin")
    set_host(host)
    SLEEP["seconds"] = 0.0
    yield host
    SLEEP["seconds"] = 0.0


def test_compare_refuses_a_report_of_another_preset_or_mode(tmp_path):
    report = tmp_path / "full.json"
    report.write_text(json.dumps({"preset": "tiny", "quick": False, "figures": {}}))
    assert load_report(report, preset="tiny", quick=False)["preset"] == "tiny"
    with pytest.raises(ConfigError, match="a full run, this run --quick"):
        load_report(report, preset="tiny", quick=True)
    with pytest.raises(ConfigError, match="--preset tiny, this run --preset small"):
        load_report(report, preset="small", quick=False)
    result = CliRunner().invoke(_app(), ["bench", "--quick", "--compare", str(report)])
    assert result.exit_code != 0 and "no baseline" in str(result.exception or result.output)


def test_compare_flags_a_deliberately_slowed_encoder(sleepy_host, tmp_path):
    runner = CliRunner()
    base = tmp_path / "base.json"
    result = runner.invoke(_app(), ["bench", "--modalities", "sleepy", "--quick", "--json", str(base)])
    assert result.exit_code == 0, result.output
    report = json.loads(base.read_text())
    assert "encoder/sleepy/demo/bs2/inputs_per_s" in report["figures"]
    assert "no training-step figures" in " ".join(report["notes"])  # no demo task: the step is skipped, said so
    SLEEP["seconds"] = 0.05  # ~1000x the Linear layer's time: no machine noise comes near
    result = runner.invoke(_app(), ["bench", "--modalities", "sleepy", "--quick", "--compare", str(base)])
    assert result.exit_code == 1, result.output
    assert "encoder/sleepy/demo/bs2/inputs_per_s" in result.output and "WORSE" in result.output


def test_real_preset_builds_the_plugins_named_presets(sleepy_host):
    from mmkit.bench import suite

    report = suite.run("real", modalities=["sleepy"], quick=True)
    keys = [k for k in report["figures"] if k.startswith("encoder/sleepy/")]
    assert keys and all(k.startswith("encoder/sleepy/wide/") for k in keys)
    assert report["figures"]["encoder/sleepy/wide/bs2/tokens_per_s"]["median"] == pytest.approx(
        8 * report["figures"]["encoder/sleepy/wide/bs2/inputs_per_s"]["median"])


# -- the plain loop is the same computation ----------------------------------------------------
def test_plain_llava_loop_computes_mmkits_loss_on_the_same_batch(mm_host, tmp_path):
    import torch

    from mmkit.bench import step as st
    from mmkit.data.batching import model_inputs

    rig = st.build_rig("demo", tmp_path, modalities=["image", "pointcloud"], host=mm_host, max_samples=24)
    st.add_variant(rig, "padded")
    st.add_variant(rig, "online", cache_features=None)  # encode every step, as the plain loop does
    st.add_plain(rig)
    assert st.online(rig) == "online"
    dataset = rig.variants["online"].loader.dataset
    items = [dataset[i] for i in range(12)]
    assert {m for item in items for m in item["inputs"]} == {"image", "pointcloud"}
    model = rig.assembled.model.eval()
    with torch.no_grad():
        batch = rig.variants["online"].loader.collate_fn(items)
        mmkit_loss = model(**model_inputs(batch, rig.dev)).loss
        plain_batch = rig.plain.collate(items)
        plain_loss = rig.plain.loss(plain_batch)
    # one slot per input in the plain batch, the same spliced sequences and token counts
    assert plain_batch["input_ids"].shape[1] < batch.input_ids.shape[1]
    assert plain_batch["num_tokens"] == batch.num_tokens
    assert plain_loss.item() == pytest.approx(mmkit_loss.item(), rel=1e-5)
    # the plain loop hands the point-cloud encoder bare points, which it samples and groups in every forward
    # (a stock PointNet++); mmkit's items carry the grouping preprocess computed
    pcl = rig.assembled.model.encoders["pointcloud"]
    assert plain_batch["inputs"]["pointcloud"].shape[1:] == (pcl.cfg.num_points, pcl.cfg.in_channels)
    assert torch.equal(batch.inputs["pointcloud"].points, plain_batch["inputs"]["pointcloud"])
    assert batch.inputs["pointcloud"].neighbours[0].dtype == torch.long
    # the bench's "stock" variant: mmkit's step fed the same bare points, other modalities untouched
    assert set(st.stock_encoders(rig)) == {"pointcloud"}
    image = batch.inputs["image"]
    (stock,) = st.StockInputs([batch], st.stock_encoders(rig))
    assert torch.equal(stock.inputs["pointcloud"], plain_batch["inputs"]["pointcloud"])
    assert stock.inputs["image"] is image


# -- every figure, once, through the CLI ----------------------------------------------------------
def test_quick_tiny_bench_writes_every_figure(tmp_path, mm_host):
    set_host(mm_host)
    out = tmp_path / "out.json"
    result = CliRunner().invoke(_app(), ["bench", "--preset", "tiny", "--quick", "--json", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    figs = report["figures"]
    assert report["machine"]["peak_flops"] > 0 and report["machine"]["threads"] == 1
    for m in mm_host.modalities():
        for what in ("encoder", "projector"):
            for unit in ("inputs_per_s", "tokens_per_s"):
                assert figs[f"{what}/{m}/demo/bs2/{unit}"]["median"] > 0
        assert figs[f"ratio/{m}/wrapped_vs_raw_encoder"]["median"] > 0
    for variant in ("padded", "online", "cached", "packed", "grouped", "stock", "plain"):
        assert figs[f"step/demo/{variant}/samples_per_s"]["median"] > 0
        assert figs[f"step/demo/{variant}/tokens_per_s"]["median"] > 0
        assert figs[f"step/demo/{variant}/cpu_ms"]["median"] > 0
        shares = [figs[f"step/demo/{variant}/share/{p}"]["median"]
                  for p in ("data", "encoders", "projectors", "llm_forward", "backward", "optimizer", "logging",
                            "other")]
        assert sum(shares) == pytest.approx(1.0)
    assert figs["step/demo/cached/share/encoders"]["median"] == 0.0  # cached features: no encoder in the step
    assert figs["step/demo/online/share/encoders"]["median"] > 0  # the defaults cache features; online encodes
    assert 0 < figs["step/demo/padded/mfu"]["median"] < 1
    for name in ("mmkit_vs_plain", "cached_vs_online", "cached_vs_plain", "packed_vs_padded", "grouped_vs_padded",
                 *(f"{v}_vs_plain_{unit}" for v in ("padded", "online", "cached", "packed", "grouped")
                   for unit in ("tokens", "cpu"))):
        assert figs[f"ratio/demo/{name}"]["median"] > 0
    # the point-cloud encoder offers stock inputs (grouping left to forward): the same step on those, in the same run
    assert figs["ratio/demo/preprocessed_vs_stock_inputs"]["median"] > 0
    assert figs["ratio/demo/preprocessed_vs_stock_inputs_cpu"]["median"] > 0
    assert figs["step/demo/stock/share/encoders"]["median"] > 0
    # the padded variant sees the plain loop's batches: the same real tokens, so both ratios agree
    assert figs["ratio/demo/padded_vs_plain_tokens"]["median"] == pytest.approx(
        figs["ratio/demo/mmkit_vs_plain"]["median"])
    # the same batches: the plain loop sees mmkit's real tokens and padding
    assert figs["step/demo/plain/padding"]["median"] == pytest.approx(figs["step/demo/online/padding"]["median"])
    for word in ("training step", "where a step's time goes", "MFU", "mmkit_vs_plain", "matmul peak",
                 "each configuration against"):
        assert word in result.output


def test_pytest_benchmark_suite_runs_once_in_smoke_mode():
    # the suite outside tests/ must not rot: every benchmark once, untimed
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", "--benchmark-disable",
                           "-p", "no:cacheprovider", str(root / "benchmarks" / "test_throughput.py")],
                          cwd=root, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert " passed" in done.stdout


def test_matmul_peak_is_measured_once_and_a_busy_measurement_is_redone_when_quiet(monkeypatch, tmp_path):
    import torch

    from mmkit.bench import machine

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    measured = iter([5e9, 9e9, 7e9])
    calls = []
    monkeypatch.setattr(machine, "measure_peak", lambda dev, dtype: calls.append(1) or next(measured))
    monkeypatch.setattr(machine, "machine_busy", lambda: True)
    cpu = torch.device("cpu")
    first = machine.matmul_peak(cpu)
    assert (first["flops"], first["cached"], first["busy"]) == (5e9, False, True)
    assert machine.matmul_peak(cpu)["cached"] and len(calls) == 1  # busy still: keep the cached figure
    monkeypatch.setattr(machine, "machine_busy", lambda: False)
    quiet = machine.matmul_peak(cpu)
    assert (quiet["flops"], quiet["cached"], quiet["busy"]) == (9e9, False, False) and len(calls) == 2
    again = machine.matmul_peak(cpu)
    assert again["cached"] and again["flops"] == 9e9 and len(calls) == 2
    assert machine.matmul_peak(cpu, refresh=True)["flops"] == 9e9  # a lower re-measurement keeps the best
    assert (tmp_path / "mmkit" / machine.PEAK_FILE).is_file()


def test_variable_size_modality_is_timed_on_its_demo_inputs():
    from mmkit.bench import suite
    from mmkit.bench.components import _inputs, components, demo_items
    from mmkit.plugins import get_host

    report = suite.run("tiny", modalities=["video"], quick=True)
    notes = " ".join(report["notes"])
    assert "video: variable-size inputs" in notes and "the demo's inputs" in notes, notes
    assert report["figures"]["encoder/video/demo/bs2/inputs_per_s"]["inputs"] == "demo"
    # the demo's clips (3-8 frames), not one-frame blanks: the encoder gets more tokens per input
    c = components(get_host(), "video", batch_size=4)
    with tempfile.TemporaryDirectory() as tmp:
        items = demo_items(get_host(), "video", c.encoder, 4, Path(tmp))
    assert len(items) == 4
    demo = c.encoder(_inputs(c.encoder, 4, torch.device("cpu"), torch.float32, items))
    blank = c.encoder(_inputs(c.encoder, 4, torch.device("cpu"), torch.float32))
    assert sum(demo.counts) > sum(blank.counts)


def test_one_cache_folder_for_what_mmkit_builds_or_measures_once(monkeypatch, tmp_path):
    from mmkit.bench import machine
    from mmkit.cache import cache_root

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "mmkit" == machine.cache_dir()
    monkeypatch.setenv("MMKIT_CACHE", str(tmp_path / "mine"))  # mmkit's own variable wins
    assert cache_root() == tmp_path / "mine" == machine.cache_dir()
    monkeypatch.delenv("MMKIT_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "mmkit"
