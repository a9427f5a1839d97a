"""Per-case dataset reader over the TFDS builders in `data_builders/` (one TFDS example = one case).

BUILDER HOOK (contract for every `data_builders/<name>` package)
-----------------------------------------------------------------
`load(name, ...)` imports `data_builders.<name>` (which registers its TFDS builder class) and then
looks in that module for an optional function

    def read_transform(
        options: Mapping[str, Any], info: tfds.core.DatasetInfo
    ) -> tuple[Callable[[dict[str, tf.Tensor]], dict[str, tf.Tensor]], Mapping[str, Any]]:

- `options` is the `options` mapping given to `load` (possibly empty). The hook validates it and
  raises `ValueError` naming the bad option and the valid names/values (e.g. CheXpert:
  {'uncertainty': 'u_ignore'|'u_zeros'|'u_ones'|'u_multiclass', 'conditions': 'competition'|'all'}).
- It returns `(fn, fields)`:
  * `fn(example) -> example`: a pure TF function (runs inside `tf.data.Dataset.map`) taking the
    raw TFDS example dict (all features of the builder, as tensors; per-image Sequence features
    have leading dim M) and returning a dict that contains at least
      'label':      int32[M]  for 'multiclass' (-1 = no label for that image),
                    float32[M, K] for 'multilabel',
      'label_mask': float32[M, K] (multilabel only; 1 where the label counts, 0 = ignore),
    and optionally
      'keep_image': bool[M]   (images to keep, e.g. frontal views only; cases left with no image
                               are dropped).
    `fn` MUST NOT read 'images': index passes run it on examples without the 'images' key
    (to avoid reading pixel data); every other feature is present. Other keys it returns are
    ignored by the reader.
  * `fields`: {'label_kind': 'multiclass'|'multilabel'|'none', 'num_classes': int,
    'class_names': tuple[str, ...]} -> copied into the returned `DataSpec`.
Builders WITHOUT `read_transform` get the default: if the builder has a feature 'label' of type
`Sequence(ClassLabel)` the dataset is 'multiclass' with those class names, otherwise 'none'
(label = -1 for every image); such builders accept no options (non-empty options -> ValueError).

The builder class is found in the package namespace by its TFDS `name` (so a builder declared
with `skip_registration=True` works), falling back to the TFDS registry. Names may carry a
config: 'demo/small'.

Splits: builders assign patients to splits with `medssl_jax.data_splits.patient_split`.
Index: `load` makes one pass over the non-image features of a split (case ids, patient keys,
image counts, first-image labels for stratified label fractions) and caches it in memory and as
`<builder.data_dir>/medssl_index-<hash>.npz` (hash of split, options and the hook's source file).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import os
import sys
import threading
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from medssl_jax import data_splits

LABEL_KINDS = ("multiclass", "multilabel", "none")
_INDEX_VERSION = 1
_index_cache: dict[str, dict[str, np.ndarray]] = {}
_index_lock = threading.Lock()

Transform = Callable[[dict[str, tf.Tensor]], dict[str, tf.Tensor]]


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """What the training code needs to know about a loaded split."""

    name: str
    split: str
    label_kind: str  # 'multiclass' | 'multilabel' | 'none'
    num_classes: int  # 0 for 'none'
    class_names: tuple[str, ...]
    num_cases: int  # after label_fraction, BEFORE process sharding
    num_images: int  # images of those cases


def default_data_dir(data_dir: str | None = None) -> str:
    """`data_dir` if given, else $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
    if data_dir:
        return os.path.expanduser(str(data_dir))
    env = os.environ.get("TFDS_DATA_DIR")
    if env:
        return os.path.expanduser(env)
    return os.path.expanduser(os.path.join("~", "tensorflow_datasets"))


def patient_key(patient_id: tf.Tensor | str) -> tf.Tensor:
    """Stable non-negative int32 hash of a patient id (FarmHash fingerprint mod 2**31 - 1)."""
    return tf.cast(tf.strings.to_hash_bucket_fast(patient_id, 2**31 - 1), tf.int32)


