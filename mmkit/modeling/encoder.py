"""The interface every modality encoder implements, and :class:`PretrainedEncoder`, a base that
does the chores every plugin repeats (weights in safetensors, content hash, identity, seeded init)."""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from mmkit.errors import CheckpointMismatchError, ConfigError, MmkitError, PluginError
from mmkit.modeling.features import RaggedFeatures

#: The seed a random-init encoder gets when neither the run nor the options give one.
DEFAULT_SEED = 0


class ModalityEncoder(nn.Module):
    """A (usually frozen) feature extractor for one modality (contract 1.1).

    Subclasses set ``num_tokens``, ``output_dim`` and ``input_shape`` and implement:

    - ``preprocess(raw) -> Any``: one raw input (what the modality's ``load`` returns) to what
      :meth:`collate` batches. For a fixed-size encoder, a float tensor of shape ``input_shape``.
      Runs in data-loader workers: no model weights needed. Raise :class:`mmkit.InputError`
      (``InputError("reason")``) for an input it cannot use; mmkit adds the file, the record and the
      plugin, and ``--skip-bad-records`` skips it.
    - ``forward(batch)``: fixed size (``num_tokens`` an int): ``Tensor[B, num_tokens, output_dim]``;
      variable size (``num_tokens = None``): :class:`~mmkit.modeling.features.RaggedFeatures` whose
      ``counts[i] == num_tokens_for(item_i)``.
    - ``identity() -> dict``: a JSON-serialisable description of everything that changes the
      features (class, pretrained id, configuration, preprocessing). Checkpoints record it and the
      feature cache keys on it, so it must change whenever the output would.
    - ``legacy_identities() -> list[dict]`` (optional): when a release changes the identity format,
      the identities earlier releases recorded for this same encoder, so their runs still load.

    Variable-size inputs (any-resolution images, video, graphs, long audio) also implement

    - ``num_tokens_for(item) -> int``: how many tokens the preprocessed ``item`` becomes, from the
      item alone, before encoding (the prompt reserves exactly that many slots);
    - ``collate(items) -> batch`` when ``torch.stack`` cannot batch the items (a torch-geometric
      ``Batch``, a padded tensor plus lengths, a list of crops);
    - ``blank(batch_size) -> batch`` when ``input_shape`` is ``None``: a collated batch of blank
      inputs (the evaluation ablation and the dummy pass that keeps every rank running every encoder
      under ZeRO-3).

    ``uses_separators = True`` says that ``forward`` marks layout rows in ``RaggedFeatures.separators``
    (a newline per row of an image grid, a frame break); the projector then gets a learned separator
    embedding for them (LLaVA-NeXT's ``image_newline``).

    Calling the encoder checks what ``forward`` returned against the declaration, and turns an
    exception from it into a :class:`PluginError` naming the plugin. ``encoder(batch, counts=[...])``
    also checks each input's token count.
    """

    #: tokens per input; ``None``: it varies with the input (``num_tokens_for``)
    num_tokens: int | None
    output_dim: int
    #: the shape ``preprocess`` returns; ``None``: any object ``collate`` accepts
    input_shape: tuple[int, ...] | None
    #: ``forward`` marks layout rows in ``RaggedFeatures.separators`` (see the class docstring)
    uses_separators: ClassVar[bool] = False

    def preprocess(self, raw: Any) -> Any:  # pragma: no cover - interface
        raise NotImplementedError

    def identity(self) -> dict[str, Any]:  # pragma: no cover - interface
        raise NotImplementedError

    def legacy_identities(self) -> list[dict[str, Any]]:
        """What earlier releases of this encoder recorded as ``identity()`` for exactly these features
        (same class, configuration, weights and preprocessing), in their own formats, so a run they
        trained still loads after the identity format changed. Compute each from this encoder (never
        accept a saved identity by its shape alone): a different encoder must still not match."""
        return []

    def collate(self, items: Sequence[Any]) -> Any:
        """Preprocessed items -> the batch ``forward`` takes (default: ``torch.stack``)."""
        return torch.stack(list(items))

    def num_tokens_for(self, item: Any) -> int:
        """Tokens the preprocessed ``item`` becomes (default: ``num_tokens``)."""
        if self.num_tokens is None:
            raise PluginError(f"{describe(self)}: num_tokens is None (a variable token count) but "
                              f"{type(self).__qualname__} does not implement num_tokens_for(item)")
        return int(self.num_tokens)

    def blank(self, batch_size: int = 1) -> Any:
        """A collated batch of ``batch_size`` blank inputs: used for the ablation in evaluation and
        for the dummy pass that keeps every rank running every modality under ZeRO-3. Default:
        zeros of ``input_shape`` (a 1.0 encoder's own ``blank_input`` wins)."""
        if type(self).blank_input is not ModalityEncoder.blank_input:
            return self.blank_input(batch_size)  # a 1.0 plugin's override
        if self.input_shape is None:
            raise PluginError(f"{describe(self)}: input_shape is None (inputs of any shape) but "
                              f"{type(self).__qualname__} does not implement blank(batch_size)")
        return torch.zeros(batch_size, *self.input_shape)

    def blank_item(self) -> Any:
        """One blank preprocessed input, as ``preprocess`` returns: the evaluation ablation puts it in
        place of each file, so it is counted with ``num_tokens_for`` and collated beside real inputs.
        Default: the first input of ``blank(1)`` (a tensor's first row, a torch-geometric batch's first
        graph); an encoder whose batches are another type implements it."""
        batch = self.blank(1)
        if isinstance(batch, torch.Tensor):
            return batch[0]
        to_list = getattr(batch, "to_data_list", None)
        if callable(to_list):
            return to_list()[0]
        raise PluginError(f"{describe(self)}: blank(1) returned a {type(batch).__name__}, which mmkit cannot take "
                          f"apart into one input: {type(self).__qualname__} must implement blank_item()")

    def blank_input(self, batch_size: int = 1) -> Any:
        """Contract 1.0's name of :meth:`blank` (kept: 1.0 plugins override or call it)."""
        return self.blank(batch_size)

    def __call__(self, *args: Any, counts: Sequence[int] | None = None, **kwargs: Any) -> Any:
        try:
            out = super().__call__(*args, **kwargs)
        except MmkitError:
            raise
        except Exception as exc:
            raise PluginError(f"{describe(self)}: encode raised {type(exc).__name__}: {_one_line(exc)}") from exc
        check_features(self, out, args[0] if args else None, counts=counts)
        return out


