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
Storage: `make_builder` prepares every dataset as ArrayRecord (random access by record index);
`prepare` then stores each split's non-image features with their record indices
(`case_store.write_meta`). `load` applies the read transform to that metadata once per
(split, options, hook source) and saves the result as `<builder.data_dir>/medssl_index-<hash>/`
(.npy files, memory-mapped at start-up); start-up reads nothing else, never the pixels.
Datasets prepared as TFRecord by earlier versions raise `DatasetFormatError` saying how to
re-prepare them.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import shutil
import sys
import threading
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from medssl_jax import case_store, data_splits, paths, sharding
from medssl_jax.case_store import CaseStore, DataSpec, patient_key  # noqa: F401 (re-exported)

LABEL_KINDS = ("multiclass", "multilabel", "none")
_INDEX_VERSION = 3
_index_lock = threading.Lock()

Transform = Callable[[dict[str, tf.Tensor]], dict[str, tf.Tensor]]
FILE_FORMAT = "array_record"


class DatasetFormatError(ValueError):
    """The dataset was prepared in a format the input pipeline cannot read by index."""


def default_data_dir(data_dir: str | None = None) -> str:
    """`data_dir` if given, else $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
    if data_dir:
        return os.path.expanduser(str(data_dir))
    env = os.environ.get("TFDS_DATA_DIR")
    if env:
        return os.path.expanduser(env)
    return os.path.expanduser(os.path.join("~", "tensorflow_datasets"))


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
    builder = cls(data_dir=default_data_dir(data_dir), **kwargs)
    if not builder.is_prepared():  # new data: prepare it for random access
        return cls(data_dir=default_data_dir(data_dir), file_format=FILE_FORMAT, **kwargs)
    if builder.info.file_format.value != FILE_FORMAT:
        raise DatasetFormatError(
            f"dataset {name!r} in {builder.data_dir} was prepared as "
            f"{builder.info.file_format.value} by an earlier medssl_jax; the input pipeline now "
            f"reads {FILE_FORMAT} by record index. Re-prepare it: delete {builder.data_dir} "
            "(only the prepared copy; your source files and manual_dir are not touched) and "
            "run again, which prepares it anew"
        )
    return builder


SOURCE_FILE = "medssl_source.json"  # in a prepared dataset's folder: the manual_dir it came from


class DatasetSourceError(ValueError):
    """The prepared dataset came from another manual_dir than the one the config names."""


def _resolved(manual_dir: str) -> str:
    return paths.absolute(os.path.expanduser(str(manual_dir)))


def _check_source(builder: tfds.core.DatasetBuilder, manual_dir: str | None) -> None:
    """A prepared dataset is reused only for the manual_dir it was prepared from: otherwise a
    run with new source files would silently train on the old ones."""
    record = paths.path(str(builder.data_dir)) / SOURCE_FILE
    if manual_dir is None or not record.exists():  # (prepared before this record existed)
        return
    prepared_from = json.loads(record.read_text())["manual_dir"]
    if prepared_from != _resolved(manual_dir):
        raise DatasetSourceError(
            f"config.data.manual_dir: dataset {builder.name!r} in {builder.data_dir} was "
            f"prepared from {prepared_from}, not {_resolved(manual_dir)}. Use another "
            f"config.data.data_dir for the new files, or delete {builder.data_dir} (only the "
            "prepared copy) to prepare it anew"
        )


def prepare(
    builder: tfds.core.DatasetBuilder, manual_dir: str | None = None, data_dir: str | None = None
) -> None:
    """Generates the dataset if needed (offline; manual data must be in `manual_dir`, default
    `<data_dir>/downloads/manual`, as in TFDS), and records the manual_dir it came from; a
    prepared dataset asked for with another manual_dir is a DatasetSourceError."""
    if builder.is_prepared():  # (meta missing: prepared elsewhere, e.g. by `tfds build`)
        _check_source(builder, manual_dir)
        _write_missing_meta(builder)
        return
    instructions = getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None)
    if manual_dir is None and instructions:
        manual_dir = str(paths.path(default_data_dir(data_dir)) / "downloads" / "manual")
    if instructions and not paths.path(os.path.expanduser(str(manual_dir))).is_dir():
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
    if instructions:
        record = paths.path(str(builder.data_dir)) / SOURCE_FILE
        record.write_text(json.dumps({"manual_dir": _resolved(manual_dir)}))
    _write_missing_meta(builder)


def _write_missing_meta(builder: tfds.core.DatasetBuilder) -> None:
    if builder.info.file_format.value != FILE_FORMAT:  # (`load` rejects it with a message)
        return
    for split in builder.info.splits.keys():
        if not case_store.has_meta(builder, split):
            case_store.write_meta(builder, split)


def split_names(name: str, data_dir: str | None = None) -> tuple[str, ...]:
    """The splits of a prepared dataset (after `load` of any of its splits)."""
    return tuple(make_builder(name, data_dir).info.splits.keys())


class UnknownSplitError(ValueError):
    """The dataset has no split of that name (the message lists the ones it has)."""


def _check_split(builder: tfds.core.DatasetBuilder, split: str) -> None:
    valid = tuple(builder.info.splits.keys())
    if str(split) not in valid:  # (no slices: sub-sets come from label_fraction)
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


def _source_digest(fn: Transform) -> str:
    """Hash of the source file defining the read transform, so edits invalidate cached indexes."""
    module = sys.modules.get(getattr(fn, "__module__", "") or "")
    path = getattr(module, "__file__", None)
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except (OSError, TypeError):
        return "unknown"


def _prepared_fingerprint(builder: tfds.core.DatasetBuilder, split: str) -> list:
    """(name, size, mtime) of the split's stored metadata files: a dataset prepared again (e.g.
    with corrected labels, same size) gets a new index even where the index lives in a local
    cache keyed by the data folder's path (gs:// or read-only data_dir)."""
    folder = case_store.meta_path(builder, split)
    try:
        names = sorted(tf.io.gfile.listdir(folder))
        stats = [tf.io.gfile.stat(f"{folder.rstrip('/')}/{n}") for n in names]
    except tf.errors.OpError:
        return []
    return [[n, int(s.length), int(s.mtime_nsec)] for n, s in zip(names, stats, strict=True)]


