"""Input pipelines: host case store -> deterministic schedule -> tf.data decode/augment -> batches.

Each process holds its patient-sharded part of a split as ENCODED bytes in host memory
(`CaseStore`); `schedule.Schedule` picks the items of every step from (seed, step) alone, and a
parallel tf.data map decodes and augments them with stateless seeds derived from the same
(seed, step, position). So batches are bit-identical after a resume, and MICLe batches can be
made patient-unique before any pixel is touched.

Batches are dicts of NumPy arrays holding this process's rows of the global batch:
  pretraining: 'views' float32 [B, 2, S, S, 3] (two global crops of one image, or of two
  distinct images of one case with multi-instance (MICLe) pairing), 'local_views' float32
  [B, N, s, s, 3] when the method uses multi-crop (local crop k from the first image for even k,
  the second for odd k), 'label' int32 [B] (-1 = unlabeled) or float32 [B, K] with 'label_mask',
  'patient_key' int32 [B], 'distinct' float32 [B] (1 = the views come from two images),
  'case_index' int64 [B] and 'pair' int32 [B, 2] (which images of the case; for tests/debug).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import tensorflow as tf

from medssl_jax import augment, datasets
from medssl_jax.methods.base import Views
from medssl_jax.schedule import Schedule, _rng


@dataclasses.dataclass
class CaseStore:
    """One process's shard of a split: per-case encoded images, ids, labels (host memory)."""

    spec: datasets.DataSpec
    images: list[list[bytes]]
    image_ids: list[list[str]]
    case_ids: list[str]
    patient_ids: list[str]
    patient_keys: np.ndarray  # int32 [C]
    labels: list[np.ndarray]  # per case: int32 [M] or float32 [M, K]
    label_masks: list[np.ndarray] | None  # per case float32 [M, K] (multilabel)

    @property
    def num_cases(self) -> int:
        return len(self.case_ids)

    @property
    def num_images(self) -> int:
        return int(sum(len(x) for x in self.images))

    def flat_index(self) -> np.ndarray:
        """[N, 2] (case, image) pairs: one row per image."""
        return np.asarray(
            [(c, i) for c, imgs in enumerate(self.images) for i in range(len(imgs))], np.int64
        ).reshape(-1, 2)


def load_store(
    data: Mapping[str, Any],
    split: str,
    *,
    label_fraction: float = 1.0,
    process_index: int = 0,
    process_count: int = 1,
    unlabel_rest: bool = False,
) -> CaseStore:
    """Read this process's shard of `split` of the dataset described by config `data`
    (`unlabel_rest`: keep every case, hide the labels outside `label_fraction`)."""
    ds, spec = datasets.load(
        data["name"],
        split,
        data_dir=data.get("data_dir") or None,
        manual_dir=data.get("manual_dir") or None,
        options=dict(data.get("options") or {}),
        label_fraction=label_fraction,
        fraction_seed=int(data.get("fraction_seed", 0)),
        process_index=process_index,
        process_count=process_count,
        unlabel_rest=unlabel_rest,
        skip_bad_rows=bool(data.get("skip_bad_rows", False)),
    )
    store = CaseStore(spec, [], [], [], [], np.zeros(0, np.int32), [], None)
    keys, masks = [], []
    for ex in ds.as_numpy_iterator():
        store.images.append(list(ex["images"]))
        store.image_ids.append([s.decode() for s in ex["image_ids"]])
        store.case_ids.append(ex["case_id"].decode())
        store.patient_ids.append(ex["patient_id"].decode())
        keys.append(int(ex["patient_key"]))
        store.labels.append(np.asarray(ex["label"]))
        if "label_mask" in ex:
            masks.append(np.asarray(ex["label_mask"], np.float32))
    store.patient_keys = np.asarray(keys, np.int32)
    store.label_masks = masks if masks else None
    if not store.case_ids:
        raise ValueError(
            f"dataset {spec.name!r} split {split!r} has no cases for process {process_index} of "
            f"{process_count} (label_fraction={label_fraction})"
        )
    return store


