"""PAD-UFES-20 lesion-level TFDS builder (`import data_builders.pad_ufes20` registers
'pad_ufes20')."""

from data_builders.pad_ufes20.pad_ufes20 import (
    CLASSES,
    MANUAL_DOWNLOAD_INSTRUCTIONS,
    PadUfes20,
    PadUfes20Config,
)

__all__ = ["CLASSES", "MANUAL_DOWNLOAD_INSTRUCTIONS", "PadUfes20", "PadUfes20Config"]
