"""Random-access case store: O(cases) metadata in host memory, pixels read by record index.

Datasets are prepared as ArrayRecord (one record = one case). At preparation `write_meta` stores
each split's non-image features (ids, labels, image counts) with their record indices next to
the data (`<data_dir>/medssl_meta/<split>`), so start-up never scans the pixels. `build_index`
applies a builder's read transform to that metadata; `CaseStore` keeps the result as flat NumPy
arrays and reads encoded images by (case, image) through a TFDS data source, only for the records
a process's schedule asks for.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from medssl_jax import paths

META_DIR = "medssl_meta"

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


def patient_key(patient_id: tf.Tensor | str) -> tf.Tensor:
    """Stable non-negative int32 hash of a patient id (FarmHash fingerprint mod 2**31 - 1)."""
    return tf.cast(tf.strings.to_hash_bucket_fast(patient_id, 2**31 - 1), tf.int32)


# ----------------------------------------------------------------------------- metadata


def meta_path(builder: tfds.core.DatasetBuilder, split: str) -> str:
    """Where `write_meta` stores a split's metadata (a gs:// data_dir gives a gs:// path)."""
    return str(paths.path(str(builder.data_dir)) / META_DIR / str(split))


def has_meta(builder: tfds.core.DatasetBuilder, split: str) -> bool:
    return paths.path(meta_path(builder, split)).is_dir()


def write_meta(builder: tfds.core.DatasetBuilder, split: str) -> str:
    """Stores every non-image feature of `split` plus 'record' (its ArrayRecord index), in
    record order, as a tf.data snapshot; written to a temporary name, then renamed. Reads each
    record once (preparation time only)."""
    info = builder.info.features
    meta = tfds.features.FeaturesDict({f: info[f] for f in info.keys() if f != "images"})
    source = builder.as_data_source(
        split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES
    )

    def records():
        for start in range(0, len(source), 1024):
            keys = list(range(start, min(start + 1024, len(source))))
            for r, raw in zip(keys, source.__getitems__(keys), strict=True):
                yield np.int64(r), raw

    ds = tf.data.Dataset.from_generator(
        records,
        output_signature=(tf.TensorSpec([], tf.int64), tf.TensorSpec([], tf.string)),
    )

    def decode(r, raw):
        return {**meta.deserialize_example(raw), "record": r}

    ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    path = meta_path(builder, split)  # local or remote (gs://): tf.data and epath speak both
    tmp = paths.path(f"{path}.tmp{os.getpid()}")
    tmp.rmtree(missing_ok=True)
    ds.save(str(tmp), shard_func=lambda ex: tf.constant(0, tf.int64))
    if paths.path(path).is_dir():  # another process finished first: same content
        tmp.rmtree(missing_ok=True)
    else:
        tmp.rename(path)
    return path


def standardize(fn: Transform, label_kind: str, k: int) -> Transform:
    """Raw example (no 'images') -> index element, applying the builder transform; checks label
    shapes ([M] or [M, k]) so a wrong hook fails with a clear shape error. 'image_pos' [M'] are
    the kept images' positions inside the record (a hook may drop images with 'keep_image')."""

    def apply(ex: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        out = fn(dict(ex))
        if "label" not in out:
            raise ValueError("read_transform fn must return a 'label' entry")
        m = tf.shape(ex["image_ids"])[0]
        elem = {
            "record": ex["record"],
            "case_id": ex["case_id"],
            "patient_id": ex["patient_id"],
            "patient_key": patient_key(ex["patient_id"]),
            "image_ids": ex["image_ids"],
            "image_pos": tf.range(m, dtype=tf.int32),
        }
        if label_kind == "multilabel":
            label = tf.ensure_shape(tf.cast(out["label"], tf.float32), [None, k])
            elem["label"] = label
            mask = out.get("label_mask", tf.ones_like(label))
            elem["label_mask"] = tf.ensure_shape(tf.cast(mask, tf.float32), [None, k])
        else:
            elem["label"] = tf.ensure_shape(tf.cast(out["label"], tf.int32), [None])
        if "keep_image" in out:
            keep = tf.cast(out["keep_image"], tf.bool)
            for key in ("image_ids", "image_pos", "label", "label_mask"):
                if key in elem:
                    elem[key] = tf.boolean_mask(elem[key], keep)
        elem["num_images"] = tf.shape(elem["image_ids"], out_type=tf.int32)[0]
        return elem

    return apply


def build_index(path: str, fn: Transform, label_kind: str, k: int) -> dict[str, np.ndarray]:
    """The read transform over a split's stored metadata -> flat arrays (see `CaseStore`):
    per case 'record', 'case_id', 'patient_id', 'patient_key' and 'offsets' [C + 1] (images of
    case c are rows offsets[c]:offsets[c + 1]); per image 'image_ids', 'image_pos', 'label'
    (+ 'label_mask')."""
    ds = tf.data.Dataset.load(path).map(standardize(fn, label_kind, k))
    per_case = ("record", "case_id", "patient_id", "patient_key")
    per_image = ["image_ids", "image_pos", "label"] + (
        ["label_mask"] if label_kind == "multilabel" else []
    )
    parts: dict[str, list[np.ndarray]] = {key: [] for key in (*per_case, "num_images", *per_image)}
    for batch in ds.ragged_batch(4096):
        for key in (*per_case, "num_images"):
            parts[key].append(batch[key].numpy())
        for key in per_image:
            parts[key].append(batch[key].flat_values.numpy())
    if not parts["record"]:
        return {}
    index = {key: np.concatenate(v) for key, v in parts.items()}
    for key in ("case_id", "patient_id", "image_ids"):  # object -> fixed-width bytes: compact
        index[key] = index[key].astype(np.bytes_)
    order = np.argsort(index["record"], kind="stable")  # record order, whatever the snapshot's
    counts = index.pop("num_images").astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)])
    if not np.array_equal(order, np.arange(len(order))):
        img_order = np.concatenate([np.arange(starts[c], starts[c + 1]) for c in order])
        for key in per_case:
            index[key] = index[key][order]
        for key in per_image:
            index[key] = index[key][img_order.astype(np.int64)]
        counts = counts[order]
    index["offsets"] = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)  # [C + 1]
    index["label"] = (
        index["label"].astype(np.float32)
        if label_kind == "multilabel"
        else index["label"].astype(np.int32)
    )
    if label_kind == "multilabel":
        index["label"] = index["label"].reshape(-1, k)
        index["label_mask"] = index["label_mask"].astype(np.float32).reshape(-1, k)
    return index


