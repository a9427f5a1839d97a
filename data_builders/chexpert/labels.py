"""Read-time label policies for the `chexpert` builder (the reader hook `read_transform`).

Options (all optional):
- 'uncertainty': how an uncertain (-1.0) finding becomes a training target (Irvin et al. 2019):
    'u_ones' (default): uncertain -> 1 (their best single policy for Atelectasis and Edema);
    'u_zeros': uncertain -> 0;
    'u_ignore': uncertain -> masked out (label_mask 0);
    'u_multiclass': each condition becomes 3 classes (negative, positive, uncertain); label is
        float32[M, 3*C], one-hot per condition, condition-major (reshape to [M, C, 3] and use a
        softmax per condition; the positive probability is [..., 1]).
- 'conditions': 'competition' (default; the 5 CheXpert competition tasks in the paper's order:
    Atelectasis, Cardiomegaly, Consolidation, Edema, Pleural Effusion) or 'all' (the 14 findings
    in CSV order).
- 'views': 'all' (default) or 'frontal' (lateral images dropped via 'keep_image').
Blank (not mentioned) findings count as NEGATIVE under every policy, with label_mask 1 (the
common CheXpert practice; the label-mining tool reports no mention as no evidence of the finding).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import tensorflow as tf
import tensorflow_datasets as tfds

from data_builders.chexpert.chexpert import FINDING_KEYS, FINDINGS, VIEWS

COMPETITION: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Pleural Effusion",
)
UNCERTAINTY = ("u_ones", "u_zeros", "u_ignore", "u_multiclass")
CONDITIONS = {"competition": COMPETITION, "all": FINDINGS}
VIEW_OPTIONS = ("all", "frontal")
_DEFAULTS = {"uncertainty": "u_ones", "conditions": "competition", "views": "all"}
_VALID = {"uncertainty": UNCERTAINTY, "conditions": tuple(CONDITIONS), "views": VIEW_OPTIONS}
_POSITIVE, _UNCERTAIN = 1, 2  # ClassLabel indices of FINDING_STATES


def resolve_options(options: Mapping[str, Any] | None) -> dict[str, str]:
    """Options with defaults filled in; unknown names/values raise ValueError listing valid ones."""
    options = dict(options or {})
    unknown = sorted(set(options) - set(_VALID))
    if unknown:
        raise ValueError(f"chexpert: unknown option(s) {unknown}; valid options: {sorted(_VALID)}")
    out = {**_DEFAULTS, **options}
    for key, valid in _VALID.items():
        if out[key] not in valid:
            raise ValueError(f"chexpert: option {key!r}={out[key]!r} is invalid; valid: {valid}")
    return out


def read_transform(
    options: Mapping[str, Any] | None, info: tfds.core.DatasetInfo | None = None
) -> tuple[Callable[[dict[str, tf.Tensor]], dict[str, tf.Tensor]], dict[str, Any]]:
    """Reader hook: (fn(example) -> example with 'label' [M,K], 'label_mask' [M,K], 'keep_image'
    [M]; DataSpec fields). `fn` never reads 'images'."""
    del info  # features are fixed by the builder
    opts = resolve_options(options)
    conditions = CONDITIONS[opts["conditions"]]
    keys = [FINDING_KEYS[c] for c in conditions]
    policy = opts["uncertainty"]
    frontal_only = opts["views"] == "frontal"
    frontal = VIEWS.index("frontal")

    def fn(example: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        states = tf.stack([tf.cast(example["findings"][k], tf.int32) for k in keys], axis=-1)
        positive = tf.equal(states, _POSITIVE)  # [M, C]
        uncertain = tf.equal(states, _UNCERTAIN)
        if policy == "u_multiclass":
            cls = tf.where(uncertain, 2, tf.where(positive, 1, 0))
            label = tf.reshape(tf.one_hot(cls, 3, dtype=tf.float32), [-1, 3 * len(keys)])
            mask = tf.ones_like(label)
        else:
            target = positive | uncertain if policy == "u_ones" else positive
            label = tf.cast(target, tf.float32)
            if policy == "u_ignore":
                mask = 1.0 - tf.cast(uncertain, tf.float32)
            else:
                mask = tf.ones_like(label)
        out = dict(example)
        out["label"] = label
        out["label_mask"] = mask
        if frontal_only:
            out["keep_image"] = tf.equal(tf.cast(example["view"], tf.int32), frontal)
        else:
            out["keep_image"] = tf.ones_like(positive[:, 0])
        return out

    if policy == "u_multiclass":
        class_names = tuple(
            f"{c}:{s}" for c in conditions for s in ("negative", "positive", "uncertain")
        )
    else:
        class_names = tuple(conditions)
    fields = {
        "label_kind": "multilabel",
        "num_classes": len(class_names),
        "class_names": class_names,
    }
    return fn, fields