def _label_signature(spec: datasets.DataSpec) -> dict[str, tf.TensorSpec]:
    if spec.label_kind == "multilabel":
        k = spec.num_classes
        return {
            "label": tf.TensorSpec([k], tf.float32),
            "label_mask": tf.TensorSpec([k], tf.float32),
        }
    return {"label": tf.TensorSpec([], tf.int32)}


def _label_of(store: CaseStore, c: int, i: int) -> dict[str, np.ndarray]:
    if store.spec.label_kind == "multilabel":
        return {
            "label": np.asarray(store.labels[c][i], np.float32),
            "label_mask": np.asarray(store.label_masks[c][i], np.float32),
        }
    if store.spec.label_kind == "none":
        return {"label": np.int32(-1)}
    return {"label": np.int32(store.labels[c][i])}


def pretrain_elements(
    store: CaseStore,
    sched: Schedule,
    items: np.ndarray,
    *,
    batch_size: int,
    seed: int,
    start_step: int,
    multi_instance: bool,
    process_index: int = 0,
) -> Iterator[dict[str, Any]]:
    """Un-augmented pretraining elements, batch after batch from `start_step`.

    Multi-instance (MICLe) pairing: a case with M >= 2 images gives two distinct images drawn
    afresh at every visit; M == 1 gives its one image twice ('b' empty, 'distinct' 0).
    Otherwise: the item's image twice. 'seed' is the stateless augmentation seed of the element.
    """
    step = start_step
    while True:
        rng = _rng(seed, process_index, step, 3)
        for pos, it in enumerate(sched.batch(step)):
            c, i = (int(x) for x in items[it])
            m = len(store.images[c])
            if multi_instance and m >= 2:
                i, j = (int(x) for x in rng.choice(m, size=2, replace=False))
            else:
                i = int(rng.integers(m)) if multi_instance else i
                j = i
            yield {
                "a": store.images[c][i],
                "b": store.images[c][j] if j != i else b"",
                "seed": np.asarray([seed * 7919 + process_index, step * batch_size + pos]),
                "patient_key": np.int32(store.patient_keys[c]),
                "distinct": np.float32(i != j),
                "case_index": np.int64(c),
                "pair": np.asarray([i, j], np.int32),
                **_label_of(store, c, i),
            }
        step += 1


