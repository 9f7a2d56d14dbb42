"""Saving and reloading a trained model on top of its base models.

An output directory holds ``trainable.safetensors`` (projectors, LoRA adapters, marker embeddings),
``encoders.safetensors`` (only encoders built from random init, which no hub can give back),
``tokenizer/`` and ``mmkit.json``: what to rebuild, fingerprints of the base models, and the hash
and shapes of the weights. Loading checks every one of them and refuses a mismatch by name.
"""

from __future__ import annotations

import functools
import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mmkit.errors import CheckpointMismatchError
from mmkit.modeling.model import MultimodalLM
from mmkit.modeling.loading import full_shape

FORMAT = 1
META = "mmkit.json"
TRAINABLE = "trainable.safetensors"
ENCODERS = "encoders.safetensors"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


#: Base-model files whose contents identify its tokenizer (``tokenizer_config.json`` without its
#: chat template, which is fingerprinted on its own).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "merges.txt", "vocab.txt",
                   "added_tokens.json", "special_tokens_map.json", "tokenizer_config.json")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
#: Fingerprint fields that identify the base model's contents; checkpoints written before they
#: existed are loaded with a note (their shapes are still checked).
CONTENT_KEYS = ("weights", "tokenizer", "chat_template")
_SAMPLE = 1 << 18  # bytes per sampled slice of a large weight file
_WHOLE = 8 << 20  # weight files up to this size are hashed whole


def llm_fingerprint(llm: torch.nn.Module, path: str | Path | None = None) -> dict[str, Any]:
    """Shapes of the base LLM and, when its directory is known (``path``: a local directory or a
    hub id in the local cache), digests of its weights, tokenizer and chat template."""
    config = llm.config
    vocab_size, hidden_size = full_shape(llm.get_input_embeddings().weight)
    fingerprint: dict[str, Any] = {
        "model_type": config.model_type,
        "hidden_size": int(hidden_size),
        "vocab_size": int(vocab_size),
        "num_hidden_layers": int(getattr(config, "num_hidden_layers", -1)),
    }
    if path is not None:
        fingerprint.update(base_files_fingerprint(path))
    return fingerprint


def _base_dir(path: str | Path) -> Path | None:
    from mmkit.demo.llm import resolve_llm

    local = Path(resolve_llm(str(path))).expanduser()  # "tiny" (--llm tiny) is a folder in mmkit's cache
    if local.is_dir():
        return local
    try:  # a hub id: the snapshot transformers loaded it from (never downloads)
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(path), local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached / not a hub id: no content fingerprint
        return None


def base_files_fingerprint(path: str | Path) -> dict[str, Any]:
    """``{"weights", "tokenizer", "chat_template"}`` digests of a base model directory's files
    (empty when the directory cannot be found). Large weight files are sampled (their size, the
    safetensors header and slices spread over the file): two different trainings of one
    architecture differ in nearly every byte, and reading a few MiB keeps loading fast."""
    directory = _base_dir(path)
    if directory is None:
        return {}
    files = sorted(p for p in directory.iterdir() if p.is_file())
    key = tuple((p.name, *(lambda st: (st.st_size, st.st_mtime_ns))(p.stat())) for p in files)
    return dict(_files_fingerprint(str(directory), key))


@functools.lru_cache(maxsize=16)
def _files_fingerprint(directory: str, key: tuple) -> tuple[tuple[str, Any], ...]:
    root = Path(directory)
    names = [name for name, *_ in key]
    weights = hashlib.sha256()
    found = False
    for name in names:
        if name.endswith(WEIGHT_SUFFIXES) or name.endswith(".index.json"):
            found = True
            weights.update(f"{name}\0".encode())
            weights.update(_sampled_digest(root / name).encode())
    tokenizer = hashlib.sha256()
    template_parts: list[str] = []
    for name in TOKENIZER_FILES:
        path = root / name
        if not path.is_file():
            continue
        data = path.read_bytes()
        if name == "tokenizer_config.json":
            try:
                config = json.loads(data)
            except ValueError:
                config = None
            if isinstance(config, dict):
                template = config.pop("chat_template", None)
                if template is not None:
                    template_parts.append(json.dumps(template, sort_keys=True))
                data = json.dumps(config, sort_keys=True).encode()
        tokenizer.update(f"{name}\0".encode() + hashlib.sha256(data).hexdigest().encode())
    for name in ("chat_template.jinja", "chat_template.json"):
        if (root / name).is_file():
            template_parts.append((root / name).read_text(encoding="utf-8", errors="replace"))
    extra = root / "additional_chat_templates"
    if extra.is_dir():
        template_parts += [p.read_text(encoding="utf-8", errors="replace") for p in sorted(extra.glob("*.jinja"))]
    chat = hashlib.sha256("\0".join(template_parts).encode()).hexdigest() if template_parts else None
    return (("weights", weights.hexdigest() if found else None), ("tokenizer", tokenizer.hexdigest()),
            ("chat_template", chat))