def save_index(index: dict[str, np.ndarray], path: str) -> None:
    """Writes an index as a folder of .npy files (one per array), atomically: a temporary
    folder renamed into place. A concurrent writer that finished first wins (same content).
    `path` is local (`load_index` memory-maps it): `datasets.index_path` puts the index of a
    remote data_dir in a local cache."""
    tmp = f"{path}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for key, value in index.items():
        np.save(os.path.join(tmp, f"{key}.npy"), value, allow_pickle=False)
    try:
        os.rename(tmp, path)
    except OSError:  # already there
        shutil.rmtree(tmp, ignore_errors=True)


def load_index(path: str) -> dict[str, np.ndarray] | None:
    """An index saved by `save_index`, memory-mapped read-only: start-up reads nothing, pages
    come in as they are touched, and the processes of one host share one copy (page cache).
    None when it is missing or inconsistent (then it is rebuilt)."""
    if not os.path.isdir(path):
        return None
    try:
        index = {
            name[: -len(".npy")]: np.load(os.path.join(path, name), mmap_mode="r")
            for name in os.listdir(path)
            if name.endswith(".npy")
        }
        cases, images = index["case_id"], index["image_ids"]
        consistent = (
            len(index["offsets"]) == len(cases) + 1
            and int(index["offsets"][-1]) == len(images)
            and all(len(index[k]) == len(cases) for k in ("record", "patient_id", "patient_key"))
            and all(len(index[k]) == len(images) for k in ("image_pos", "label"))
        )
    except (OSError, ValueError, KeyError, IndexError):
        return None
    return index if consistent else None


# ----------------------------------------------------------------------------- store


class StaleIndexError(RuntimeError):
    """A record did not hold the case the stored index says it holds."""


