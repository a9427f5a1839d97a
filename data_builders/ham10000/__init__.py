"""HAM10000 lesion-level TFDS builder (`import data_builders.ham10000` registers 'ham10000')."""

from data_builders.ham10000.ham10000 import (
    CLASSES,
    MANUAL_DOWNLOAD_INSTRUCTIONS,
    Ham10000,
    Ham10000Config,
)

__all__ = ["CLASSES", "MANUAL_DOWNLOAD_INSTRUCTIONS", "Ham10000", "Ham10000Config"]