def index_path(builder: tfds.core.DatasetBuilder, digest: str) -> str:
    """Where a split's index lives: next to the prepared data, or, when that folder is remote
    (gs://: memory-mapping needs a local file) or read-only, in a local cache
    ($MEDSSL_INDEX_CACHE, default ~/.cache/medssl_jax/index) keyed by the data folder. Always
    a local path; the metadata it is built from is read where the data is (tf.data)."""
    root = str(builder.data_dir)
    if "://" not in root and os.access(root, os.W_OK):
        return os.path.join(root, f"medssl_index-{digest}")
    cache = os.environ.get("MEDSSL_INDEX_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "medssl_jax", "index"
    )
    where = hashlib.sha256(root.encode()).hexdigest()[:12]
    return os.path.join(cache, f"{where}-medssl_index-{digest}")


def _get_index(builder, split, fn, fields, options) -> dict[str, np.ndarray]:
    """Flat index of (builder, split, options) from the stored metadata (`case_store`), saved
    next to the prepared data and memory-mapped from there (`case_store.load_index`); rebuilt
    when the hook's source changes."""
    size = builder.info.splits[split].num_examples  # (a re-prepared split: a new index)
    blob = json.dumps(
        [
            _INDEX_VERSION,
            str(split),
            size,
            dict(options or {}),
            _source_digest(fn),
            _prepared_fingerprint(builder, split),
        ],
        sort_keys=True,
        default=str,
    )
    path = index_path(builder, hashlib.sha256(blob.encode()).hexdigest()[:16])
    with _index_lock:
        index = case_store.load_index(path)
        if index is None:
            meta = case_store.meta_path(builder, split)
            index = case_store.build_index(meta, fn, fields["label_kind"], fields["num_classes"])
            if not index:
                raise ValueError(f"split {split!r} of dataset {builder.name!r} is empty")
            try:
                shutil.rmtree(path, ignore_errors=True)  # an inconsistent earlier copy
                case_store.save_index(index, path)
                index = case_store.load_index(path) or index  # mapped, like every later start
            except OSError as e:  # e.g. a full disk: works, but rebuilds at every start
                logging.warning("could not save the index of %s to %s: %s", split, path, e)
        return index


