"""The built-in dataset readers."""

from mmkit import hookimpl
from mmkit.specs import ReaderSpec


@hookimpl
def mmkit_dataset_readers():
    return [
        ReaderSpec(name="lamm", read="mmkit.data.readers:read_lamm", detect="mmkit.data.readers:detect_lamm",
                   description="LAMM 2D/3D JSON as published (no placeholder); task_type selects the system message"),
        ReaderSpec(name="llava", read="mmkit.data.readers:read_llava", detect="mmkit.data.readers:detect_llava",
                   description="LLaVA JSON/JSONL (image, conversations), LLaVA-1.5 mix665k"),
        ReaderSpec(name="hf_datasets", read="mmkit.data.hf_datasets:read_hf_dataset",
                   detect="mmkit.data.hf_datasets:detect_hf_dataset",
                   description="Hugging Face datasets: parquet, arrow, dataset directories, hf:NAME (streamed)"),
        ReaderSpec(name="generic", read="mmkit.data.readers:read_generic",
                   detect="mmkit.data.readers:detect_generic",
                   description="conversations or messages (ShareGPT, TRL/HF chat with content parts, ms-swift); any "
                               "modality's data key or its plural; JSON list or JSONL"),
    ]
