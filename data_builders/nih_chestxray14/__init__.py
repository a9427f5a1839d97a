"""NIH ChestX-ray14 case-level TFDS builder (`import data_builders.nih_chestxray14` registers
'nih_chestxray14').

`read_transform` is the reader hook of `medssl_jax.datasets.load`: multi-label targets over the
14 findings, every label valid (see labels.py).
"""

from data_builders.nih_chestxray14.labels import read_transform
from data_builders.nih_chestxray14.nih_chestxray14 import (
    AP_PA,
    FINDINGS,
    MANUAL_DOWNLOAD_INSTRUCTIONS,
    SEXES,
    NihChestXray14,
    NihChestXray14Config,
)

__all__ = [
    "AP_PA",
    "FINDINGS",
    "MANUAL_DOWNLOAD_INSTRUCTIONS",
    "SEXES",
    "NihChestXray14",
    "NihChestXray14Config",
    "read_transform",
]
