"""The test kit for plugin authors.

Subclass :class:`ModalityContract` in your plugin's tests and point it at your modality; pytest
then runs the whole contract (shapes and dtypes as declared, batch invariance, determinism, no NaN,
bad files rejected with a clear error, no torch at import time, the demo task builds, a blank batch
encodes, the default projector gives each input the slots the prompt reserves, a forward with bf16
parameters and fp32 buffers as DeepSpeed leaves them). For a
variable-size encoder (``num_tokens = None``) it also checks that each input gets the tokens
``num_tokens_for`` announced and that inputs of different sizes collate (``make_valid_files`` must
then return inputs of at least two sizes)::

    from mmkit.testing import ModalityContract

    class TestAudioContract(ModalityContract):
        modality = "audio_example"

        def make_valid_files(self, tmp_path):
            return [write_tone(tmp_path / "a.wav", 440), write_tone(tmp_path / "b.wav", 880)]

        def make_invalid_files(self, tmp_path):
            bad = tmp_path / "bad.wav"
            bad.write_bytes(b"not audio")
            return {"garbage bytes": bad}

Set ``separability_threshold`` to probe the frozen-encoder trap (a linear probe on the frozen
features of the demo must reach it); :func:`mmkit.testing.probe.linear_probe` is the helper.
"""

from mmkit.testing.contract import ModalityContract
from mmkit.testing.probe import ProbeResult, demo_examples, linear_probe

__all__ = ["ModalityContract", "ProbeResult", "demo_examples", "linear_probe"]