def _sampled_digest(path: Path) -> str:
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as fh:
        if size <= _WHOLE:
            digest.update(fh.read())
        else:
            for offset in [0, *(size * k // 8 for k in range(1, 8)), size - _SAMPLE]:
                fh.seek(offset)
                digest.update(fh.read(_SAMPLE))
    return digest.hexdigest()


def compare_base(saved: dict[str, Any], now: dict[str, Any], *, allow_mismatch: bool = False,
                 what: str = "the checkpoint") -> list[str]:
    """Refuse a base LLM other than ``saved`` (a fingerprint); returns notes for the user.

    Shapes must always match (the weights would not fit). Weights, tokenizer and chat template
    must match unless ``allow_mismatch`` (a deliberate swap), which turns them into notes."""
    shapes = [f"{k}: checkpoint {saved.get(k)!r}, base model {v!r}" for k, v in now.items()
              if k not in CONTENT_KEYS and k in saved and saved.get(k) != v]
    if shapes:
        raise CheckpointMismatchError(f"{what} was trained on a different base LLM (" + "; ".join(shapes) + ")")
    notes = []
    missing = [k for k in CONTENT_KEYS if k not in saved]
    if missing:
        notes.append(f"{what} predates base-model content fingerprints ({', '.join(missing)}): only the base "
                     "model's shapes were checked")
    elif not any(k in now for k in CONTENT_KEYS):
        notes.append("the base model's files were not found locally: only its shapes were checked")
    differ = [k for k in CONTENT_KEYS if k in saved and k in now and saved[k] != now[k]]
    if differ:
        names = {"weights": "weights", "tokenizer": "tokenizer", "chat_template": "chat template"}
        what_differs = ", ".join(names[k] for k in differ)
        if not allow_mismatch:
            raise CheckpointMismatchError(
                f"{what} was trained on a different base LLM: same shapes, but its {what_differs} differ. "
                "Use the base model it was trained on, or pass --allow-different-base "
                "(mmkit.load(..., allow_different_base=True)) to use this one deliberately")
        notes.append(f"the base LLM's {what_differs} differ from the one {what} was trained on "
                     "(allowed by --allow-different-base)")
    return notes


def trainable_state(model: MultimodalLM) -> dict[str, torch.Tensor]:
    """Names and values of the trainable weights (gathered from ZeRO-3 partitions if needed)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return _gather(named)


def random_init_encoder_state(model: MultimodalLM, components: dict[str, dict[str, Any]]) -> dict[str, torch.Tensor]:
    named = [(f"encoders.{m}.{n}", p) for m, comp in components.items() if comp.get("encoder_pretrained") is None
             for n, p in model.encoders[m].named_parameters()]
    return _gather(named)


def _gather(named: list[tuple[str, torch.nn.Parameter]]) -> dict[str, torch.Tensor]:
    params = [p for _, p in named]
    if any(hasattr(p, "ds_id") for p in params):  # ZeRO-3 partitioned
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            return {n: p.detach().to("cpu", torch.float32).clone() for n, p in named}
    return {n: p.detach().to("cpu", torch.float32).clone() for n, p in named}


def write_model_files(directory: Path, *, state: dict[str, torch.Tensor], encoder_state: dict[str, torch.Tensor],
                      meta: dict[str, Any], tokenizer: Any) -> None:
    """Write into ``directory`` (a fresh temporary directory: the caller swaps it in atomically)."""
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(directory / TRAINABLE))
    if encoder_state:
        save_file({k: v.contiguous() for k, v in encoder_state.items()}, str(directory / ENCODERS))
    tokenizer.save_pretrained(directory / "tokenizer")
    meta = {
        **meta,
        "format": FORMAT,
        "weights": {
            TRAINABLE: {"sha256": sha256(directory / TRAINABLE), "shapes": {k: list(v.shape) for k, v in state.items()}},
            **({ENCODERS: {"sha256": sha256(directory / ENCODERS),
                           "shapes": {k: list(v.shape) for k, v in encoder_state.items()}}} if encoder_state else {}),
        },
    }
    (directory / META).write_text(json.dumps(meta, indent=2, sort_keys=True), encoding="utf-8")


def read_meta(directory: Path) -> dict[str, Any]:
    path = Path(directory) / META
    if not path.is_file():
        raise CheckpointMismatchError(f"{directory}: not an mmkit model directory (no {META})")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointMismatchError(f"{path}: unreadable metadata: {exc}") from None
    if not isinstance(meta, dict):
        raise CheckpointMismatchError(f"{path}: expected a JSON object of model metadata, found a "
                                      f"{type(meta).__name__}")
    if meta.get("format") != FORMAT:
        raise CheckpointMismatchError(f"{path}: format {meta.get('format')!r}, this mmkit reads format {FORMAT}")
    problems = [f"{key!r} ({what})" for key, kind, what in _META_FIELDS if not isinstance(meta.get(key), kind)]
    if not problems:
        llm, weights = meta["llm"], meta["weights"]
        if not isinstance(llm.get("fingerprint"), dict) or not isinstance(llm.get("name_or_path"), str):
            problems.append("'llm' (name_or_path and fingerprint of the base model)")
        if TRAINABLE not in weights or not all(isinstance(w, dict) and isinstance(w.get("sha256"), str)
                                               for w in weights.values()):
            problems.append(f"'weights' (the sha256 of {TRAINABLE} and of every weights file)")
        if not all(isinstance(c, dict) and "encoder_identity" in c for c in meta["modalities"].values()):
            problems.append("'modalities' (each modality's components and encoder identity)")
    if problems:
        raise CheckpointMismatchError(f"{path}: incomplete metadata, missing or malformed: {', '.join(problems)} "
                                      "(not written by mmkit, or edited)")
    return meta


#: (key, type, what it holds) of every field loading reads from ``mmkit.json``.
_META_FIELDS = (
    ("stage", str, "align or instruct"), ("llm", dict, "the base model"), ("weights", dict, "weights files"),
    ("modalities", dict, "the modalities' components"), ("first_new_token_id", int, "the first marker token id"),
    ("max_length", int, "the context length"),
)


def load_weights(directory: Path, name: str, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    path = Path(directory) / name
    expected = meta["weights"].get(name)
    if expected is None:
        return {}
    if not path.is_file():
        raise CheckpointMismatchError(f"{path}: missing")
    if sha256(path) != expected["sha256"]:
        raise CheckpointMismatchError(f"{path}: contents do not match the hash in {META} (corrupt or replaced)")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise CheckpointMismatchError(f"{path}: unreadable safetensors file: {exc}") from None


def check_fingerprint(meta: dict[str, Any], model: MultimodalLM, components: dict[str, dict[str, Any]], *,
                      llm_path: str | Path | None = None, allow_base_mismatch: bool = False) -> list[str]:
    """Refuse a model that is not the one the checkpoint was trained on (base LLM, modalities,
    encoders); returns notes (also issued as warnings) for what could not be checked or was allowed."""
    notes = compare_base(meta["llm"]["fingerprint"], llm_fingerprint(model.llm, llm_path),
                         allow_mismatch=allow_base_mismatch)
    saved_mods, now_mods = set(meta["modalities"]), set(components)
    if saved_mods != now_mods:
        raise CheckpointMismatchError(f"modalities differ: checkpoint {sorted(saved_mods)}, model {sorted(now_mods)}")
    for m in sorted(now_mods):
        notes += _compare_encoder(m, meta["modalities"][m]["encoder_identity"], components[m]["encoder_identity"],
                                  model.encoders[m])
    for note in notes:
        warnings.warn(note, stacklevel=2)
    return notes


def _compare_encoder(modality: str, saved: Any, now: dict[str, Any], encoder: Any) -> list[str]:
    """The saved encoder identity must be this encoder's, in the current format or in one an earlier
    release of its plugin recorded (``legacy_identities()``, computed from this encoder: a run trained
    before the format changed still loads; a different encoder matches neither)."""
    if saved == now:
        return []
    legacy = getattr(encoder, "legacy_identities", None)
    candidates = [now, *(json.loads(json.dumps(old, sort_keys=True)) for old in (legacy() if callable(legacy) else []))]
    if saved in candidates[1:]:
        return [f"the {modality} encoder's identity was recorded in an earlier format; it matches this encoder"]
    if isinstance(saved, dict):
        # Name what differs against the format closest to the saved one (not its format's own fields).
        differs = [([k for k in sorted(set(saved) | set(c)) if saved.get(k, _ABSENT) != c.get(k, _ABSENT)], c)
                   for c in candidates if isinstance(c, dict)]
        differ, closest = min(differs, key=lambda pair: len(pair[0]))
        detail = ", ".join(f"{k}: checkpoint {_short(saved.get(k, _ABSENT))}, now {_short(closest.get(k, _ABSENT))}"
                           for k in differ[:4]) + (", ..." if len(differ) > 4 else "")
    else:
        detail = f"checkpoint recorded {_short(saved)}"
    raise CheckpointMismatchError(
        f"the {modality} encoder differs from the one the checkpoint was trained with ({detail}). Build it with "
        "the options, pretrained weights and plugin version the run was trained with")


_ABSENT = "(absent)"


def _short(value: Any, limit: int = 80) -> str:
    text = value if value is _ABSENT else json.dumps(value, sort_keys=True)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_state_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], *, what: str,
                      allow_missing: bool = False) -> None:
    """Copy ``state`` into ``module``'s parameters by name: every key must exist with the same shape;
    with ``allow_missing=False`` every trainable parameter must be present too."""
    params = dict(module.named_parameters())
    unexpected = sorted(set(state) - set(params))
    shape = sorted(k for k in set(state) & set(params) if tuple(state[k].shape) != tuple(params[k].shape))
    missing = [] if allow_missing else sorted(k for k, p in params.items() if p.requires_grad and k not in state)
    if unexpected or shape or missing:
        lines = []
        if missing:
            lines.append(f"missing {len(missing)}: {', '.join(missing[:5])}")
        if unexpected:
            lines.append(f"unexpected {len(unexpected)}: {', '.join(unexpected[:5])}")
        for k in shape[:5]:
            lines.append(f"{k}: checkpoint {list(state[k].shape)}, model {list(params[k].shape)}")
        raise CheckpointMismatchError(f"{what} does not match the model: " + "; ".join(lines))
    with torch.no_grad():
        for k, v in state.items():
            params[k].copy_(v.to(params[k].dtype))


# -- whole model directories ----------------------------------------------------------------------
def _portable_path(path: str, directory: Path) -> str:
    """Store the base LLM path relative to the output dir when it lives inside it (the demo), so the
    directory can be moved."""
    p = Path(path)
    if p.exists():
        try:
            return str(p.resolve().relative_to(directory.resolve()))
        except ValueError:
            return str(p.resolve())
    return path  # a hub id


def build_meta(assembled: Any, directory: Path, *, stage: str) -> dict[str, Any]:
    import attrs

    from mmkit import __version__

    config = assembled.config
    return {
        "mmkit_version": __version__,
        "stage": stage,
        "llm": {"name_or_path": _portable_path(config.llm, directory),
                "fingerprint": llm_fingerprint(assembled.model.llm, config.llm)},
        "first_new_token_id": assembled.first_new_token_id,
        "modalities": assembled.components,
        "lora": attrs.asdict(config.lora) if config.lora is not None else None,
        "encoder_lora": config.encoder_lora,
        "template": config.template,
        "max_length": config.max_length,
    }


def save_model(directory: Path, assembled: Any, *, stage: str, write: bool = True) -> None:
    """Write the reloadable model files into ``directory`` (each file atomically; ``mmkit.json``
    last, so a reader never sees metadata that does not match the weights)."""
    from mmkit.atomic import atomic_directory

    directory = Path(directory)
    state = trainable_state(assembled.model)
    encoder_state = random_init_encoder_state(assembled.model, assembled.components)
    if not write:  # other ranks took part in gathering ZeRO-3 partitions; one rank writes
        return
    meta = build_meta(assembled, directory, stage=stage)
    atomic_directory(directory / "model", lambda tmp: write_model_files(
        tmp, state=state, encoder_state=encoder_state, meta=meta, tokenizer=assembled.tokenizer))


def model_config_from_meta(meta: dict[str, Any], directory: Path, *, with_lora: bool = True):
    from mmkit.modeling.assemble import ModalityChoice, ModelConfig
    from mmkit.modeling.lora import LoraSettings

    llm = meta["llm"]["name_or_path"]
    if not Path(llm).is_absolute() and (directory / llm).exists():
        llm = str(directory / llm)
    choices = tuple(
        ModalityChoice(name=m, encoder=c["encoder"], encoder_pretrained=c["encoder_pretrained"],
                       encoder_options=c["encoder_options"], projector=c["projector"],
                       projector_options=c["projector_options"])
        for m, c in meta["modalities"].items())
    lora = meta.get("lora")
    lora_settings = None
    if lora is not None and with_lora:
        lora_settings = LoraSettings(**{**lora, "targets": tuple(lora["targets"])})
    return ModelConfig(llm=llm, modalities=choices, lora=lora_settings, encoder_lora=meta.get("encoder_lora", False),
                       max_length=meta["max_length"], template=meta.get("template"),
                       first_new_token_id=meta["first_new_token_id"])


def model_dir(output_dir: Path) -> Path:
    """Accept either a run's output dir or its ``model/`` subdirectory."""
    output_dir = Path(output_dir)
    if (output_dir / "model" / META).is_file():
        return output_dir / "model"
    return output_dir


def load_model(output_dir: Path, host: Any, *, allow_base_mismatch: bool = False) -> Any:
    from mmkit.modeling.assemble import assemble

    directory = model_dir(output_dir)
    meta = read_meta(directory)
    # The base LLM path was stored relative to the run directory (model/'s parent), whichever of
    # the two the caller names.
    config = model_config_from_meta(meta, directory.parent)
    _check_architecture(meta, config.llm)
    assembled = assemble(config, host, tokenizer_path=str(directory / "tokenizer"))
    check_fingerprint(meta, assembled.model, assembled.components, llm_path=config.llm,
                      allow_base_mismatch=allow_base_mismatch)
    load_into(assembled, directory, meta, stage=meta["stage"])
    assembled.model.eval()
    return assembled


def _check_architecture(meta: dict[str, Any], llm: str) -> None:
    """Refuse another architecture before assembling: the checkpoint's LoRA targets are module
    names of the architecture it was trained on, and would otherwise fail inside peft first."""
    from transformers import AutoConfig

    try:
        from mmkit.demo.llm import resolve_llm

        model_type = AutoConfig.from_pretrained(resolve_llm(llm)).model_type
    except (OSError, ValueError):
        return  # assembling reports why the LLM cannot be loaded
    saved = meta["llm"]["fingerprint"].get("model_type")
    if saved != model_type:
        raise CheckpointMismatchError(f"the checkpoint was trained on a different base LLM "
                                      f"(model_type: checkpoint {saved!r}, base model {model_type!r})")


def load_into(assembled: Any, directory: Path, meta: dict[str, Any], *, stage: str, allow_missing: bool = False) -> None:
    """Load encoder (random-init) and trainable weights into an assembled model, strictly."""
    from mmkit.modeling.assemble import trainable_parameters

    encoder_state = load_weights(directory, ENCODERS, meta)
    if encoder_state:
        load_state_strict(assembled.model, encoder_state, what=f"{directory / ENCODERS}", allow_missing=True)
    trainable_parameters(assembled.model, stage)
    load_state_strict(assembled.model, load_weights(directory, TRAINABLE, meta), what=f"{directory / TRAINABLE}",
                      allow_missing=allow_missing)