def _known_names() -> tuple[str, ...]:
    from data_builders import KNOWN

    return tuple(KNOWN)


def import_builder_module(name: str):
    """Imports `data_builders.<base name>` (registering its builder); ValueError if unknown."""
    base = str(name).split("/")[0]
    known = _known_names()
    if not base or not base.replace("_", "").isalnum():
        raise ValueError(f"dataset name {name!r} is not valid; known datasets: {known}")
    try:
        return importlib.import_module(f"data_builders.{base}")
    except ModuleNotFoundError as e:
        if e.name in (f"data_builders.{base}", "data_builders"):
            raise ValueError(f"unknown dataset name {name!r}; known datasets: {known}") from None
        raise


def _builder_class(module, base: str) -> type[tfds.core.DatasetBuilder]:
    """The DatasetBuilder subclass named `base` defined by the builder package."""
    for value in vars(module).values():
        if (
            isinstance(value, type)
            and issubclass(value, tfds.core.DatasetBuilder)
            and getattr(value, "name", None) == base
        ):
            return value
    return tfds.builder_cls(base)


def make_builder(
    name: str, data_dir: str | None = None, *, skip_bad_rows: bool = False
) -> tfds.core.DatasetBuilder:
    """Instantiates the builder for `name` ('demo' or 'name/config'), never touching GCS.

    `skip_bad_rows` goes to the real-data builders (case_builder.CaseBuilder): bad rows are
    dropped and listed in the metadata instead of stopping the build."""
    module = import_builder_module(name)
    base, _, config = name.partition("/")
    cls = _builder_class(module, base)
    configs = [c.name for c in (getattr(cls, "BUILDER_CONFIGS", None) or [])]
    if config and config not in configs:
        raise ValueError(
            f"unknown config {config!r} for dataset {base!r}; valid configs: {tuple(configs)}"
        )
    kwargs: dict[str, Any] = {"config": config} if config else {}
    from data_builders.case_builder import CaseBuilder

    if skip_bad_rows and issubclass(cls, CaseBuilder):
        kwargs["skip_bad_rows"] = True
    return cls(data_dir=default_data_dir(data_dir), **kwargs)


def prepare(
    builder: tfds.core.DatasetBuilder, manual_dir: str | None = None, data_dir: str | None = None
) -> None:
    """Generates the dataset if needed (offline; manual data must be in `manual_dir`, default
    `<data_dir>/downloads/manual`, as in TFDS)."""
    if builder.is_prepared():
        return
    instructions = getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None)
    if manual_dir is None and instructions:
        manual_dir = os.path.join(default_data_dir(data_dir), "downloads", "manual")
    if instructions and not os.path.isdir(os.path.expanduser(str(manual_dir))):
        raise FileNotFoundError(
            f"dataset {builder.name!r} is not prepared in {builder.data_dir} and its manual_dir "
            f"{manual_dir!r} does not exist. Expected there:\n{instructions}"
        )
    config = tfds.download.DownloadConfig(
        manual_dir=os.path.expanduser(str(manual_dir)) if manual_dir else None,
        try_download_gcs=False,
        compute_stats=tfds.download.ComputeStatsMode.SKIP,
    )
    builder.download_and_prepare(download_config=config)


class UnknownSplitError(ValueError):
    """The dataset has no split of that name (the message lists the ones it has)."""


def _check_split(builder: tfds.core.DatasetBuilder, split: str) -> None:
    valid = tuple(builder.info.splits.keys())
    base = str(split).split("[")[0]
    if base not in valid:
        raise UnknownSplitError(
            f"unknown split {split!r} for dataset {builder.name!r}; valid: {valid}"
        )


