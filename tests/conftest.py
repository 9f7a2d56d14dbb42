"""Shared fixtures. Tests build their own hosts; nothing here depends on which plugins are installed."""

from __future__ import annotations

import importlib.metadata
import textwrap
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest

from mmkit.plugins import ENTRY_POINT_GROUP, PluginHost, set_host

_ENV_SWITCHES = ("MMKIT_PLUGINS", "MMKIT_BLOCK_PLUGINS", "MMKIT_PLUGINS_STRICT", "MMKIT_TRACE_HOOKS")


@pytest.fixture(autouse=True)
def _isolated_plugin_state(monkeypatch: pytest.MonkeyPatch):
    """No plugin env switch leaks in from the caller's shell, and no process-wide host leaks out."""
    for name in _ENV_SWITCHES:
        monkeypatch.delenv(name, raising=False)
    set_host(None)
    yield
    set_host(None)


@pytest.fixture
def host() -> PluginHost:
    """A host with only mmkit's default plugins; register test plugins with ``host.register``."""
    return PluginHost(load_entrypoints=False)


class FakeDist:
    """The parts of ``importlib.metadata.Distribution`` the host reads."""

    def __init__(self, name: str, version: str = "1.0", requires: Iterable[str] = ()):
        self.metadata = {"Name": name}
        self.version = version
        self.requires = list(requires)


class FakeEntryPoint:
    """An ``mmkit`` entry point whose ``load()`` returns ``plugin`` (or raises it, if an exception)."""

    group = ENTRY_POINT_GROUP

    def __init__(self, name: str, plugin: Any, dist: FakeDist | None = None):
        self.name = name
        self.value = f"fake_{name}"
        self.dist = dist if dist is not None else FakeDist(f"mmkit-plugin-{name}")
        self._plugin = plugin
        self.loads = 0

    def load(self) -> Any:
        self.loads += 1
        if isinstance(self._plugin, BaseException):
            raise self._plugin
        return self._plugin


class EntryPointFaker:
    """Makes ``importlib.metadata.entry_points(group="mmkit")`` return chosen fake entry points."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self._monkeypatch = monkeypatch

    @staticmethod
    def ep(name: str, plugin: Any, *, dist: str | None = None, version: str = "1.0",
           requires: Iterable[str] = ()) -> FakeEntryPoint:
        return FakeEntryPoint(name, plugin, FakeDist(dist or f"mmkit-plugin-{name}", version, requires))

    def install(self, *eps: FakeEntryPoint) -> list[FakeEntryPoint]:
        real = importlib.metadata.entry_points

        def entry_points(**params: Any) -> Any:
            if params.get("group") == ENTRY_POINT_GROUP:
                return list(eps)
            return real(**params)

        self._monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
        return list(eps)


@pytest.fixture
def fake_entry_points(monkeypatch: pytest.MonkeyPatch) -> EntryPointFaker:
    """``fake_entry_points.install(fake_entry_points.ep("x", plugin), ...)``: the ``mmkit`` group
    then holds exactly those entry points (the plugin may be an exception, raised on load)."""
    return EntryPointFaker(monkeypatch)


@pytest.fixture
def make_distribution(tmp_path: Path) -> Callable[..., Path]:
    """Write a real installed distribution (package + ``.dist-info``) under a folder to put on
    ``sys.path`` / ``PYTHONPATH``; returns that folder. ``code`` is the plugin module's source."""
    site = tmp_path / "site"

    def make(name: str, code: str, *, version: str = "0.1", requires: Iterable[str] = ("mmkit>=0.1,<0.2",)) -> Path:
        package = f"mmkit_plugin_{name}"
        (site / package).mkdir(parents=True)
        (site / package / "__init__.py").write_text(textwrap.dedent(code))
        info = site / f"{package}-{version}.dist-info"
        info.mkdir()
        lines = ["Metadata-Version: 2.1", f"Name: mmkit-plugin-{name}", f"Version: {version}"]
        lines += [f"Requires-Dist: {req}" for req in requires]
        (info / "METADATA").write_text("\n".join(lines) + "\n")
        (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\n{name} = {package}\n")
        return site

    return make


# -- core model fixtures (prompt, assembly, LoRA routing, persistence, training tests) -----------------
#: Words the tiny test tokenizers know: every text the model tests put into a conversation.
TEST_CORPUS = (
    "What is shown here ? Which shape is it ? Describe the input . What digit is shown ? "
    "a cube sphere cone torus red blue green digit 0 1 2 3 4 5 6 7 8 9 hello world yes no "
    "and then more please compare the two what about this one it is user assistant system"
)


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """Tiny tensors: thread hand-offs cost far more than the arithmetic on a small shared box."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def mm_host() -> PluginHost:
    """A host with the installed plugins (entry points), built without any MMKIT_* switch."""
    with pytest.MonkeyPatch.context() as mp:
        for name in _ENV_SWITCHES:
            mp.delenv(name, raising=False)
        host = PluginHost()
    missing = {"image", "pointcloud"} - set(host.modalities())
    if missing:
        pytest.skip(f"the {sorted(missing)} plugin(s) are not installed (pip install -e plugins/image "
                    "plugins/pointcloud)")
    return host


@pytest.fixture(scope="session")
def tiny_llm(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``tiny_llm(architecture="llama", hidden_size=32)`` -> a saved tiny causal LM directory
    (built once per session per argument set, loaded by tests through ``from_pretrained``)."""
    from mmkit.demo.llm import build_tiny_llm

    built: dict[tuple, Path] = {}

    def make(architecture: str = "llama", hidden_size: int = 32, num_layers: int = 1) -> Path:
        key = (architecture, hidden_size, num_layers)
        if key not in built:
            out = tmp_path_factory.mktemp(f"llm_{architecture}_{hidden_size}_{num_layers}")
            built[key] = build_tiny_llm(out, [TEST_CORPUS], architecture=architecture, hidden_size=hidden_size,
                                        num_layers=num_layers, num_heads=2)
        return built[key]

    return make


@pytest.fixture
def assemble_model(mm_host: PluginHost, tiny_llm: Callable[..., Path]) -> Callable[..., Any]:
    """``assemble_model(("image", "pointcloud"), architecture="llama", mode="per_modality")``: an
    assembled tiny model on the installed plugins' tiny random-init encoders (seeded torch)."""
    import torch

    from mmkit.modeling.assemble import ModalityChoice, ModelConfig, assemble
    from mmkit.modeling.lora import LoraSettings

    def make(modalities=("image", "pointcloud"), *, architecture: str = "llama", mode: str = "per_modality",
             lora: bool = True, llm: str | None = None, seed: int = 0, **config: Any) -> Any:
        torch.manual_seed(seed)
        settings = LoraSettings(r=4, alpha=8, dropout=0.0, mode=mode) if lora else None
        cfg = ModelConfig(llm=llm or str(tiny_llm(architecture)),
                          modalities=tuple(ModalityChoice(m) for m in modalities), lora=settings, **config)
        return assemble(cfg, mm_host)

    return make


@pytest.fixture(scope="session")
def input_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    """A few real input files per modality: RGB PNG images and N x 3 ``.npy`` point clouds."""
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    files: dict[str, list[Path]] = {"image": [], "pointcloud": []}
    for i in range(3):
        img = root / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, size=(12, 12, 3), dtype=np.uint8)).save(img)
        files["image"].append(img)
        pcl = root / f"pcl{i}.npy"
        np.save(pcl, rng.normal(size=(300, 3)).astype(np.float32))
        files["pointcloud"].append(pcl)
    return files