def _strata(index: dict, label_kind: str) -> np.ndarray:
    """Per-case stratum for label fractions: the first image's class (or label set)."""
    counts = np.diff(index["offsets"])
    first = index["offsets"][:-1]
    has = counts > 0
    if label_kind == "multiclass":
        out = np.full(len(counts), -1, np.int64)
        out[has] = index["label"][first[has]]
        return out
    if label_kind == "multilabel":
        k = index["label"].shape[1]
        label = np.zeros((len(counts), k), np.float32)
        mask = np.zeros((len(counts), k), np.float32)
        label[has] = index["label"][first[has]]
        mask[has] = index["label_mask"][first[has]]
        return data_splits.multilabel_strata(label, mask)
    return np.zeros(len(counts), np.int64)


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
) -> tuple[CaseStore, DataSpec]:
    """This process's cases of `split`, as a `CaseStore` (metadata in memory, pixels on demand).

    Cases keep the split's record order. Per image: 'label' int32 (multiclass/none; -1 =
    unlabeled) or float32 [K] with 'label_mask' (multilabel). `label_fraction` < 1 keeps a
    class-stratified, nested subset of cases (`data_splits`); with `unlabel_rest` every case is
    kept and only the others' labels are hidden (label -1, or label_mask 0 for multilabel):
    semi-supervised pretraining sees all images, few labels. Process sharding is by patient:
    cases with patient_key % process_count == process_index. Prepares the dataset first if
    needed (demo: generated; real sets: from `manual_dir`).
    """
    f = data_splits.check_label_fraction(label_fraction)
    if not (isinstance(process_count, int) and process_count >= 1):
        raise ValueError(f"process_count must be an int >= 1, got {process_count!r}")
    if not (isinstance(process_index, int) and 0 <= process_index < process_count):
        raise ValueError(f"process_index must be in [0, {process_count}), got {process_index!r}")
    if options is not None and not isinstance(options, Mapping):
        raise ValueError(f"options must be a mapping, got {type(options).__name__}")
    module = import_builder_module(name)
    # Prepare first: builders such as derm_csv learn their class names from the data. With
    # several processes, process 0 prepares while the others wait (a shared data_dir written
    # by all at once fails); then they find it prepared, or build their own on local disks.

    def prepared() -> tfds.core.DatasetBuilder:
        builder = make_builder(name, data_dir, skip_bad_rows=skip_bad_rows)
        prepare(builder, manual_dir, data_dir)
        return builder

    builder = sharding.first_then_others(f"prepare dataset {name!r}", prepared)
    fn, fields = _resolve_transform(module, options, builder.info)
    _check_split(builder, split)

    index = _get_index(builder, split, fn, fields, options)
    offsets = index["offsets"]
    keep = offsets[1:] != offsets[:-1]  # cases with images (a hook may drop them all)
    labelled = None
    if f < 1.0:
        ne = np.flatnonzero(keep)
        ids = [c.decode() for c in index["case_id"][ne]]
        chosen = data_splits.select_label_fraction(
            ids, _strata(index, fields["label_kind"])[ne], f, fraction_seed
        )
        if unlabel_rest:
            labelled = np.zeros(len(keep), bool)
            labelled[ne[chosen]] = True
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
        num_images=int(offsets[-1] if keep.all() else np.diff(offsets)[keep].sum()),
    )
    # Start-up memory: beyond the index itself, only bool [C] temporaries.
    mine = keep
    if process_count > 1:
        mine = keep & (index["patient_key"] % process_count == process_index)

    def open_source():
        return builder.as_data_source(
            split, deserialize_method=tfds.decode.DeserializeMethod.DESERIALIZE_NO_DECODE
        )

    store = case_store.select(index, mine, spec, open_source)
    if labelled is not None:  # hide the labels of cases outside the fraction
        hidden = np.repeat(~labelled[mine], store.counts)
        if fields["label_kind"] == "multilabel":
            store.label_masks = store.label_masks * (~hidden)[:, None]
        else:
            store.labels = np.where(hidden, -1, store.labels).astype(np.int32)
    return store, spec


def decode_image(encoded: tf.Tensor) -> tf.Tensor:
    """Encoded PNG/JPEG bytes -> uint8 [H, W, 3] (grayscale is repeated to 3 channels)."""
    image = tf.io.decode_image(encoded, channels=3, dtype=tf.uint8, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


def decode_float(encoded: tf.Tensor) -> tf.Tensor:
    """Encoded PNG/JPEG bytes -> float32 [H, W, 3] in [0, 1]; a 16-bit PNG (DICOM builders)
    keeps its 16 bits (x / 65535), everything else is x / 255."""
    png16 = tf.logical_and(
        tf.equal(tf.strings.substr(encoded, 0, 4), b"\x89PNG"),
        tf.equal(tf.strings.substr(encoded, 24, 1), b"\x10"),
    )

    def wide():
        x = tf.io.decode_png(encoded, channels=3, dtype=tf.uint16)
        return tf.image.convert_image_dtype(x, tf.float32)

    def narrow():
        return tf.image.convert_image_dtype(decode_image(encoded), tf.float32)

    image = tf.cond(png16, wide, narrow)
    image.set_shape([None, None, 3])
    return image
