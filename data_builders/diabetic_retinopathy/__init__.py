"""Diabetic retinopathy patient-case builder over the TFDS catalogue dataset
`diabetic_retinopathy_detection` (`import data_builders.diabetic_retinopathy` registers
'diabetic_retinopathy'); see diabetic_retinopathy.py.
"""

from data_builders.diabetic_retinopathy.diabetic_retinopathy import (
    CATALOGUE,
    DEFAULT_SOURCE_CONFIG,
    EYES,
    GRADES,
    INSTRUCTIONS,
    SOURCE_CONFIGS,
    DiabeticRetinopathy,
    DiabeticRetinopathyConfig,
)

__all__ = [
    "CATALOGUE",
    "DEFAULT_SOURCE_CONFIG",
    "EYES",
    "GRADES",
    "INSTRUCTIONS",
    "SOURCE_CONFIGS",
    "DiabeticRetinopathy",
    "DiabeticRetinopathyConfig",
]