@dataclasses.dataclass
class CaseStore:
    """One process's shard of a split: flat per-case / per-image metadata, pixels on demand.

    Images of case c are rows offsets[c]:offsets[c + 1] of the per-image arrays.
    """

    spec: DataSpec
    open_source: Callable[[], Sequence[Any]]  # -> the split's records (tf.train.Example)
    case_ids: np.ndarray  # bytes [C]
    patient_ids: np.ndarray  # bytes [C]
    patient_keys: np.ndarray  # int32 [C]
    records: np.ndarray  # int64 [C] record index in the split
    offsets: np.ndarray  # int64 [C + 1]
    image_ids: np.ndarray  # bytes [N]
    image_pos: np.ndarray  # int32 [N] position of the image inside its record
    labels: np.ndarray  # int32 [N] or float32 [N, K]
    label_masks: np.ndarray | None = None  # float32 [N, K] (multilabel)
    _source: Any = dataclasses.field(default=None, repr=False)

    @property
    def num_cases(self) -> int:
        return len(self.case_ids)

    @property
    def num_images(self) -> int:
        return int(self.offsets[-1])

    @property
    def counts(self) -> np.ndarray:
        """int64 [C]: images per case."""
        return np.diff(self.offsets)

    def nbytes(self) -> int:
        """Host memory held by the metadata arrays."""
        arrays = [getattr(self, f.name) for f in dataclasses.fields(self)]
        return int(sum(a.nbytes for a in arrays if isinstance(a, np.ndarray)))

    def locate(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows of the per-image arrays -> (case, image within the case), int64 each. Schedules
        index rows directly, so no [N, 2] (case, image) table is ever held."""
        rows = np.asarray(rows, np.int64)
        cases = np.searchsorted(self.offsets, rows, side="right") - 1
        return cases, rows - self.offsets[cases]

    def count(self, c: int) -> int:
        """Number of images of case c."""
        return int(self.offsets[c + 1] - self.offsets[c])

    def row(self, c: int, i: int) -> int:
        """Row of image i of case c in the per-image arrays."""
        return int(self.offsets[c]) + int(i)

    def case_id(self, c: int) -> str:
        return self.case_ids[c].decode()

    def image_id(self, c: int, i: int) -> str:
        return self.image_ids[self.row(c, i)].decode()

    def read(self, pairs: Sequence[tuple[int, int]]) -> list[bytes]:
        """Encoded bytes of image i of case c for each (c, i); one batched read of the records."""
        if self._source is None:
            self._source = self.open_source()
        cases = np.asarray([c for c, _ in pairs], np.int64)
        records = np.unique(self.records[cases]) if len(cases) else np.zeros(0, np.int64)
        read = self._source.__getitems__(records.tolist())
        protos = dict(zip(records.tolist(), read, strict=True))
        out = []
        for c, i in pairs:
            feats = protos[int(self.records[c])].features.feature
            if feats["case_id"].bytes_list.value[0] != self.case_ids[c]:
                raise StaleIndexError(
                    f"record {int(self.records[c])} of {self.spec.name!r} split "
                    f"{self.spec.split!r} holds case {feats['case_id'].bytes_list.value[0]!r}, "
                    f"the stored index says {self.case_ids[c]!r}: the data was rewritten after "
                    f"its index; delete the '{META_DIR}' folder and the medssl_index-* folders "
                    "next to it to rebuild them"
                )
            out.append(feats["images"].bytes_list.value[int(self.image_pos[self.row(c, i)])])
        return out

    def label_of(self, c: int, i: int) -> dict[str, np.ndarray]:
        """{'label'} (and 'label_mask' for multilabel) of image i of case c."""
        r = self.row(c, i)
        if self.spec.label_kind == "multilabel":
            return {"label": self.labels[r], "label_mask": self.label_masks[r]}
        return {"label": np.int32(self.labels[r])}

    def case(self, c: int, images: bytes | list[bytes] | None = None) -> dict[str, Any]:
        """Case c as a dict: case_id, patient_id (str), patient_key, image_ids (list of str),
        label [M] or [M, K] (+ label_mask), num_images, and 'images' (encoded bytes, read)."""
        lo, hi = int(self.offsets[c]), int(self.offsets[c + 1])
        out = {
            "case_id": self.case_id(c),
            "patient_id": self.patient_ids[c].decode(),
            "patient_key": int(self.patient_keys[c]),
            "image_ids": [s.decode() for s in self.image_ids[lo:hi]],
            "label": self.labels[lo:hi],
            "num_images": hi - lo,
        }
        if self.label_masks is not None:
            out["label_mask"] = self.label_masks[lo:hi]
        if images is None:
            images = self.read([(c, i) for i in range(hi - lo)])
        out["images"] = images
        return out

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Every case in order, images included (reads in chunks of 256 cases)."""
        for start in range(0, self.num_cases, 256):
            cs = range(start, min(start + 256, self.num_cases))
            counts = {c: self.count(c) for c in cs}
            pairs = [(c, i) for c in cs for i in range(counts[c])]
            images = iter(self.read(pairs))
            for c in cs:
                yield self.case(c, [next(images) for _ in range(counts[c])])


def select(
    index: dict[str, np.ndarray],
    keep: np.ndarray,
    spec: DataSpec,
    open_source: Callable[[], Sequence[Any]],
) -> CaseStore:
    """The cases where `keep` (bool [C]) of a split index, as a CaseStore."""
    all_offsets = index["offsets"]
    if keep.all():  # (one process, everything kept: no copies, no temporaries)
        cases = images = slice(None)
        offsets = all_offsets
    else:
        counts = np.diff(all_offsets)
        cases, images = keep, np.repeat(keep, counts)
        offsets = np.concatenate([[0], np.cumsum(counts[keep])]).astype(np.int64)
    return CaseStore(
        spec=spec,
        open_source=open_source,
        case_ids=index["case_id"][cases],
        patient_ids=index["patient_id"][cases],
        patient_keys=index["patient_key"][cases].astype(np.int32, copy=False),
        records=index["record"][cases].astype(np.int64, copy=False),
        offsets=offsets,
        image_ids=index["image_ids"][images],
        image_pos=index["image_pos"][images].astype(np.int32, copy=False),
        labels=index["label"][images],
        label_masks=index["label_mask"][images] if "label_mask" in index else None,
    )
