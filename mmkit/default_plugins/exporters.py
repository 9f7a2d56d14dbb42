"""The built-in export formats (definitions in mmkit.export.formats)."""

from mmkit import hookimpl
from mmkit.specs import ExporterSpec


@hookimpl
def mmkit_exporters():
    return [
        ExporterSpec(name="peft", export="mmkit.export.formats:export_peft",
                     description="each LoRA adapter as a PEFT folder (PeftModel.from_pretrained, vLLM multi-LoRA), "
                                 "plus projectors, marker embeddings and encoders as safetensors"),
        ExporterSpec(name="merged", export="mmkit.export.formats:export_merged",
                     description="the base LLM with one adapter (--adapter) merged and the markers in its "
                                 "vocabulary, a plain HF causal LM, beside encoders and projectors"),
    ]
