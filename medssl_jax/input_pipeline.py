"""Input pipelines: case store -> deterministic schedule -> record reads -> tf.data decode/augment.

Each process holds the metadata of its patient-sharded part of a split (`case_store.CaseStore`:
ids, patient keys, labels, record indices; never pixels). `schedule.Schedule` picks the items of
every step from (seed, step) alone; the generator reads just those records (one batched read per
step) and a parallel tf.data map decodes and augments them with stateless seeds derived from the
same (seed, step, position). So batches are bit-identical after a resume, and MICLe batches can
be made patient-unique before any pixel is touched.

Batches are dicts of NumPy arrays holding this process's rows of the global batch. Pixels are
uint8 (4x fewer bytes to the accelerator than float32; the step converts them):
  pretraining: 'views' uint8 [B, 2, S, S, 3] (two global crops of one image, or of two
  distinct images of one case with multi-instance (MICLe) pairing), 'local_views' uint8
  [B, N, s, s, 3] when the method uses multi-crop (local crop k from the first image for even k,
  the second for odd k), 'label' int32 [B] (-1 = unlabeled) or float32 [B, K] with 'label_mask',
  'patient_key' int32 [B], 'distinct' float32 [B] (1 = the views come from two images),
  'case_index' int64 [B] and 'pair' int32 [B, 2] (which images of the case; for tests/debug).
  With `color_on_device` the views are only cropped/rotated/flipped here and 'color_params'
  float32 [B, 2 + N, augment_color.NUM_COLOR_PARAMS] carries each view's colour/blur draws for
  `augment_device.device_views`. Blur and solarization probabilities may differ per view (DINO):
  `aug`'s 'view_blur_prob' / 'view_solarize_prob' (global crop 1, global crop 2, local crops).
  fine-tuning / evaluation: 'image' uint8 [B, S, S, 3].
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import tensorflow as tf

from medssl_jax import augment, augment_color, datasets
from medssl_jax.case_store import CaseStore
from medssl_jax.methods.base import Views
from medssl_jax.schedule import Schedule, _rng


def load_store(
    data: Mapping[str, Any],
    split: str,
    *,
    label_fraction: float = 1.0,
    process_index: int = 0,
    process_count: int = 1,
    unlabel_rest: bool = False,
) -> CaseStore:
    """This process's shard of `split` of the dataset described by config `data`
    (`unlabel_rest`: keep every case, hide the labels outside `label_fraction`)."""
    store, spec = datasets.load(
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
    if not store.num_cases:
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


def to_uint8(image: tf.Tensor) -> tf.Tensor:
    """float32 [..., 3] in [0, 1] -> uint8 (rounded), the form pixels travel in."""
    return tf.cast(tf.round(tf.clip_by_value(image, 0.0, 1.0) * 255.0), tf.uint8)


def pretrain_elements(
    store: CaseStore,
    sched: Schedule,
    *,
    batch_size: int,
    seed: int,
    start_step: int,
    multi_instance: bool,
    process_index: int = 0,
    distinct_prob: float = 1.0,
    image_items: bool = False,
) -> Iterator[dict[str, Any]]:
    """Un-augmented pretraining elements, batch after batch from `start_step`.

    The schedule's items are cases (multi-instance) or rows of the store's per-image arrays
    (also multi-instance with `image_items`). Multi-instance (MICLe) pairing: a case with
    M >= 2 images gives two distinct images drawn afresh at every visit (with probability
    `distinct_prob`; else one image twice, a SimCLR pair), with `image_items` the item's image
    and another of its case; M == 1 gives its one image twice ('b' empty, 'distinct' 0).
    Otherwise: the item's image twice. 'seed' is the stateless augmentation seed of the element.
    """
    step = start_step
    while True:
        rng = _rng(seed, process_index, step, 3)
        rows = []
        if multi_instance:
            items = sched.batch(step)
            if image_items:
                cases, firsts = (x.tolist() for x in store.locate(items))
            else:
                cases, firsts = items.tolist(), [None] * len(items)
            for c, first in zip(cases, firsts, strict=True):
                m = store.count(c)
                # No draw at distinct_prob 1: plain MICLe batches stay bit-identical.
                pair = m >= 2 and (distinct_prob >= 1.0 or rng.random() < distinct_prob)
                if first is None:
                    if pair:
                        i, j = (int(x) for x in rng.choice(m, size=2, replace=False))
                    else:
                        i = j = int(rng.integers(m))
                else:
                    i = j = int(first)
                    if pair:  # another image of the case, uniformly
                        j = (i + 1 + int(rng.integers(m - 1))) % m
                rows.append((c, i, j))
        else:
            cases, images = store.locate(sched.batch(step))
            rows = [(c, i, i) for c, i in zip(cases.tolist(), images.tolist(), strict=True)]
        pairs = [(c, i) for c, i, _ in rows] + [(c, j) for c, i, j in rows if j != i]
        encoded = dict(zip(pairs, store.read(pairs), strict=True))
        for pos, (c, i, j) in enumerate(rows):
            yield {
                "a": encoded[(c, i)],
                "b": encoded[(c, j)] if j != i else b"",
                "seed": np.asarray([seed * 7919 + process_index, step * batch_size + pos]),
                "patient_key": np.int32(store.patient_keys[c]),
                "distinct": np.float32(i != j),
                "case_index": np.int64(c),
                "pair": np.asarray([i, j], np.int32),
                **store.label_of(c, i),
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
    color_on_device: bool = False,
    distinct_prob: float = 1.0,
    image_items: bool = False,
) -> tuple[tf.data.Dataset, Schedule]:
    """Infinite pretraining batches from `start_step` on: the crops `views` declares, of one
    image per example or (multi_instance) of two distinct images of one case; with
    `color_on_device`, without their colour/blur stage (see the module docstring).
    `distinct_prob` and `image_items`: see `pretrain_elements` (config.sampler). `aug`: the
    `augment.pretrain_view` keywords, plus optional 'view_blur_prob' and 'view_solarize_prob'
    (3 probabilities each: global crop 1, global crop 2, every local crop), which become each
    view's `blur_prob` / `solarize_prob`."""
    # Epochs over cases (multi-instance) or over images (rows of the store's per-image arrays).
    by_case = multi_instance and not image_items
    num_items = store.num_cases if by_case else store.num_images
    keys = None
    if multi_instance and patient_unique:
        # Per item: the case's patient, or (image items) the patient of each image row.
        keys = (
            store.patient_keys
            if by_case
            else store.patient_keys[store.locate(np.arange(store.num_images))[0]]
        )
    sched = Schedule(num_items, batch_size, seed, salt=process_index, patient_keys=keys)

    def generate():
        yield from pretrain_elements(
            store,
            sched,
            batch_size=batch_size,
            seed=seed,
            start_step=start_step,
            multi_instance=multi_instance,
            process_index=process_index,
            distinct_prob=distinct_prob,
            image_items=image_items,
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
    per_view = _per_view_probs(view_kwargs)  # pops the view_* keys
    geometry_kwargs, color_kwargs = augment.split_view_kwargs(view_kwargs)
    g, loc = views.global_crops, views.local_crops
    n_local = views.num_local

    def make_views(ex):
        seeds = tf.random.experimental.stateless_split(ex.pop("seed"), 2 + n_local)
        img_a = datasets.decode_float(ex.pop("a"))
        enc_b = ex.pop("b")
        img_b = tf.cond(
            tf.strings.length(enc_b) > 0, lambda: datasets.decode_float(enc_b), lambda: img_a
        )
        params = []

        def crop(img, i, c):
            probs = per_view[min(i, 2)]  # view 0, view 1, then every local crop
            if not color_on_device:
                return to_uint8(
                    augment.pretrain_view(
                        img,
                        seeds[i],
                        image_size=c.size,
                        area_range=c.area_range,
                        **view_kwargs,
                        **probs,
                    )
                )
            params.append(augment_color.color_params(seeds[i], **color_kwargs, **probs))
            x = augment.pretrain_geometry(
                img, seeds[i], image_size=c.size, area_range=c.area_range, **geometry_kwargs
            )
            return to_uint8(x)

        ex["views"] = tf.stack([crop(img_a, 0, g), crop(img_b, 1, g)])  # [2, S, S, 3]
        if n_local:
            local = [crop(img_a if k % 2 == 0 else img_b, 2 + k, loc) for k in range(n_local)]
            ex["local_views"] = tf.stack(local)  # [N, s, s, 3]
        if color_on_device:
            ex["color_params"] = tf.stack(params)  # [2 + N, P]
        return ex

    ds = tf.data.Dataset.from_generator(generate, output_signature=signature)
    ds = ds.map(make_views, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(batch_size, drop_remainder=True).prefetch(2)
    return ds, sched


def _per_view_probs(kwargs: dict[str, Any]) -> list[dict[str, float]]:
    """Pops 'view_blur_prob' / 'view_solarize_prob' (3-tuples: global crop 1, global crop 2,
    local crops) from `kwargs` and returns the 3 view kinds' `blur_prob` / `solarize_prob`
    keywords; a key that is absent adds nothing (`color_params`' default or `kwargs`' own)."""
    out: list[dict[str, float]] = [{}, {}, {}]
    for key, name in (("view_blur_prob", "blur_prob"), ("view_solarize_prob", "solarize_prob")):
        if key not in kwargs:
            continue
        probs = tuple(float(p) for p in kwargs.pop(key))
        if len(probs) != 3:
            raise ValueError(f"{key} must hold 3 probabilities, got {probs!r}")
        if name in kwargs:
            raise ValueError(f"give {key} or {name}, not both")
        for kind, p in enumerate(probs):
            out[kind][name] = p
    return out


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
    sched = Schedule(store.num_images, batch_size, seed, salt=process_index)

    def generate():
        step = start_step
        while True:
            cases, images = store.locate(sched.batch(step))
            pairs = list(zip(cases.tolist(), images.tolist(), strict=True))
            for pos, ((c, i), enc) in enumerate(zip(pairs, store.read(pairs), strict=True)):
                yield {
                    "a": enc,
                    "seed": np.asarray([seed * 7919 + process_index, step * batch_size + pos]),
                    **store.label_of(c, i),
                }
            step += 1

    signature = {
        "a": tf.TensorSpec([], tf.string),
        "seed": tf.TensorSpec([2], tf.int64),
        **_label_signature(store.spec),
    }

    def view(ex):
        img = datasets.decode_float(ex.pop("a"))
        ex["image"] = to_uint8(
            augment.finetune_view(img, ex.pop("seed"), image_size=image_size, **aug)
        )
        return ex

    ds = tf.data.Dataset.from_generator(generate, output_signature=signature)
    ds = ds.map(view, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.batch(batch_size, drop_remainder=True).prefetch(2), sched


def eval_batches(
    store: CaseStore, *, batch_size: int, image_size: int
) -> Iterator[dict[str, np.ndarray]]:
    """Every image of the store once, centre-cropped, in order; the last batch is padded and
    'valid' (float32 [B]) marks real rows. Also yields 'index' [B]: the row of the store's
    per-image arrays."""
    n = store.num_images
    padded = -(-n // batch_size) * batch_size

    def generate():
        for start in range(0, padded, batch_size):
            n_b = batch_size
            rows = np.minimum(np.arange(start, start + n_b), n - 1)
            cases, images = store.locate(rows)
            pairs = list(zip(cases.tolist(), images.tolist(), strict=True))
            encoded = store.read(pairs)
            for r, (c, i), enc in zip(range(start, start + n_b), pairs, encoded, strict=True):
                yield {
                    "a": enc,
                    "valid": np.float32(r < n),
                    "index": np.int64(min(r, n - 1)),
                    **store.label_of(c, i),
                }

    signature = {
        "a": tf.TensorSpec([], tf.string),
        "valid": tf.TensorSpec([], tf.float32),
        "index": tf.TensorSpec([], tf.int64),
        **_label_signature(store.spec),
    }

    def view(ex):
        img = datasets.decode_float(ex.pop("a"))
        ex["image"] = to_uint8(augment.eval_view(img, image_size=image_size))
        return ex

    ds = tf.data.Dataset.from_generator(generate, output_signature=signature)
    ds = ds.map(view, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.batch(batch_size).prefetch(2).as_numpy_iterator()