def is_variable(encoder: nn.Module) -> bool:
    """Whether ``encoder``'s token count differs per input (``num_tokens is None``)."""
    return getattr(encoder, "num_tokens", None) is None


def tokens_per_input(encoder: ModalityEncoder, projector: nn.Module, item: Any) -> int:
    """The prompt slots one preprocessed ``item`` gets: the projector's fixed output count, or (a
    token-wise projector, ``num_output_tokens is None``) the encoder's count for the item."""
    fixed = getattr(projector, "num_output_tokens", None)
    if fixed is not None:
        return int(fixed)
    return count_tokens(encoder, item)


def count_tokens(encoder: ModalityEncoder, item: Any) -> int:
    """``encoder.num_tokens_for(item)``, checked: a plugin's exception or a count that is not a
    non-negative int becomes a :class:`PluginError` naming the plugin."""
    try:
        count = encoder.num_tokens_for(item)
    except MmkitError:
        raise
    except Exception as exc:
        raise PluginError(f"{describe(encoder)}: num_tokens_for raised {type(exc).__name__}: {_one_line(exc)}") from exc
    if isinstance(count, torch.Tensor) and count.numel() == 1:
        count = count.item()
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise PluginError(f"{describe(encoder)}: num_tokens_for returned {count!r}, declared a token count (an int >= 0)")
    return count


def collate_checked(encoder: ModalityEncoder, items: list[Any]) -> Any:
    """``encoder.collate(items)``; a plugin's exception becomes a :class:`PluginError` naming it."""
    try:
        return encoder.collate(items)
    except MmkitError:
        raise
    except Exception as exc:
        raise PluginError(f"{describe(encoder)}: collate of {len(items)} input(s) raised {type(exc).__name__}: "
                          f"{_one_line(exc)}") from exc


def describe(encoder: nn.Module) -> str:
    """``plugin P, modality M, encoder E`` for messages (as stamped by the factory)."""
    origin = getattr(encoder, "_mmkit_origin", None) or {}
    parts = [f"{k} {origin[k]}" for k in ("plugin", "modality", "encoder") if origin.get(k)]
    return ", ".join(parts) or f"encoder {type(encoder).__qualname__}"