def pretrain_dataset(
    store: CaseStore,
    *,
    batch_size: int,
    views: Views,
    aug: Mapping[str, Any],
    seed: int,
    start_step: int = 0,
    multi_instance: bool = False,
    patient_unique: bool = False,
    process_index: int = 0,
) -> tuple[tf.data.Dataset, Schedule]:
    """Infinite pretraining batches from `start_step` on: the crops `views` declares, of one
    image per example or (multi_instance) of two distinct images of one case."""
    if multi_instance:  # epochs over cases
        items = np.stack([np.arange(store.num_cases), np.zeros(store.num_cases, np.int64)], 1)
        keys = store.patient_keys if patient_unique else None
    else:  # epochs over images
        items = store.flat_index()
        keys = None
    sched = Schedule(len(items), batch_size, seed, salt=process_index, patient_keys=keys)

    def generate():
        yield from pretrain_elements(
            store,
            sched,
            items,
            batch_size=batch_size,
            seed=seed,
            start_step=start_step,
            multi_instance=multi_instance,
            process_index=process_index,
        )

    signature = {
        "a": tf.TensorSpec([], tf.string),
        "b": tf.TensorSpec([], tf.string),
        "seed": tf.TensorSpec([2], tf.int64),
        "patient_key": tf.TensorSpec([], tf.int32),
        "distinct": tf.TensorSpec([], tf.float32),
        "case_index": tf.TensorSpec([], tf.int64),
        "pair": tf.TensorSpec([2], tf.int32),
        **_label_signature(store.spec),
    }
    view_kwargs = dict(aug)
    g, loc = views.global_crops, views.local_crops
    n_local = views.num_local

    def make_views(ex):
        seeds = tf.random.experimental.stateless_split(ex.pop("seed"), 2 + n_local)
        img_a = datasets.decode_image(ex.pop("a"))
        enc_b = ex.pop("b")
        img_b = tf.cond(
            tf.strings.length(enc_b) > 0, lambda: datasets.decode_image(enc_b), lambda: img_a
        )

        def crop(img, i, c):
            return augment.pretrain_view(
                img, seeds[i], image_size=c.size, area_range=c.area_range, **view_kwargs
            )

        ex["views"] = tf.stack([crop(img_a, 0, g), crop(img_b, 1, g)])  # [2, S, S, 3]
        if n_local:
            local = [crop(img_a if k % 2 == 0 else img_b, 2 + k, loc) for k in range(n_local)]
            ex["local_views"] = tf.stack(local)  # [N, s, s, 3]
        return ex

    ds = tf.data.Dataset.from_generator(generate, output_signature=signature)
    ds = ds.map(make_views, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(batch_size, drop_remainder=True).prefetch(2)
    return ds, sched


def finetune_dataset(
    store: CaseStore,
    *,
    batch_size: int,
    image_size: int,
    aug: Mapping[str, Any],
    seed: int,
    start_step: int = 0,
    process_index: int = 0,
) -> tuple[tf.data.Dataset, Schedule]:
    """Infinite supervised training batches {'image' [B,S,S,3], 'label', ('label_mask')}."""
    items = store.flat_index()
    sched = Schedule(len(items), batch_size, seed, salt=process_index)

    def generate():
        step = start_step
        while True:
            for pos, it in enumerate(sched.batch(step)):
                c, i = (int(x) for x in items[it])
                yield {
                    "a": store.images[c][i],
                    "seed": np.asarray([seed * 7919 + process_index, step * batch_size + pos]),
                    **_label_of(store, c, i),
                }
            step += 1

    signature = {
        "a": tf.TensorSpec([], tf.string),
        "seed": tf.TensorSpec([2], tf.int64),
        **_label_signature(store.spec),
    }

    def view(ex):
        img = datasets.decode_image(ex.pop("a"))
        ex["image"] = augment.finetune_view(img, ex.pop("seed"), image_size=image_size, **aug)
        return ex

    ds = tf.data.Dataset.from_generator(generate, output_signature=signature)
    ds = ds.map(view, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.batch(batch_size, drop_remainder=True).prefetch(2), sched


def eval_batches(
    store: CaseStore, *, batch_size: int, image_size: int
) -> Iterator[dict[str, np.ndarray]]:
    """Every image of the store once, centre-cropped, in order; the last batch is padded and
    'valid' (float32 [B]) marks real rows. Also yields 'index' [B] into `store.flat_index()`."""
    items = store.flat_index()
    n = len(items)
    padded = -(-n // batch_size) * batch_size

    def generate():
        for r in range(padded):
            c, i = (int(x) for x in items[min(r, n - 1)])
            yield {
                "a": store.images[c][i],
                "valid": np.float32(r < n),
                "index": np.int64(min(r, n - 1)),
                **_label_of(store, c, i),
            }

    signature = {
        "a": tf.TensorSpec([], tf.string),
        "valid": tf.TensorSpec([], tf.float32),
        "index": tf.TensorSpec([], tf.int64),
        **_label_signature(store.spec),
    }

    def view(ex):
        img = datasets.decode_image(ex.pop("a"))
        ex["image"] = augment.eval_view(img, image_size=image_size)
        return ex

    ds = tf.data.Dataset.from_generator(generate, output_signature=signature)
    ds = ds.map(view, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.batch(batch_size).prefetch(2).as_numpy_iterator()
