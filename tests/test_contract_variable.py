"""Contract 1.1: inputs of any size. The graph plugin (tests/plugins/mmkit_plugin_graph_gin: GIN on
torch-geometric, one token per node) passes the contract suite as a third-party plugin would; the
encoder checks, the projectors on ragged features, token counts through assembly, validation and
inspection."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("torch_geometric")

import mmkit_plugin_graph_gin  # noqa: E402  (tests/plugins, on the pytest pythonpath)
from mmkit_plugin_graph_gin.demo import make_graph  # noqa: E402
from mmkit_plugin_graph_gin.encoder import GINEncoder  # noqa: E402
from mmkit_plugin_graph_gin.io import write_graph  # noqa: E402
from torch_geometric.nn import GINConv  # noqa: E402

from mmkit.errors import PluginError  # noqa: E402
from mmkit.modeling import ModalityEncoder  # noqa: E402
from mmkit.modeling.components import build_encoder, build_projector, check_encoders  # noqa: E402
from mmkit.modeling.encoder import encode_items, is_variable, tokens_per_input  # noqa: E402
from mmkit.modeling.features import RaggedFeatures, move  # noqa: E402
from mmkit.modeling.projectors import LinearProjector, MLPProjector, ResamplerProjector  # noqa: E402
from mmkit.plugins import PluginHost  # noqa: E402
from mmkit.testing import ModalityContract  # noqa: E402


def graph_host() -> PluginHost:
    host = PluginHost(load_entrypoints=False)
    host.register(mmkit_plugin_graph_gin)
    return host


def graph_files(root: Path, sizes=(("ring", 4), ("star", 7), ("ring", 9))) -> list[Path]:
    rng = np.random.default_rng(0)
    return [write_graph(root / f"{kind}{n}.json", *make_graph(kind, n, rng)) for kind, n in sizes]


# -- the graph plugin passes the contract suite ----------------------------------------------------------
class TestGraphContract(ModalityContract):
    modality = "graph"
    separability_threshold = 0.8  # rings vs stars from a frozen random GIN (chance 0.5)
    probe_max_records = 80

    @pytest.fixture(scope="class")
    @classmethod
    def host(cls):
        return graph_host()

    def make_valid_files(self, tmp_path: Path) -> list[Path]:
        return graph_files(tmp_path)

    def make_invalid_files(self, tmp_path: Path) -> dict[str, Path]:
        cases = {
            "not JSON": "nodes: 3",
            "no edge_index": '{"x": [[1, 2, 3, 4]]}',
            "no nodes": '{"x": [], "edge_index": [[], []]}',
            "NaN features": '{"x": [[1, 2, 3, NaN]], "edge_index": [[], []]}',
            "edge to a missing node": '{"x": [[1, 2, 3, 4]], "edge_index": [[0], [5]]}',
            "fractional node number": '{"x": [[1, 2, 3, 4], [1, 1, 1, 1]], "edge_index": [[0.5], [1]]}',
        }
        paths = {}
        for i, (name, text) in enumerate(cases.items()):
            paths[name] = tmp_path / f"bad{i}.json"
            paths[name].write_text(text)
        return paths


# -- what the contract catches ----------------------------------------------------------------------------
class _PlainGIN(GINEncoder):
    """The natural first attempt: GINConv with plain Linear layers. Its fp32 ``eps`` buffer promotes the
    sum to fp32 in front of bf16 weights once DeepSpeed has cast the parameters."""

    def __init__(self, config):
        super().__init__(config)
        hidden = self.output_dim
        dims = [self.in_dim] + [hidden] * int(config.get("num_layers", 2))
        self.convs = nn.ModuleList(
            GINConv(nn.Sequential(nn.Linear(a, hidden), nn.ReLU(), nn.Linear(hidden, hidden)), eps=0.1)
            for a in dims[:-1])


def test_the_mixed_precision_check_catches_a_fp32_buffer_meeting_bf16_weights(tmp_path: Path):
    from mmkit_plugin_graph_gin.io import load_graph

    files = graph_files(tmp_path)
    spec = graph_host().modality("graph")
    contract = TestGraphContract()
    plain = _PlainGIN.build(in_dim=4, hidden=16, num_layers=2)
    assert plain.convs[0].eps.dtype == torch.float32 and "eps" in dict(plain.convs[0].named_buffers())
    with pytest.raises(pytest.fail.Exception, match="bf16 parameters and fp32 buffers failed"):
        contract.test_mixed_precision_forward(spec, plain, files)
    fixed = GINEncoder.build(in_dim=4, hidden=16, num_layers=2)
    contract.test_mixed_precision_forward(spec, fixed, files)  # the plugin's own Linear casts its input
    # and the batch move keeps integer leaves: node 257 stays 257 under a bf16 cast (bf16 rounds it to 256)
    big = fixed.preprocess(load_graph(write_graph(tmp_path / "big.json", *make_graph("ring", 300, np.random.default_rng(1)))))
    moved = move(fixed.collate([big]), "cpu", torch.bfloat16)
    assert moved.edge_index.dtype == torch.long and int(moved.edge_index.max()) == 299
    assert moved.x.dtype == torch.bfloat16


def test_a_variable_encoder_that_breaks_its_announcement_is_named(tmp_path: Path):
    host = graph_host()
    encoder = build_encoder(host, host.modality("graph"))
    items = [encoder.preprocess({"x": np.ones((n, 4), np.float32), "edge_index": np.zeros((2, 0), np.int64)})
             for n in (3, 5)]
    out = encode_items(encoder, items)
    assert isinstance(out, RaggedFeatures) and out.counts == (3, 5) and is_variable(encoder)
    with pytest.raises(PluginError, match=r"plugin mmkit_plugin_graph_gin, modality graph, encoder gin: encode returned "
                                          r"\[3, 5\] tokens per input, num_tokens_for announced \[3, 4\]"):
        encoder(encoder.collate(items), counts=[3, 4])

    class Padded(GINEncoder):  # returns a padded tensor although it declares a variable count
        def forward(self, batch):
            return super().forward(batch).padded()[0]

    class WrongDim(GINEncoder):
        def forward(self, batch):
            return super().forward(batch).map(lambda v: v[:, :3])

    class Dropped(GINEncoder):  # forgets an input
        def forward(self, batch):
            out = super().forward(batch)
            return RaggedFeatures(out.values[: out.counts[0]], out.counts[:1])

    batch = encoder.collate(items)
    with pytest.raises(PluginError, match=r"encode returned a Tensor of shape \[2, 5, 16\]; an encoder with "
                                          r"num_tokens=None .* returns RaggedFeatures"):
        Padded.build(in_dim=4, hidden=16)(batch)
    with pytest.raises(PluginError, match="features of dim 3, declared output_dim=16"):
        WrongDim.build(in_dim=4, hidden=16)(batch)
    with pytest.raises(PluginError, match="token counts for 1 input\\(s\\) for a batch of 2"):
        Dropped.build(in_dim=4, hidden=16)(batch)


def test_the_factory_checks_what_a_variable_encoder_must_implement():
    from mmkit import hookimpl
    from mmkit.specs import EncoderSpec

    class NoCount(GINEncoder):
        num_tokens_for = ModalityEncoder.num_tokens_for

    class NoBlank(GINEncoder):
        blank = ModalityEncoder.blank

    class Zero(GINEncoder):
        num_tokens = 0

    class Plugin:
        @hookimpl
        def mmkit_encoders(self):
            return [EncoderSpec(name=n, modality="graph", build=c.build, tiny={"in_dim": 4})
                    for n, c in (("nocount", NoCount), ("noblank", NoBlank), ("zero", Zero))]

    host = graph_host()
    host.register(Plugin(), name="broken")
    spec = host.modality("graph")
    with pytest.raises(PluginError, match="num_tokens is None .* does not implement num_tokens_for"):
        build_encoder(host, spec, encoder_name="nocount")
    with pytest.raises(PluginError, match="input_shape is None .* does not implement blank"):
        build_encoder(host, spec, encoder_name="noblank")
    with pytest.raises(PluginError, match="num_tokens must be a positive int, or None"):
        build_encoder(host, spec, encoder_name="zero")
    problems = check_encoders(host)  # `plugins check --deep`: the graph encoder itself is fine
    assert len(problems) == 3 and not any("encoder gin:" in p or "encoder gin " in p for p in problems)


def test_blank_defaults_and_the_1_0_name():
    class Fixed(ModalityEncoder):
        num_tokens, output_dim, input_shape = 2, 3, (4,)

    class OwnBlank(Fixed):  # a 1.0 plugin overriding blank_input: the core's blank() uses it
        def blank_input(self, batch_size=1):
            return torch.ones(batch_size, 4)

    assert torch.equal(Fixed().blank(3), torch.zeros(3, 4)) and torch.equal(Fixed().blank_input(2), torch.zeros(2, 4))
    assert torch.equal(OwnBlank().blank(2), torch.ones(2, 4))
    assert torch.equal(Fixed().collate([torch.zeros(4), torch.ones(4)]), torch.stack([torch.zeros(4), torch.ones(4)]))
    assert Fixed().num_tokens_for(torch.zeros(4)) == 2 and not is_variable(Fixed())
    graph = GINEncoder.build(in_dim=4, hidden=8)
    blank = graph.blank(3)
    assert blank.num_graphs == 3 and graph.num_tokens_for(graph.collate([graph.preprocess(
        {"x": np.ones((6, 4), np.float32), "edge_index": np.zeros((2, 0), np.int64)})])) == 6
    assert graph(blank).counts == (1, 1, 1)


# -- projectors on ragged features ----------------------------------------------------------------------------
def ragged(counts=(2, 5, 1), dim=6, seed=0, separators=False) -> RaggedFeatures:
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(sum(counts), dim, generator=g)
    seps = None
    if separators:
        seps = torch.zeros(sum(counts), dtype=torch.bool)
        seps[[1, 6]] = True
    return RaggedFeatures(values, counts, seps)


def test_token_wise_projectors_map_rows_and_place_a_learned_separator():
    torch.manual_seed(0)
    feats = ragged(separators=True)
    for cls in (LinearProjector, MLPProjector):
        plain = cls(in_dim=6, out_dim=8, num_tokens=None)
        assert plain.num_output_tokens is None and "separator" not in dict(plain.named_parameters())
        out = plain(feats)
        assert out.counts == feats.counts and torch.allclose(out.values, plain(feats.values))
        withsep = cls(in_dim=6, out_dim=8, num_tokens=None, separator=True)
        out = withsep(feats)
        assert torch.equal(out.values[1], withsep.separator.detach()) and torch.equal(out.values[6], withsep.separator.detach())
        rows = [i for i in range(8) if i not in (1, 6)]
        assert torch.allclose(out.values[rows], withsep.map_rows(feats.values)[rows])
        out.values.sum().backward()
        assert withsep.separator.grad is not None and float(withsep.separator.grad.abs().sum()) > 0
    # a fixed encoder's projector is what it was: same state keys, an int count, tensors in and out
    fixed = LinearProjector(in_dim=6, out_dim=8, num_tokens=4)
    assert fixed.num_output_tokens == 4 and sorted(fixed.state_dict()) == ["proj.bias", "proj.weight"]
    assert fixed(torch.zeros(2, 4, 6)).shape == (2, 4, 8)
    assert sorted(MLPProjector(in_dim=6, out_dim=8, num_tokens=4).state_dict()) == [
        "mlp.0.bias", "mlp.0.weight", "mlp.2.bias", "mlp.2.weight"]


def test_the_resampler_masks_padding_so_each_input_resamples_as_alone():
    torch.manual_seed(0)
    resampler = ResamplerProjector(in_dim=6, out_dim=16, num_tokens=None, num_queries=3).eval()
    feats = ragged()
    with torch.no_grad():
        together = resampler(feats)
        alone = torch.cat([resampler(RaggedFeatures(rows, [len(rows)])) for rows in feats.split()])
        dense = torch.cat([resampler(rows.unsqueeze(0)) for rows in feats.split()])  # the 1.0 tensor path
    assert together.shape == (3, 3, 16)
    assert torch.allclose(together, alone, atol=1e-5) and torch.allclose(together, dense, atol=1e-5)
    with torch.no_grad():  # an input with no rows at all still gives finite tokens
        empty = resampler(RaggedFeatures(torch.randn(2, 6), [0, 2]))
    assert bool(empty.isfinite().all())


def test_tokens_per_input_and_the_assembler_choice_of_separator():
    host = graph_host()
    encoder = build_encoder(host, host.modality("graph"))
    item = encoder.preprocess({"x": np.ones((7, 4), np.float32), "edge_index": np.zeros((2, 0), np.int64)})
    mlp = build_projector(host, "mlp", in_dim=encoder.output_dim, out_dim=8, num_tokens=encoder.num_tokens)
    resampler = build_projector(host, "resampler", in_dim=encoder.output_dim, out_dim=8, num_tokens=None,
                                options={"num_queries": 5})
    assert tokens_per_input(encoder, mlp, item) == 7 and tokens_per_input(encoder, resampler, item) == 5
    assert "separator" in dict(build_projector(host, "linear", in_dim=4, out_dim=8, num_tokens=None,
                                               separator=True).named_parameters())

    def no_separator(*, in_dim, out_dim, num_tokens):
        return LinearProjector(in_dim=in_dim, out_dim=out_dim, num_tokens=num_tokens)

    from mmkit import hookimpl
    from mmkit.specs import ProjectorSpec

    class Plugin:
        @hookimpl
        def mmkit_projectors(self):
            return [ProjectorSpec(name="old", build=no_separator)]

    host.register(Plugin(), name="old_projector")
    with pytest.raises(PluginError, match="projector 'old' does not take separator=True"):
        build_projector(host, "old", in_dim=4, out_dim=8, num_tokens=None, separator=True)

    class Liar:
        @hookimpl
        def mmkit_projectors(self):
            return [ProjectorSpec(name="liar", build=lambda *, in_dim, out_dim, num_tokens: LinearProjector(
                in_dim=in_dim, out_dim=out_dim, num_tokens=None))]

    host.register(Liar(), name="liar_projector")
    with pytest.raises(PluginError, match="num_output_tokens is None for an encoder of a fixed 3 tokens"):
        build_projector(host, "liar", in_dim=4, out_dim=8, num_tokens=3)


# -- through assembly, validation and inspection ----------------------------------------------------------
@pytest.fixture
def graph_data(tmp_path: Path) -> tuple[Path, list[Path]]:
    import json

    files = graph_files(tmp_path, (("ring", 4), ("star", 9)))
    records = [{"id": f"g{i}", "graph": f.name, "conversations": [
        {"from": "human", "value": "<graph>\nIs this graph a ring or a star?"},
        {"from": "gpt", "value": f.stem.rstrip("0123456789")}]} for i, f in enumerate(files)]
    data = tmp_path / "train.json"
    data.write_text(json.dumps(records))
    return data, files


def test_assembly_validation_and_inspect_count_each_graphs_nodes(graph_data, tiny_llm, monkeypatch):
    from mmkit.data.inspect import inspect_record, iter_records
    from mmkit.data.validate import InputTokenCounter, PromptLengths, validate
    from mmkit.modeling.assemble import ModalityChoice, ModelConfig, assemble
    from mmkit.plugins import set_host

    data, _ = graph_data
    host = graph_host()
    set_host(host)  # the validator's preprocess check and counter resolve the installed host
    assembled = assemble(ModelConfig(llm=str(tiny_llm()), modalities=(ModalityChoice("graph"),), lora=None), host)
    assert assembled.components["graph"]["tokens_per_input"] is None
    assert assembled.prompts.variable_modalities == ("graph",)
    projector = assembled.model.projectors["graph"]
    assert projector.num_output_tokens is None
    samples = list(iter_records(host, [str(data)], ["graph"]))
    counter = InputTokenCounter(["graph"], host)
    assert [counter(s) for s in samples] == [{"graph": [4]}, {"graph": [9]}]
    encoded = [assembled.prompts.encode_sample(s, counter(s)) for s in samples]
    placeholder = assembled.tokenizer.convert_tokens_to_ids("<graph>")
    assert [e.input_ids.count(placeholder) for e in encoded] == [4, 9]

    entry = inspect_record(assembled.prompts, samples[1], counter)
    assert entry["slots"] == {"graph": [9]} and entry["tokens"] == len(encoded[1].input_ids)
    assert entry["prompt_tokens"] < entry["tokens"]  # the inference prompt holds the graph's 9 slots too

    short = len(encoded[0].input_ids)
    prompts = copy.copy(assembled.prompts)
    prompts.max_length = short  # the ring fits exactly; the star's 5 more nodes do not
    report = validate([data], host=host, modalities=["graph"], lengths=PromptLengths(prompts, counter))
    too_long = [i for i in report.errors if i.kind == "too_long"]
    assert [i.id for i in too_long] == ["g1"] and "(1 graph x 9)" in too_long[0].reason
    assert report.files[0].ok == 1


def test_the_graph_demo_builds_and_varies_in_size(tmp_path: Path):
    from mmkit_plugin_graph_gin.demo import build_demo

    task = build_demo(tmp_path, seed=0)
    assert task.answers == ("ring", "star") and len(task.train) == 120 and len(task.test) == 40
    host = graph_host()
    encoder = build_encoder(host, host.modality("graph"))
    from mmkit_plugin_graph_gin.io import load_graph

    counts = {encoder.num_tokens_for(encoder.preprocess(load_graph(tmp_path / r["graph"]))) for r in task.train[:40]}
    assert len(counts) >= 4 and min(counts) >= 4 and max(counts) <= 9


def test_data_cli_shows_and_checks_each_graphs_token_count(graph_data, tiny_llm, monkeypatch):
    """``mmkit data inspect`` prints the slots of each input (the graph's node count) and ``mmkit data
    validate`` measures the real length with them."""
    import json

    from typer.testing import CliRunner

    from mmkit.plugins import set_host
    from mmkit_cli.main import _register_commands, app

    data, _ = graph_data
    set_host(graph_host())
    monkeypatch.setenv("COLUMNS", "200")
    _register_commands()
    runner = CliRunner()
    shown = runner.invoke(app, ["data", "inspect", str(data), "--llm", str(tiny_llm()), "--json"])
    assert shown.exit_code == 0, shown.output + repr(shown.exception)
    entries = [json.loads(line) for line in shown.output.splitlines() if line.startswith("{")]
    assert [e["slots"] for e in entries] == [{"graph": [4]}, {"graph": [9]}]
    text = runner.invoke(app, ["data", "inspect", str(data), "--llm", str(tiny_llm())])
    assert text.exit_code == 0 and "slots per input: graph: [9]" in text.output
    limit = entries[0]["tokens"]  # the ring fits exactly, the star's 5 more nodes do not
    checked = runner.invoke(app, ["data", "validate", str(data), "--llm", str(tiny_llm()), "--max-length", str(limit),
                                  "--json"])
    assert checked.exit_code == 1, checked.output
    report = json.loads(checked.output)
    bad = [r for r in report["records"] if r["status"] == "error"]
    assert [r["id"] for r in bad] == ["g1"] and bad[0]["issues"][0]["kind"] == "too_long", json.dumps(bad)
    assert "(1 graph x 9)" in bad[0]["issues"][0]["reason"]
    # a graph file that cannot be read is reported once, by the file check (counting it is skipped)
    records = json.loads(data.read_text())
    (data.parent / "broken.json").write_text('{"x": [[1, 2, 3, 4]], "edge_index": [[0], [7]]}')
    records.append({**records[0], "id": "g2", "graph": "broken.json"})
    data.write_text(json.dumps(records))
    checked = runner.invoke(app, ["data", "validate", str(data), "--llm", str(tiny_llm()), "--json"])
    report = json.loads(checked.output)
    bad = {r["id"]: [i["kind"] for i in r["issues"]] for r in report["records"] if r["status"] == "error"}
    assert bad == {"g2": ["corrupt_file"]}, bad


def test_dry_run_reports_a_variable_token_count(tiny_llm, tmp_path: Path, capsys):
    from mmkit.training.config import resolve_config
    from mmkit.training.dry_run import dry_run, print_report

    host = graph_host()
    report = dry_run(resolve_config(None, {"llm": str(tiny_llm()), "modalities": "graph",
                                           "output_dir": str(tmp_path / "run")}), host)
    assert report["tokens_per_sample"]["per_input"] == {"graph": None}
    print_report(report)
    assert "graph (varies per input) LLM tokens per input" in " ".join(capsys.readouterr().out.split())
