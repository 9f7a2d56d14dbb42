"""A checkpoint's manifest: the sha256 and size of every file, written last and verified before
anything is read.

A manifest detects corruption, not tampering: anyone who can replace a file can recompute its hash.
With ``MMKIT_CHECKPOINT_KEY`` set, manifests are signed (HMAC-SHA256) when written and must carry a
valid signature to be loaded, so checkpoints on a shared filesystem can be trusted as a whole.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mmkit.training.checkpoint.layout import FORMAT, MANIFEST, STATE


_RANK_FILE = re.compile(r"(?:zero_pp_rank_|rank-)(\d+)")


def write_manifest(directory: Path, step: int, known: Mapping[str, str] | None = None) -> None:
    """Hash every file under ``directory`` and write the manifest (signed when a key is set).
    ``known``: sha256 by relative path of files this process hashed as it wrote them (the model's
    weights, in ``mmkit.json``), so a save reads each file once."""
    from mmkit.modeling.persistence import sha256

    known = known or {}
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        with open(path, "rb") as fh:
            os.fsync(fh.fileno())
        rel = path.relative_to(directory).as_posix()
        files[rel] = {"sha256": known.get(rel) or sha256(path), "size": path.stat().st_size}
    manifest: dict[str, Any] = {"format": FORMAT, "step": step, "files": files}
    key = signing_key()
    if key is not None:
        manifest["signature"] = {"algorithm": "hmac-sha256", "value": _sign(manifest, key)}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True), encoding="utf-8")


#: Environment variable holding the key that signs and verifies checkpoint manifests.
KEY_ENV = "MMKIT_CHECKPOINT_KEY"


def signing_key() -> bytes | None:
    key = os.environ.get(KEY_ENV)
    return key.encode("utf-8") if key else None


def _sign(manifest: dict[str, Any], key: bytes) -> str:
    body = {k: v for k, v in manifest.items() if k != "signature"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return hmac.new(key, canonical, hashlib.sha256).hexdigest()


def _signature_problem(manifest: dict[str, Any]) -> str | None:
    key = signing_key()
    if key is None:
        return None  # nothing to check against (a signed manifest is still hash-checked)
    signature = manifest.get("signature")
    if not isinstance(signature, dict) or "value" not in signature:
        return f"{MANIFEST} is not signed, and {KEY_ENV} is set: only signed checkpoints are trusted"
    if signature.get("algorithm") != "hmac-sha256" or not hmac.compare_digest(str(signature["value"]),
                                                                                _sign(manifest, key)):
        return f"{MANIFEST} has a bad signature for the key in {KEY_ENV} (tampered, or signed with another key)"
    return None


def verify(checkpoint: Path, rank: int) -> str | None:
    """Check the files this process will read against the manifest; ``None`` when intact, else why not."""
    from mmkit.modeling.persistence import sha256

    try:
        manifest = json.loads((checkpoint / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        return f"unreadable {MANIFEST}: {exc}"
    if not isinstance(manifest, dict):
        return f"{MANIFEST} is a JSON {type(manifest).__name__}, not the object mmkit writes"
    if manifest.get("format") != FORMAT:
        return f"{MANIFEST} format {manifest.get('format')!r}, this mmkit reads {FORMAT}"
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(
            isinstance(e, dict) and isinstance(e.get("sha256"), str) and isinstance(e.get("size"), int)
            for e in files.values()):
        return f"{MANIFEST} has no valid 'files' table (name -> sha256 and size)"
    problem = _signature_problem(manifest)
    if problem:
        return problem
    escaping = [rel for rel in files if Path(rel).is_absolute() or ".." in Path(rel).parts]
    if escaping:
        return f"{MANIFEST} names a file outside the checkpoint: {escaping[0]}"
    unlisted = sorted(p.relative_to(checkpoint).as_posix() for p in checkpoint.rglob("*")
                      if p.is_file() and p.name != MANIFEST and p.relative_to(checkpoint).as_posix() not in files)
    if unlisted:
        return f"{unlisted[0]} is not listed in {MANIFEST} (added after the checkpoint was written)"
    for rel, expected in files.items():  # cheap checks first
        path = checkpoint / rel
        if not path.is_file():
            return f"missing {rel} (multi-node runs need the output directory on a filesystem every node sees)"
        if path.stat().st_size != expected["size"]:
            return f"{rel} has the wrong size (truncated or replaced)"
    for rel, expected in files.items():
        path = checkpoint / rel
        owner = _RANK_FILE.search(Path(rel).name)
        if owner is not None and int(owner.group(1)) != rank:
            continue  # another process's partition: that process checks it
        if sha256(path) != expected["sha256"]:
            return f"{rel} does not match its sha256 in {MANIFEST} (corrupt or replaced)"
    if STATE not in manifest.get("files", {}):
        return f"no {STATE}"
    return None
