"""Training checkpoints: written atomically, verified before loading, resumed exactly.

One job per module:

- :mod:`.layout`: where things are in a checkpoint directory, the trainer state, listing and removing;
- :mod:`.store`: writing a checkpoint from every process atomically, reading weights and engine state;
- :mod:`.manifest`: every file's hash and size (HMAC-signed with ``MMKIT_CHECKPOINT_KEY``), verified;
- :mod:`.safe_load`: DeepSpeed's ``torch.save`` files loaded without running code from them;
- :mod:`.rng`: each process's RNG states;
- :mod:`.compat`: whether a checkpoint may be resumed by this run (the config fields' resume rules);
- :mod:`.resume`: choosing the checkpoint to resume from and restoring it.

The names below are what the rest of mmkit uses.
"""

from mmkit.training.checkpoint.compat import RESUME_STRICT, check_resumable, check_same_run
from mmkit.training.checkpoint.layout import TrainState, discard_checkpoints, list_checkpoints, read_state
from mmkit.training.checkpoint.manifest import KEY_ENV, verify
from mmkit.training.checkpoint.resume import (
    Resume, choose_checkpoint, plan_resume, resume_candidates, start_over, trim_metrics,
)
from mmkit.training.checkpoint.safe_load import safe_torch_load
from mmkit.training.checkpoint.store import save_checkpoint

__all__ = [
    "KEY_ENV", "RESUME_STRICT", "Resume", "TrainState", "check_resumable", "check_same_run", "choose_checkpoint",
    "discard_checkpoints", "list_checkpoints", "plan_resume", "read_state", "resume_candidates", "safe_torch_load",
    "save_checkpoint", "start_over", "trim_metrics", "verify",
]
