"""The interface every modality encoder implements, and :class:`PretrainedEncoder`, a base that
does the chores every plugin repeats (weights in safetensors, content hash, identity, seeded init)."""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from mmkit.errors import CheckpointMismatchError, ConfigError, MmkitError, PluginError

#: The seed a random-init encoder gets when neither the run nor the options give one.
DEFAULT_SEED = 0


class ModalityEncoder(nn.Module):
    """A (usually frozen) feature extractor for one modality.

    Subclasses set ``num_tokens``, ``output_dim`` and ``input_shape`` and implement:

    - ``preprocess(raw) -> Tensor``: one raw input (what the modality's ``load`` returns) to a float
      tensor of shape ``input_shape``. Runs in data-loader workers: no model weights needed. Raise
      :class:`mmkit.InputError` (``InputError("reason")``) for an input it cannot use; mmkit adds the
      file, the record and the plugin, and ``--skip-bad-records`` skips it.
    - ``forward(x: Tensor[B, *input_shape]) -> Tensor[B, num_tokens, output_dim]``.
    - ``identity() -> dict``: a JSON-serialisable description of everything that changes the
      features (class, pretrained id, configuration, preprocessing). Checkpoints record it and the
      feature cache keys on it, so it must change whenever the output would.
    - ``legacy_identities() -> list[dict]`` (optional): when a release changes the identity format,
      the identities earlier releases recorded for this same encoder, so their runs still load.

    Calling the encoder checks what ``forward`` returned against the declared ``num_tokens`` and
    ``output_dim``, and turns an exception from it into a :class:`PluginError` naming the plugin.
    """

    num_tokens: int
    output_dim: int
    input_shape: tuple[int, ...]

    def preprocess(self, raw: Any) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def identity(self) -> dict[str, Any]:  # pragma: no cover - interface
        raise NotImplementedError

    def legacy_identities(self) -> list[dict[str, Any]]:
        """What earlier releases of this encoder recorded as ``identity()`` for exactly these features
        (same class, configuration, weights and preprocessing), in their own formats, so a run they
        trained still loads after the identity format changed. Compute each from this encoder (never
        accept a saved identity by its shape alone): a different encoder must still not match."""
        return []

    def blank_input(self, batch_size: int = 1) -> torch.Tensor:
        """A zero input: used for the ablation in evaluation and for the dummy pass that keeps
        every rank running every modality under ZeRO-3."""
        return torch.zeros(batch_size, *self.input_shape)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            out = super().__call__(*args, **kwargs)
        except MmkitError:
            raise
        except Exception as exc:
            raise PluginError(f"{describe(self)}: encode raised {type(exc).__name__}: {_one_line(exc)}") from exc
        check_features(self, out, args[0] if args else None)
        return out


def describe(encoder: nn.Module) -> str:
    """``plugin P, modality M, encoder E`` for messages (as stamped by the factory)."""
    origin = getattr(encoder, "_mmkit_origin", None) or {}
    parts = [f"{k} {origin[k]}" for k in ("plugin", "modality", "encoder") if origin.get(k)]
    return ", ".join(parts) or f"encoder {type(encoder).__qualname__}"


def check_features(encoder: ModalityEncoder, out: Any, x: Any) -> None:
    """What ``forward`` returned against what the encoder declared: ``[B, num_tokens, output_dim]``."""
    if not isinstance(out, torch.Tensor):
        raise PluginError(f"{describe(encoder)}: encode returned a {type(out).__name__}, declared a tensor "
                          f"[batch, {encoder.num_tokens}, {encoder.output_dim}]")
    batch = x.shape[0] if isinstance(x, torch.Tensor) and x.dim() > 0 else out.shape[0] if out.dim() else None
    declared = (batch, encoder.num_tokens, encoder.output_dim)
    if tuple(out.shape) != declared:
        raise PluginError(f"{describe(encoder)}: encode returned features of shape {list(out.shape)}, declared "
                          f"[batch={batch}, num_tokens={encoder.num_tokens}, output_dim={encoder.output_dim}]")


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
        return model.eval()

    def describe_preprocessing(self) -> dict[str, Any]:
        """What ``preprocess`` does, for :meth:`identity` (override when it has choices)."""
        return {}

    # -- identity -----------------------------------------------------------------------------------
    def weights_sha256(self) -> str:
        """The content hash of the weights as built or loaded (computed once)."""
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
