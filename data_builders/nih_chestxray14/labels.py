"""Read-time labels of the `nih_chestxray14` builder (the reader hook `read_transform`).

Every image is labelled for all 14 findings: 'label' float32[M, 14] is the stored multi-hot
`findings` vector (order `FINDINGS`, 'No Finding' = all zeros) and 'label_mask' is all ones. The
hook takes no options.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import tensorflow as tf
import tensorflow_datasets as tfds

from data_builders.nih_chestxray14.nih_chestxray14 import FINDINGS


def read_transform(
    options: Mapping[str, Any] | None, info: tfds.core.DatasetInfo | None = None
) -> tuple[Callable[[dict[str, tf.Tensor]], dict[str, tf.Tensor]], dict[str, Any]]:
    """Reader hook: (fn(example) -> example with 'label' [M, 14] and 'label_mask' [M, 14];
    DataSpec fields). `fn` never reads 'images'."""
    del info  # features are fixed by the builder
    if options:
        raise ValueError(f"nih_chestxray14: unknown option(s) {sorted(options)}; it takes none")

    def fn(example: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        label = tf.cast(example["findings"], tf.float32)
        label = tf.ensure_shape(label, [None, len(FINDINGS)])
        return {**example, "label": label, "label_mask": tf.ones_like(label)}

    fields = {"label_kind": "multilabel", "num_classes": len(FINDINGS), "class_names": FINDINGS}
    return fn, fields
