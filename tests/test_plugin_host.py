"""The plugin host: loading, isolation of broken plugins, validation, env switches, look-ups."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from mmkit import EncoderSpec, MarkerSpec, MetricSpec, ModalitySpec, ProjectorSpec, ReaderSpec, hookimpl, hookspecs
from mmkit.errors import PluginError
from mmkit.plugins import PluginHost


def modality(name: str, encoder: str | None = None, **kw) -> ModalitySpec:
    return ModalitySpec(name=name, data_keys=(name,), markers=MarkerSpec(f"<{name}>"), load=lambda path: path,
                        encoder=encoder or f"{name}_enc", **kw)


def encoder(name: str, for_modality: str) -> EncoderSpec:
    return EncoderSpec(name=name, modality=for_modality, build=lambda **kw: None)


class ModalityPlugin:
    """Registers one modality and its encoder."""

    def __init__(self, name: str):
        self.name = name

    @hookimpl
    def mmkit_modalities(self):
        return [modality(self.name)]

    @hookimpl
    def mmkit_encoders(self):
        return [encoder(f"{self.name}_enc", self.name)]


class MetricPlugin:
    def __init__(self, name: str = "good_metric"):
        self.name = name

    @hookimpl
    def mmkit_metrics(self):
        return [MetricSpec(name=self.name, compute=lambda predictions, references: {"score": 1.0})]


# -- loading and isolation ---------------------------------------------------------------------------
def test_plugin_raising_on_import_is_recorded_and_others_load(fake_entry_points):
    fake_entry_points.install(
        fake_entry_points.ep("bad", ImportError("No module named 'missing_dep'"), dist="mmkit-plugin-bad",
                             version="0.3"),
        fake_entry_points.ep("good", MetricPlugin()),
    )
    host = PluginHost()
    bad = host.records["bad"]
    assert (bad.status, bad.distribution, bad.version) == ("failed", "mmkit-plugin-bad", "0.3")
    assert bad.source == "entry point"
    assert bad.error == "import failed: ImportError: No module named 'missing_dep'"
    assert host.records["good"].status == "ok"
    assert host.records["good"].hooks == ["mmkit_metrics"]
    assert "good_metric" in host.metrics()
    assert any(p.startswith("bad (mmkit-plugin-bad): import failed") for p in host.check())


@pytest.mark.parametrize("stop", [KeyboardInterrupt(), SystemExit(3)])
def test_ctrl_c_or_exit_during_a_plugin_import_is_not_swallowed(fake_entry_points, stop):
    # Only errors are a plugin's failure to record; Ctrl-C (or a plugin exiting) stops the program.
    fake_entry_points.install(fake_entry_points.ep("stops", stop))
    with pytest.raises(type(stop)):
        PluginHost()


def test_failed_plugin_is_named_when_a_lookup_misses(fake_entry_points):
    fake_entry_points.install(fake_entry_points.ep("sonar", RuntimeError("boom")))
    with pytest.raises(PluginError, match=r"no modality named 'sonar'.*Failed plugins: sonar \(import failed"):
        PluginHost().modality("sonar")


def test_strict_env_makes_a_broken_plugin_fatal(fake_entry_points, monkeypatch):
    fake_entry_points.install(fake_entry_points.ep("bad", RuntimeError("boom")))
    monkeypatch.setenv("MMKIT_PLUGINS_STRICT", "1")
    with pytest.raises(PluginError, match=r"plugin 'bad' \(mmkit-plugin-bad\): import failed: RuntimeError: boom"):
        PluginHost()


@pytest.mark.parametrize(("allow", "block", "loaded"), [
    (None, None, {"a", "b"}),
    ("", None, set()),  # set but empty: load none
    ("b", None, {"b"}),
    (" a , b ", "a", {"b"}),
    (None, "a,zzz", {"b"}),
])
def test_allow_and_block_lists(fake_entry_points, monkeypatch, allow, block, loaded):
    eps = fake_entry_points.install(fake_entry_points.ep("a", MetricPlugin("metric_a")),
                                    fake_entry_points.ep("b", MetricPlugin("metric_b")))
    if allow is not None:
        monkeypatch.setenv("MMKIT_PLUGINS", allow)
    if block is not None:
        monkeypatch.setenv("MMKIT_BLOCK_PLUGINS", block)
    host = PluginHost()
    assert {r.name for r in host.records.values() if r.source == "entry point"} == loaded
    assert {ep.name for ep in eps if ep.loads} == loaded  # a skipped plugin is not even imported
    assert {f"metric_{n}" for n in loaded} <= set(host.metrics())


def test_editable_install_duplicates_are_loaded_once(fake_entry_points):
    plugin = MetricPlugin()
    first, second = fake_entry_points.install(fake_entry_points.ep("good", plugin),
                                              fake_entry_points.ep("good", plugin))
    host = PluginHost()
    assert first.loads + second.loads == 1
    assert host.records["good"].status == "ok"
    assert host.check() == []


def test_same_entry_point_name_from_two_distributions_is_reported(fake_entry_points):
    fake_entry_points.install(fake_entry_points.ep("sig", MetricPlugin("m1"), dist="mmkit-plugin-sig"),
                              fake_entry_points.ep("sig", MetricPlugin("m2"), dist="acme-sig"))
    host = PluginHost()
    assert host.records["sig"].distribution == "mmkit-plugin-sig"
    problems = host.check()
    assert any("acme-sig" in p and "already used by mmkit-plugin-sig" in p for p in problems), problems


def test_import_time_is_recorded(fake_entry_points):
    fake_entry_points.install(fake_entry_points.ep("good", MetricPlugin()))
    record = PluginHost().records["good"]
    assert record.import_ms >= 0
    assert record.as_dict()["import_ms"] == round(record.import_ms, 1)


# -- validation --------------------------------------------------------------------------------------
class Misspelled:
    @hookimpl
    def mmkit_modalitys(self):
        return [modality("typo")]


def test_misspelled_hook_is_reported_with_a_suggestion_and_unregistered(host):
    plugin = Misspelled()
    with pytest.raises(PluginError, match=r"unknown hook 'mmkit_modalitys' \(did you mean 'mmkit_modalities'\?\)"):
        host.register(plugin, name="typo")
    assert not host.pm.is_registered(plugin)
    assert host.records["typo"].status == "failed"
    assert "typo" not in host.modalities()


def test_misspelled_hook_from_an_entry_point_is_not_fatal(fake_entry_points):
    fake_entry_points.install(fake_entry_points.ep("typo", Misspelled()), fake_entry_points.ep("good", MetricPlugin()))
    host = PluginHost()
    assert host.records["typo"].status == "failed"
    assert "did you mean 'mmkit_modalities'" in host.records["typo"].error
    assert host.records["good"].status == "ok"
    # A second plugin with the same typo still gets the right suggestion, not its own typo back.
    host.pm.unregister(name="good")
    with pytest.raises(PluginError, match="did you mean 'mmkit_modalities'"):
        host.register(Misspelled(), name="typo2")


class ExtraArgument:
    @hookimpl
    def mmkit_lora_targets(self, model_type, temperature):
        return ["q_proj"]


def test_hookimpl_argument_not_in_the_spec_is_reported(host, fake_entry_points):
    with pytest.raises(PluginError, match=r"(?s)registration failed: .*temperature"):
        host.register(ExtraArgument(), name="extra")
    fake_entry_points.install(fake_entry_points.ep("extra", ExtraArgument()))
    loaded = PluginHost()
    assert loaded.records["extra"].status == "failed"
    assert "temperature" in loaded.records["extra"].error
    assert loaded.lora_targets("llama", []) != ["q_proj"]  # the bad plugin takes no part


def test_duplicate_modality_names_name_both_plugins(host):
    host.register(ModalityPlugin("sig"), name="first")
    host.register(ModalityPlugin("sig"), name="second")
    assert host.provider("modality", "sig") == "first"
    record = host.records["second"]
    assert record.status == "failed"
    assert "duplicate modality 'sig'" in record.error
    assert "'first'" in record.error and "'second'" in record.error
    assert any("second" in p and "duplicate modality 'sig'" in p for p in host.check())


def test_registration_hook_returning_the_wrong_type_fails_the_plugin(host):
    class WrongType:
        @hookimpl
        def mmkit_modalities(self):
            return [{"name": "sig"}]

        @hookimpl
        def mmkit_metrics(self):
            return [MetricSpec(name="wrong_type_metric", compute=lambda p, r: {})]

    host.register(WrongType(), name="wrong")
    host.register(MetricPlugin(), name="good")
    assert host.modalities() == {}
    assert "mmkit_modalities returned dict, expected ModalitySpec" in host.records["wrong"].error
    # Everything the failed plugin registered is dropped, not half of it.
    assert "wrong_type_metric" not in host.metrics() and "good_metric" in host.metrics()


def test_registration_hook_that_raises_fails_only_that_plugin(host):
    class Raises:
        @hookimpl
        def mmkit_encoders(self):
            raise RuntimeError("weights folder missing")

    host.register(Raises(), name="raises")
    host.register(ModalityPlugin("sig"), name="good")
    assert set(host.modalities()) == {"sig"}
    assert host.records["raises"].status == "failed"
    assert host.records["raises"].error == "mmkit_encoders failed: RuntimeError: weights folder missing"
    assert host.records["good"].status == "ok"


def test_strict_host_makes_registration_failures_fatal():
    strict = PluginHost(load_entrypoints=False, strict=True)

    class Raises:
        @hookimpl
        def mmkit_metrics(self):
            raise RuntimeError("boom")

    strict.register(Raises(), name="raises")
    with pytest.raises(PluginError, match="raises.*boom"):
        strict.metrics()


def test_readers_and_projectors_register_beside_the_builtins(host):
    class Extras:
        @hookimpl
        def mmkit_dataset_readers(self):
            return [ReaderSpec(name="sharegpt", read="mmkit.data.readers:read_generic")]

        @hookimpl
        def mmkit_projectors(self):
            return [ProjectorSpec(name="qformer", build="mmkit.modeling.projectors:MLPProjector")]

    class Clash:
        @hookimpl
        def mmkit_projectors(self):
            return [ProjectorSpec(name="mlp", build="mmkit.modeling.projectors:LinearProjector")]

    host.register(Extras(), name="extras")
    host.register(Clash(), name="clash")
    assert host.provider("reader", "sharegpt") == "extras"
    assert {"llava", "lamm", "generic", "sharegpt"} <= set(host.readers())
    assert host.provider("projector", "qformer") == "extras"
    # A built-in name cannot be taken over silently.
    assert host.provider("projector", "mlp") == "projectors"
    assert ("duplicate projector 'mlp': registered by plugin 'projectors' and by plugin 'clash'"
            in host.records["clash"].error)


# -- check() -----------------------------------------------------------------------------------------
def test_unsatisfied_mmkit_range_is_reported(fake_entry_points):
    fake_entry_points.install(
        fake_entry_points.ep("future", MetricPlugin("m1"), requires=["torch>=2", "mmkit>=0.2,<0.3"]),
        fake_entry_points.ep("current", MetricPlugin("m2"), requires=["mmkit>=0.1,<0.2"]),
        fake_entry_points.ep("extra_only", MetricPlugin("m3"), requires=['mmkit>=9; extra == "dev"']),
    )
    host = PluginHost()
    assert host.records["future"].requires_mmkit is not None
    assert host.records["extra_only"].requires_mmkit is None  # a marker-qualified requirement is not a range
    problems = host.check()
    assert len(problems) == 1, problems
    assert problems[0].startswith("future (mmkit-plugin-future): requires mmkit")
    assert ">=0.2" in problems[0] and "this is mmkit 0.1.0" in problems[0]


def test_dangling_references_are_reported(host):
    class Dangling:
        @hookimpl
        def mmkit_modalities(self):
            return [modality("sig", encoder="nowhere", projector="qformer")]

        @hookimpl
        def mmkit_encoders(self):
            return [encoder("orphan", "unknown_modality")]

    host.register(Dangling(), name="dangling")
    problems = host.check()
    assert "dangling: modality 'sig' names encoder 'nowhere', which is not registered" in problems
    assert "dangling: modality 'sig' names projector 'qformer', which is not registered" in problems
    assert "dangling: encoder 'orphan' is for unknown modality 'unknown_modality'" in problems


def test_consistent_plugin_passes_check(host):
    host.register(ModalityPlugin("sig"), name="sig")
    assert host.check() == []


def test_verify_lazy_resolves_string_references(host):
    class Lazy:
        @hookimpl
        def mmkit_metrics(self):
            return [MetricSpec(name="real", compute="mmkit.evaluation.metrics:accuracy"),
                    MetricSpec(name="ghost", compute="mmkit_no_such_module:compute")]

    host.register(Lazy(), name="lazy")
    assert host.check() == []  # check() imports nothing heavy, so it cannot see this
    problems = host.verify_lazy()
    assert len(problems) == 1
    assert problems[0].startswith("lazy: metric 'ghost'.compute -> 'mmkit_no_such_module:compute': ModuleNotFoundError")


def test_benchmarks_register_like_other_descriptors(host):
    from mmkit.specs import BenchmarkSpec

    class Bench:
        @hookimpl
        def mmkit_benchmarks(self):
            return [BenchmarkSpec(name="tiny_vqa", recipe="my_pkg:benchmarks/tiny_vqa.yaml", suites="demo")]

    host.register(Bench(), name="bench")
    spec = host.benchmark("tiny_vqa")
    assert spec.suites == ("demo",) and host.provider("benchmark", "tiny_vqa") == "bench"
    with pytest.raises(ValueError, match="package:path/in/package.yaml"):
        BenchmarkSpec(name="x", recipe="my_pkg.module:attribute")
    with pytest.raises(PluginError, match="no benchmark named 'nope'"):
        host.benchmark("nope")


def test_exporters_register_beside_the_builtins_and_accept_hyphens(host):
    from mmkit.specs import ExporterSpec

    class Onnx:
        @hookimpl
        def mmkit_exporters(self):
            return [ExporterSpec(name="onnx-runtime", export="my_pkg.export:to_onnx", check="my_pkg.export:why_not"),
                    ExporterSpec(name="peft", export="my_pkg.export:shadow")]  # a built-in's name

    host.register(Onnx(), name="onnx")
    assert set(host.exporters()) == {"merged", "peft"}  # the duplicate failed the plugin, built-ins kept
    assert "duplicate exporter 'peft'" in host.records["onnx"].error
    with pytest.raises(ValueError, match="lower-case letters, digits, '-' and '_'"):
        ExporterSpec(name="LLaVA HF", export="my_pkg.export:x")

    class Good:
        @hookimpl
        def mmkit_exporters(self):
            return [ExporterSpec(name="onnx-runtime", export="mmkit_no_such_module:export")]

    host.register(Good(), name="good")
    assert host.provider("exporter", "onnx-runtime") == "good"
    assert any("exporter 'onnx-runtime'.export -> 'mmkit_no_such_module:export'" in p for p in host.verify_lazy())


# -- call-time hooks ---------------------------------------------------------------------------------
LLAMA = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj", "lm_head"]


def test_lora_targets_defaults(host):
    assert host.lora_targets("llama", LLAMA) == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                 "down_proj"]
    assert host.lora_targets("gpt_neox", []) == ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]


def test_lora_targets_all_linear_fallback_for_unknown_architectures(host):
    names = ["backbone.layers.0.mixer.in_proj", "backbone.layers.0.mixer.out_proj", "backbone.layers.1.mixer.in_proj",
             "lm_head"]
    assert host.lora_targets("mamba", names) == ["in_proj", "out_proj"]
    with pytest.raises(PluginError, match="no plugin knows LoRA targets for model_type 'mamba'"):
        host.lora_targets("mamba", ["lm_head"])


def test_plugin_lora_targets_override_the_default(host):
    class Override:
        @hookimpl
        def mmkit_lora_targets(self, model_type):  # declares only what it uses
            return ["q_proj", "v_proj"] if model_type == "llama" else None

    host.register(Override(), name="override")
    assert host.lora_targets("llama", LLAMA) == ["q_proj", "v_proj"]
    # None means "not mine": the built-in table still answers.
    assert host.lora_targets("gpt_neox", []) == ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]


def test_mmkit_commands_adds_commands_and_a_failing_one_is_isolated(host):
    import typer
    from typer.testing import CliRunner

    class Commands:
        @hookimpl
        def mmkit_commands(self, app):
            sub = typer.Typer()

            @sub.command()
            def ping(name: str):
                typer.echo(f"pong {name}")

            app.add_typer(sub, name="sonar")

    class BrokenCommands:
        @hookimpl
        def mmkit_commands(self, app):
            raise RuntimeError("cannot add")

    host.register(Commands(), name="commands")
    host.register(BrokenCommands(), name="broken_commands")
    app = typer.Typer()

    @app.callback()
    def root() -> None:
        """Root."""

    host.add_commands(app)
    result = CliRunner().invoke(app, ["sonar", "ping", "x"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == "pong x"
    assert host.records["broken_commands"].status == "failed"
    assert "mmkit_commands failed: RuntimeError: cannot add" in host.records["broken_commands"].error


def test_trace_env_prints_every_hook_call(monkeypatch, capsys):
    monkeypatch.setenv("MMKIT_TRACE_HOOKS", "1")
    host = PluginHost(load_entrypoints=False)
    host.register(ModalityPlugin("sig"), name="sig_plugin")

    class Rest:  # the hooks no default plugin implements
        @hookimpl
        def mmkit_benchmarks(self):
            return []

        @hookimpl
        def mmkit_commands(self, app):
            pass

    host.register(Rest(), name="rest")
    host.lora_targets("llama", [])
    host.registry  # noqa: B018 - runs the registration hooks
    import typer

    host.add_commands(typer.Typer())
    err = capsys.readouterr().err
    specs = [name for name, f in vars(hookspecs).items() if inspect.isfunction(f) and hasattr(f, "mmkit_spec")]
    assert [name for name in specs if f"{name} [hook]" not in err] == []


def test_registration_hooks_are_called_in_pluggy_order_and_names_kept_in_registration_order(host):
    calls = []

    def plugin(name, metric, **opts):
        class Plugin:
            @hookimpl(**opts)
            def mmkit_metrics(self):
                calls.append(name)
                return [MetricSpec(name=metric, compute=lambda predictions, references: {})]

        return Plugin()

    host.register(plugin("a", "shared"), name="a")
    host.register(plugin("b", "shared", tryfirst=True), name="b")
    host.register(plugin("c", "own"), name="c")
    host.register(plugin("d", "last", trylast=True), name="d")
    metrics = host.metrics()
    # tryfirst is called first, then the last registered, trylast at the end (pluggy's order) ...
    assert calls == ["b", "c", "a", "d"]
    # ... and a name stays with the plugin that registered it first: the later one fails, named
    assert {"own", "last"} <= set(metrics) and host.provider("metric", "shared") == "a"
    assert host.records["b"].status == "failed"
    assert "duplicate metric 'shared': registered by plugin 'a' and by plugin 'b'" in host.records["b"].error


def test_a_hook_wrapper_runs_around_each_plugins_registration_and_sees_its_failure(host):
    seen = []

    class Wrapper:
        @hookimpl(wrapper=True)
        def mmkit_modalities(self):
            try:
                specs = yield
            except RuntimeError as exc:
                seen.append(f"failed: {exc}")
                raise
            seen.append([s.name for result in specs for s in result])
            # a wrapper may change what is registered: here it hides one modality
            return [[s for s in result if s.name != "hidden"] for result in specs]

    class Raises:
        @hookimpl
        def mmkit_modalities(self):
            raise RuntimeError("no config")

    host.register(Wrapper(), name="wrapper")
    host.register(ModalityPlugin("sig"), name="sig_plugin")
    host.register(ModalityPlugin("hidden"), name="hidden_plugin")
    host.register(Raises(), name="raises")
    assert set(host.modalities()) == {"sig"}
    assert sorted(map(str, seen)) == ["['hidden']", "['sig']", "failed: no config"]
    assert host.records["raises"].error == "mmkit_modalities failed: RuntimeError: no config"
    assert host.records["wrapper"].status == "ok" and host.records["wrapper"].hooks == ["mmkit_modalities"]


def test_any_object_can_be_a_plugin(host):
    @hookimpl
    def mmkit_metrics():
        return [MetricSpec(name="from_namespace", compute=lambda predictions, references: {})]

    import types

    host.register(types.SimpleNamespace(mmkit_metrics=mmkit_metrics), name="ns")  # unhashable
    host.register(MetricPlugin(), name="other")
    assert {"from_namespace", "good_metric"} <= set(host.metrics())


def test_lookup_and_load_errors_are_types(host):
    from mmkit.errors import NotRegisteredError, PluginLoadError

    with pytest.raises(NotRegisteredError, match="no encoder named 'nope'"):
        host.encoder("nope")

    class Misspelled:
        @hookimpl
        def mmkit_modalitys(self):
            return []

    with pytest.raises(PluginLoadError, match="did you mean 'mmkit_modalities'"):
        host.register(Misspelled(), name="misspelled")


def test_every_hook_spec_is_exercised_here():
    source = Path(__file__).read_text()
    specs = [name for name, f in vars(hookspecs).items() if inspect.isfunction(f) and hasattr(f, "mmkit_spec")]
    assert len(specs) >= 7
    assert [name for name in specs if f"def {name}(" not in source] == []