def _randomize_lora(model: Any, seed: int = 0, scale: float = 0.2) -> None:
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * scale)


@pytest.fixture
def randomize_lora() -> Callable[..., None]:
    """``randomize_lora(model, seed=0)``: peft starts every ``lora_B`` at zero, so all adapters
    would compute the same (nothing); this gives each adapter distinct non-zero weights so routing
    mistakes show."""
    return _randomize_lora


class BatchKit:
    """Helpers to build model batches from conversations with random input tensors (no files)."""

    @staticmethod
    def sample(text: str, answer: str = "a cube", **inputs: Any) -> Any:
        from mmkit.records import Sample, Turn

        return Sample(id=text[:12], turns=(Turn("user", text), Turn("assistant", answer)),
                      inputs={m: tuple(v) for m, v in inputs.items()})

    @classmethod
    def mixed(cls) -> list[Any]:
        """Image-only, point-cloud-only, both, and text-only rows."""
        return [
            cls.sample("<image> What is shown here ?", "7", image=["i"]),
            cls.sample("<pointcloud> Which shape is it ?", "a cube", pointcloud=["p"]),
            cls.sample("<image> and <pointcloud> compare the two", "yes", image=["i"], pointcloud=["p"]),
            cls.sample("hello world", "yes no"),
        ]

    @staticmethod
    def batch(assembled: Any, samples: list[Any], seed: int = 0, padding_side: str = "right") -> Any:
        """Encode through the prompt builder and collate; each input is a random tensor of the
        encoder's input shape (stacked in row order, as the collator does), or the encoder's blank
        item where it declares no input shape (batched by its own collate)."""
        import torch

        from mmkit.data.batching import Collator, collate_fns

        gen = torch.Generator().manual_seed(seed)
        items = []
        for s in samples:
            enc = assembled.prompts.encode_sample(s)
            tensors = {m: [random_input(assembled.model.encoders[m], gen) for _ in paths]
                       for m, paths in s.inputs.items()}
            items.append({"id": s.id, "input_ids": enc.input_ids, "labels": enc.labels, "inputs": tensors,
                          "modalities": s.modalities})
        return Collator(pad_id=assembled.tokenizer.pad_token_id, padding_side=padding_side,
                        collate=collate_fns(assembled.model.encoders))(items)

    @staticmethod
    def run(model: Any, batch: Any) -> Any:
        return model(**batch.model_kwargs())


@pytest.fixture(scope="session")
def kit() -> type[BatchKit]:
    return BatchKit


def random_input(encoder: Any, gen: Any) -> Any:
    """A preprocessed input for tests of the batch path: random values of the encoder's
    ``input_shape``, or (an encoder that declares none) its blank item."""
    import torch

    if encoder.input_shape is None:
        return encoder.blank_item()
    return torch.randn(encoder.input_shape, generator=gen)
