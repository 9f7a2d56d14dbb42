"""Torch-side building blocks. Importing this package imports torch."""

import os
import sys
import warnings

import torch

if not torch.cuda.is_available():
    # Name DeepSpeed's accelerator up front: its auto-detection prints a warning on every CPU run
    # (transformers imports it too).
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

# DeepSpeed compiles small ops on first use into torch's extension cache. That cache is shared by
# every environment of the user, and ops built against another environment's headers are rebuilt
# (about 30 s) whenever a different one runs: give each environment its own.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))

# DeepSpeed and transformers call APIs their own dependencies deprecate; the warnings repeat every
# step and say nothing a user can act on.
warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning)

from mmkit.modeling.encoder import ModalityEncoder, PretrainedEncoder, seeded, weights_sha256  # noqa: E402

__all__ = ["ModalityEncoder", "PretrainedEncoder", "seeded", "weights_sha256"]