def _default_transform(
    options: Mapping[str, Any], info: tfds.core.DatasetInfo
) -> tuple[Transform, Mapping[str, Any]]:
    """Reads a per-image `Sequence(ClassLabel)` feature 'label' if present, else no labels."""
    if options:
        raise ValueError(
            f"options {sorted(options)} given, but dataset {info.name!r} takes no options"
        )
    feature = info.features["label"] if "label" in info.features.keys() else None
    inner = getattr(feature, "feature", None)
    if isinstance(inner, tfds.features.ClassLabel):
        fields = {
            "label_kind": "multiclass",
            "num_classes": inner.num_classes,
            "class_names": tuple(inner.names),
        }

        def labeled(ex: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
            return {**ex, "label": tf.cast(ex["label"], tf.int32)}

        return labeled, fields

    def unlabeled(ex: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        return {**ex, "label": -tf.ones_like(ex["image_ids"], tf.int32)}

    return unlabeled, {"label_kind": "none", "num_classes": 0, "class_names": ()}


def _resolve_transform(module, options, info) -> tuple[Transform, dict[str, Any]]:
    hook = getattr(module, "read_transform", None)
    fn, fields = (hook or _default_transform)(dict(options or {}), info)
    fields = dict(fields)
    missing = {"label_kind", "num_classes", "class_names"} - set(fields)
    if missing:
        raise ValueError(f"{module.__name__}.read_transform: fields lack {sorted(missing)}")
    if fields["label_kind"] not in LABEL_KINDS:
        raise ValueError(
            f"{module.__name__}.read_transform: label_kind {fields['label_kind']!r} "
            f"not in {LABEL_KINDS}"
        )
    fields["class_names"] = tuple(fields["class_names"])
    fields["num_classes"] = int(fields["num_classes"])
    return fn, fields


def _read_config() -> tfds.ReadConfig:
    options = tf.data.Options()
    options.deterministic = True
    return tfds.ReadConfig(options=options, try_autocache=False)


def _standardize(fn: Transform, label_kind: str, k: int, with_images: bool) -> Transform:
    """Raw TFDS example -> reader element (see `load`), applying the builder transform; checks
    label shapes ([M] or [M, k]) so a wrong hook fails with a clear shape error."""

    def apply(ex: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        out = fn(dict(ex))
        if "label" not in out:
            raise ValueError("read_transform fn must return a 'label' entry")
        elem = {
            "case_id": ex["case_id"],
            "patient_id": ex["patient_id"],
            "patient_key": patient_key(ex["patient_id"]),
            "image_ids": ex["image_ids"],
        }
        if with_images:
            elem["images"] = ex["images"]
        if label_kind == "multilabel":
            label = tf.ensure_shape(tf.cast(out["label"], tf.float32), [None, k])
            elem["label"] = label
            mask = out.get("label_mask", tf.ones_like(label))
            elem["label_mask"] = tf.ensure_shape(tf.cast(mask, tf.float32), [None, k])
        else:
            elem["label"] = tf.ensure_shape(tf.cast(out["label"], tf.int32), [None])
        if "keep_image" in out:
            keep = tf.cast(out["keep_image"], tf.bool)
            for key in ("images", "image_ids", "label", "label_mask"):
                if key in elem:
                    elem[key] = tf.boolean_mask(elem[key], keep)
        elem["num_images"] = tf.shape(elem["image_ids"], out_type=tf.int32)[0]
        return elem

    return apply


def _build_index(builder, split: str, fn: Transform, label_kind: str, k: int) -> dict:
    """One pass over the split's non-image features: per-case ids, sizes, first-image labels."""
    features = [f for f in builder.info.features.keys() if f != "images"]
    decoders = tfds.decode.PartialDecoding({f: True for f in features})
    ds = builder.as_dataset(
        split=split, shuffle_files=False, decoders=decoders, read_config=_read_config()
    )
    std = _standardize(fn, label_kind, k, with_images=False)

    def summarize(ex):
        e = std(ex)
        n = e["num_images"]
        if label_kind == "multilabel":
            pad = tf.zeros([1, k], tf.float32)
            first = tf.concat([e["label"], pad], 0)[0]
            first_mask = tf.concat([e["label_mask"], pad], 0)[0]
        else:
            first = tf.concat([e["label"], [-1]], 0)[0]
            first_mask = tf.zeros([0], tf.float32)
        return {
            "case_id": e["case_id"],
            "patient_key": e["patient_key"],
            "num_images": n,
            "first_label": first,
            "first_mask": first_mask,
        }

    parts: dict[str, list] = {}
    for batch in ds.map(summarize, num_parallel_calls=tf.data.AUTOTUNE).batch(4096):
        for key, val in batch.items():
            parts.setdefault(key, []).append(val.numpy())
    if not parts:
        raise ValueError(f"split {split!r} of dataset {builder.name!r} is empty")
    index = {key: np.concatenate(v) for key, v in parts.items()}
    index["case_id"] = np.array([c.decode() for c in index["case_id"]], dtype=object)
    return index


def _source_digest(fn: Transform) -> str:
    """Hash of the source file defining the read transform, so edits invalidate cached indexes."""
    module = sys.modules.get(getattr(fn, "__module__", "") or "")
    path = getattr(module, "__file__", None)
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except (OSError, TypeError):
        return "unknown"


def _get_index(builder, split, fn, fields, options) -> dict:
    """Index for (builder, split, options), cached in memory and next to the prepared data."""
    blob = json.dumps(
        [_INDEX_VERSION, str(split), dict(options or {}), _source_digest(fn)],
        sort_keys=True,
        default=str,
    )
    digest = hashlib.sha256(blob.encode()).hexdigest()[:16]
    path = os.path.join(str(builder.data_dir), f"medssl_index-{digest}.npz")
    with _index_lock:
        if path in _index_cache:
            return _index_cache[path]
        index = None
        if os.path.exists(path):
            try:
                with np.load(path, allow_pickle=False) as z:
                    index = {k: z[k] for k in z.files}
                index["case_id"] = index["case_id"].astype(object)
            except (OSError, ValueError, KeyError):
                index = None
        if index is None:
            index = _build_index(builder, split, fn, fields["label_kind"], fields["num_classes"])
            try:
                tmp = f"{path}.tmp{os.getpid()}.npz"
                np.savez(tmp, **{**index, "case_id": index["case_id"].astype(str)})
                os.replace(tmp, path)
            except OSError:
                pass  # read-only data_dir: keep the in-memory copy only
        _index_cache[path] = index
        return index


def _strata(index: dict, label_kind: str) -> np.ndarray:
    if label_kind == "multiclass":
        return index["first_label"].astype(np.int64)
    if label_kind == "multilabel":
        return data_splits.multilabel_strata(index["first_label"], index["first_mask"])
    return np.zeros(len(index["case_id"]), np.int64)


def load(
    name: str,
    split: str,
    *,
    data_dir: str | None = None,
    manual_dir: str | None = None,
    options: Mapping[str, Any] | None = None,
    label_fraction: float = 1.0,
    fraction_seed: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    unlabel_rest: bool = False,
    skip_bad_rows: bool = False,
) -> tuple[tf.data.Dataset, DataSpec]:
    """Per-case dataset, deterministic order, not shuffled, not repeated.

    Element: {'case_id': tf.string[], 'patient_id': tf.string[], 'patient_key': int32[] (see
    `patient_key`), 'images': tf.string[M] encoded image bytes, 'image_ids': tf.string[M],
    'label': int32[M] (multiclass/none; -1 = unlabeled) or float32[M, K] (multilabel),
    'label_mask': float32[M, K] (multilabel only), 'num_images': int32[]}.
    `label_fraction` < 1 keeps a class-stratified, nested subset of cases (`data_splits`); with
    `unlabel_rest` every case is kept and only the others' labels are hidden (label -1, or
    label_mask 0 for multilabel): semi-supervised pretraining sees all images, few labels.
    Process sharding is by patient: cases with patient_key % process_count == process_index.
    Prepares the dataset first if needed (demo: generated; real sets: from `manual_dir`).
    """
    f = data_splits.check_label_fraction(label_fraction)
    if not (isinstance(process_count, int) and process_count >= 1):
        raise ValueError(f"process_count must be an int >= 1, got {process_count!r}")
    if not (isinstance(process_index, int) and 0 <= process_index < process_count):
        raise ValueError(f"process_index must be in [0, {process_count}), got {process_index!r}")
    if options is not None and not isinstance(options, Mapping):
        raise ValueError(f"options must be a mapping, got {type(options).__name__}")
    module = import_builder_module(name)
    builder = make_builder(name, data_dir, skip_bad_rows=skip_bad_rows)
    # Prepare first: builders such as derm_csv learn their class names from the data.
    prepare(builder, manual_dir, data_dir)
    fn, fields = _resolve_transform(module, options, builder.info)
    _check_split(builder, split)

    index = _get_index(builder, split, fn, fields, options)
    nonempty = index["num_images"] > 0
    keep = nonempty.copy()
    labelled_ids = None
    if f < 1.0:
        ne = np.flatnonzero(nonempty)
        chosen = data_splits.select_label_fraction(
            list(index["case_id"][ne]), _strata(index, fields["label_kind"])[ne], f, fraction_seed
        )
        if unlabel_rest:
            ids = np.asarray(index["case_id"][ne])[chosen]
            labelled_ids = [c.decode() if isinstance(c, bytes) else str(c) for c in ids]
        else:
            keep[:] = False
            keep[ne[chosen]] = True
    spec = DataSpec(
        name=name,
        split=str(split),
        label_kind=fields["label_kind"],
        num_classes=fields["num_classes"],
        class_names=fields["class_names"],
        num_cases=int(keep.sum()),
        num_images=int(index["num_images"][keep].sum()),
    )
    mine = keep & (index["patient_key"] % process_count == process_index)
    mask = tf.constant(mine)

    ds = builder.as_dataset(
        split=split,
        shuffle_files=False,
        decoders={"images": tfds.decode.SkipDecoding()},
        read_config=_read_config(),
    )

    def selected(i: tf.Tensor, ex: dict[str, tf.Tensor]) -> tf.Tensor:
        return tf.gather(mask, i)

    def drop_index(i: tf.Tensor, ex: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        return ex

    ds = ds.enumerate().filter(selected).map(drop_index)
    std = _standardize(fn, fields["label_kind"], fields["num_classes"], with_images=True)
    ds = ds.map(std, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if labelled_ids is not None:
        ds = ds.map(_hide_labels(labelled_ids, fields["label_kind"]), deterministic=True)
    return ds, spec


def _hide_labels(labelled_ids: list[str], label_kind: str):
    """Map fn: cases not in `labelled_ids` become unlabelled (label -1 / label_mask 0)."""
    ids = [s.encode() if isinstance(s, str) else bytes(s) for s in labelled_ids]
    table = tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(
            tf.constant(ids or [b""], tf.string), tf.ones([max(len(ids), 1)], tf.int32)
        ),
        default_value=0,
    )
    has_ids = bool(ids)

    def hide(ex: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        ex = dict(ex)
        known = tf.logical_and(has_ids, table.lookup(ex["case_id"]) > 0)
        if label_kind == "multilabel":
            ex["label_mask"] = ex["label_mask"] * tf.cast(known, ex["label_mask"].dtype)
        else:
            ex["label"] = tf.where(known, ex["label"], -tf.ones_like(ex["label"]))
        return ex

    return hide


def to_images(ds: tf.data.Dataset) -> tf.data.Dataset:
    """Per-case -> one element per image: {'image': tf.string[] encoded, 'image_id', 'case_id',
    'patient_id', 'patient_key', 'label': int32[] or float32[K], ('label_mask': float32[K])}."""

    def explode(case: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        m = case["num_images"]
        out = {"image": case["images"], "image_id": case["image_ids"], "label": case["label"]}
        if "label_mask" in case:
            out["label_mask"] = case["label_mask"]
        for key in ("case_id", "patient_id", "patient_key"):
            out[key] = tf.fill([m], case[key])
        return out

    return ds.map(explode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).unbatch()


def decode_image(encoded: tf.Tensor) -> tf.Tensor:
    """Encoded PNG/JPEG bytes -> uint8 [H, W, 3] (grayscale is repeated to 3 channels)."""
    image = tf.io.decode_image(encoded, channels=3, dtype=tf.uint8, expand_animations=False)
    image.set_shape([None, None, 3])
    return image
