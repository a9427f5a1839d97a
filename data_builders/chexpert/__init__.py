"""CheXpert case-level TFDS builder (`import data_builders.chexpert` registers 'chexpert').

`read_transform` is the reader hook of `medssl_jax.datasets.load` (uncertainty policy, condition
set, views); see labels.py.
"""

from data_builders.chexpert.chexpert import (
    FINDING_STATES,
    FINDINGS,
    MANUAL_DOWNLOAD_INSTRUCTIONS,
    Chexpert,
    ChexpertConfig,
)
from data_builders.chexpert.labels import COMPETITION, read_transform, resolve_options

__all__ = [
    "COMPETITION",
    "FINDINGS",
    "FINDING_STATES",
    "MANUAL_DOWNLOAD_INSTRUCTIONS",
    "Chexpert",
    "ChexpertConfig",
    "read_transform",
    "resolve_options",
]
