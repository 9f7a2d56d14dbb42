"""The built-in dataset readers."""

from mmkit import hookimpl
from mmkit.specs import ReaderSpec


@hookimpl
def mmkit_dataset_readers():
    return [
        ReaderSpec(name="lamm", read="mmkit.data.readers:read_lamm", detect="mmkit.data.readers:detect_lamm",
                   description="LAMM 2D/3D JSON; task_type selects the system message"),
        ReaderSpec(name="llava", read="mmkit.data.readers:read_llava", detect="mmkit.data.readers:detect_llava",
                   description="LLaVA JSON/JSONL (image, conversations)"),
        ReaderSpec(name="generic", read="mmkit.data.readers:read_generic",
                   detect="mmkit.data.readers:detect_generic",
                   description="any registered modality's data key; JSON list or JSONL"),
    ]
