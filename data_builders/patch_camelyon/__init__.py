"""PatchCamelyon case builder over the TFDS catalogue dataset `patch_camelyon`.

`import data_builders.patch_camelyon` defines (without registering over the catalogue name) the
builder that `medssl_jax.datasets.load('patch_camelyon', ...)` uses; see patch_camelyon.py.
"""

from data_builders.patch_camelyon.patch_camelyon import (
    CATALOGUE,
    CLASSES,
    INSTRUCTIONS,
    PatchCamelyon,
    PatchCamelyonConfig,
)

__all__ = ["CATALOGUE", "CLASSES", "INSTRUCTIONS", "PatchCamelyon", "PatchCamelyonConfig"]