def batch_size_of(batch: Any) -> int | None:
    """The number of inputs in a collated batch when it can be told (a tensor's first dimension, a
    torch-geometric ``Batch``'s ``num_graphs``, a list's length: one entry per input); ``None``
    otherwise (a tuple or dict, such as a padded tensor with its lengths)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() > 0 else None
    graphs = getattr(batch, "num_graphs", None)
    if isinstance(graphs, int):
        return graphs
    if isinstance(batch, list):
        return len(batch)
    return None


def check_features(encoder: ModalityEncoder, out: Any, x: Any, counts: Sequence[int] | None = None) -> None:
    """What ``forward`` returned against what the encoder declared: ``[B, num_tokens, output_dim]``
    for a fixed-size encoder; :class:`RaggedFeatures` of ``output_dim`` with one count per input
    (``counts``, when given: the expected count of each input) for a variable-size one."""
    if encoder.num_tokens is None:
        _check_ragged(encoder, out, x, counts)
        return
    if not isinstance(out, torch.Tensor):
        raise PluginError(f"{describe(encoder)}: encode returned a {type(out).__name__}, declared a tensor "
                          f"[batch, {encoder.num_tokens}, {encoder.output_dim}]")
    batch = batch_size_of(x)
    if batch is None and out.dim():
        batch = out.shape[0]
    declared = (batch, encoder.num_tokens, encoder.output_dim)
    if tuple(out.shape) != declared:
        raise PluginError(f"{describe(encoder)}: encode returned features of shape {list(out.shape)}, declared "
                          f"[batch={batch}, num_tokens={encoder.num_tokens}, output_dim={encoder.output_dim}]")
    if counts is not None and any(int(c) != encoder.num_tokens for c in counts):
        raise PluginError(f"{describe(encoder)}: expected token counts {list(counts)} from a fixed-size encoder "
                          f"of {encoder.num_tokens} tokens per input")


def _check_ragged(encoder: ModalityEncoder, out: Any, x: Any, counts: Sequence[int] | None) -> None:
    if not isinstance(out, RaggedFeatures):
        shape = f" of shape {list(out.shape)}" if isinstance(out, torch.Tensor) else ""
        raise PluginError(f"{describe(encoder)}: encode returned a {type(out).__name__}{shape}; an encoder with "
                          "num_tokens=None (a variable token count) returns RaggedFeatures(values, counts)")
    if out.dim != encoder.output_dim:
        raise PluginError(f"{describe(encoder)}: encode returned features of dim {out.dim}, declared "
                          f"output_dim={encoder.output_dim}")
    batch = batch_size_of(x)
    if batch is not None and out.batch_size != batch:
        raise PluginError(f"{describe(encoder)}: encode returned token counts for {out.batch_size} input(s) for a "
                          f"batch of {batch}")
    if counts is not None and tuple(int(c) for c in counts) != out.counts:
        raise PluginError(f"{describe(encoder)}: encode returned {list(out.counts)} tokens per input, "
                          f"num_tokens_for announced {[int(c) for c in counts]}")


def encode_items(encoder: ModalityEncoder, items: Sequence[Any]) -> Any:
    """Collate preprocessed ``items``, encode them, and check each input's token count against
    ``num_tokens_for`` (what the prompt reserved)."""
    counts = [count_tokens(encoder, item) for item in items] if is_variable(encoder) else None
    return encoder(collate_checked(encoder, list(items)), counts=counts)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or "(no message)"


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Random init as a function of ``seed`` alone: a private RNG stream (the caller's global RNG
    state is left untouched), so a rebuilt encoder has the same weights and the same identity."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        yield


def weights_sha256(module: nn.Module) -> str:
    """SHA-256 over every parameter and buffer in name order, as float32 (so the run's precision does
    not change it); first 16 hex digits. About 1 s per GB of weights. ``"meta"`` for a module built
    without weights (``mmkit train --dry-run``)."""
    state = module.state_dict()
    if any(t.is_meta for t in state.values()):
        return "meta"
    digest = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


class PretrainedEncoder(ModalityEncoder):
    """A :class:`ModalityEncoder` built from a JSON-able ``config`` dict, with the chores done:

    - ``build(pretrained=None, seed=None, **config)``: the ``EncoderSpec.build`` function. Random
      init (in :func:`seeded` ``seed``: mmkit passes the run's seed and records it) or
      :meth:`from_pretrained`;
    - :meth:`save_pretrained` / :meth:`from_pretrained`: ``config.json`` + ``model.safetensors``
      (a local folder or a Hugging Face Hub repository holding both), strict key and shape checks;
    - :meth:`identity`: class, config, pretrained source, seed and the weights' content hash, plus
      :meth:`describe_preprocessing`.

    Subclasses implement ``__init__(self, config: dict)`` (call ``super().__init__(config)`` first, then
    create layers; set ``num_tokens``, ``output_dim``, ``input_shape``), ``preprocess`` and ``forward``.
    Build with :meth:`build` (or ``from_pretrained``), not the constructor, to get a seeded init.
    """

    config_name: ClassVar[str] = "config.json"
    weights_name: ClassVar[str] = "model.safetensors"

    def __init__(self, config: dict[str, Any]):
        super().__init__()
        self.config = dict(config)
        self.pretrained: str | None = None
        self.seed: int | None = None
        self._weights_sha256: str | None = None

    # -- building ---------------------------------------------------------------------------------
    @classmethod
    def build(cls, *, pretrained: str | None = None, seed: int | None = None, **config: Any) -> PretrainedEncoder:
        """mmkit's builder: ``from_pretrained(pretrained, **config)`` or random init from ``config``."""
        if pretrained is not None:
            return cls.from_pretrained(pretrained, **config)
        seed = DEFAULT_SEED if seed is None else int(seed)
        with seeded(seed):
            model = cls(config)
        model.seed = seed
        model.weights_sha256()  # now, as built: the run may cast the weights to bf16 before identity() is asked
        return model.eval()

    def describe_preprocessing(self) -> dict[str, Any]:
        """What ``preprocess`` does, for :meth:`identity` (override when it has choices)."""
        return {}

    # -- identity -----------------------------------------------------------------------------------
    def weights_sha256(self) -> str:
        """The content hash of the weights as built or loaded (computed then, once: a later cast to
        bf16 changes the values, not the weights the run was built from)."""
        if self._weights_sha256 is None:
            self._weights_sha256 = weights_sha256(self)
        return self._weights_sha256

    def identity(self) -> dict[str, Any]:
        ident: dict[str, Any] = {"class": f"{type(self).__module__}.{type(self).__qualname__}",
                                 "config": self.config, "pretrained": self.pretrained,
                                 "seed": self.seed, "weights_sha256": self.weights_sha256()}
        preprocessing = self.describe_preprocessing()
        if preprocessing:
            ident["preprocessing"] = preprocessing
        return ident

    # -- saving and loading ---------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``config.json`` and ``model.safetensors`` into ``directory``."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {name: t.detach().to("cpu").contiguous() for name, t in self.state_dict().items()}
        save_file(state, str(directory / self.weights_name), metadata={"class": type(self).__qualname__})
        from mmkit.atomic import default_mode

        (directory / self.weights_name).chmod(default_mode())  # safetensors writes 0600 whatever the umask
        (directory / self.config_name).write_text(json.dumps(self.config, indent=2, sort_keys=True) + "\n")
        return directory

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, **overrides: Any) -> PretrainedEncoder:
        """Load a folder written by :meth:`save_pretrained` (or a Hub repo id holding the same two
        files). ``overrides`` change config values that keep the weight shapes."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        overrides.pop("seed", None)  # the weights come from the file
        config_path, weights_path = cls._locate(str(name_or_path))
        try:
            config = json.loads(config_path.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{config_path}: unreadable encoder config: {exc}") from exc
        if not isinstance(config, dict):
            raise ConfigError(f"{config_path}: expected a JSON object of {cls.__name__} options")
        model = cls({**config, **overrides})
        try:
            state = load_file(str(weights_path))
        except (OSError, SafetensorError) as exc:
            raise CheckpointMismatchError(f"{weights_path}: unreadable safetensors file: {exc}") from exc
        check_state(model, state, f"{weights_path} ({cls.__name__})")
        model.load_state_dict(state, strict=True)
        model.pretrained = str(name_or_path)
        model.weights_sha256()  # as loaded (see build)
        return model.eval()

    @classmethod
    def _locate(cls, pretrained: str) -> tuple[Path, Path]:
        local = Path(pretrained).expanduser()
        if local.is_dir():
            paths = local / cls.config_name, local / cls.weights_name
            missing = [p.name for p in paths if not p.is_file()]
            if missing:
                raise ConfigError(f"{local}: not a saved {cls.__name__}: it lacks {' and '.join(missing)}")
            return paths
        if local.exists() or pretrained.startswith((".", "/", "~")) or pretrained.count("/") > 1:
            raise ConfigError(f"{pretrained}: not a saved {cls.__name__} directory (and not a Hub repo id)")
        try:
            from huggingface_hub import hf_hub_download

            return (Path(hf_hub_download(pretrained, cls.config_name)), Path(hf_hub_download(pretrained, cls.weights_name)))
        except Exception as exc:  # offline, unknown repo, bad id: one clear message either way
            raise ConfigError(f"{pretrained}: no such local directory, and fetching {cls.config_name} / "
                              f"{cls.weights_name} from the Hugging Face Hub failed: {type(exc).__name__}: {exc}") from exc


def check_state(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Compare keys and shapes before loading, so the error lists every mismatch (never strict=False)."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in sorted(set(state) & set(expected)) if state[k].shape != expected[k].shape]
    parts = []
    if missing:
        parts.append(f"missing {len(missing)} tensor(s) ({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''})")
    if unexpected:
        parts.append(f"unexpected {len(unexpected)} ({', '.join(unexpected[:5])}{', ...' if len(unexpected) > 5 else ''})")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatch(es) ({'; '.join(shapes[:3])}{'; ...' if len(shapes) > 3 else ''})")
    if parts:
        raise CheckpointMismatchError(f"{where}: weights do not fit the configuration: " + "; ".join(parts))
