"""Shared machinery of the builders that take their images from a TFDS CATALOGUE dataset
(patch_camelyon, diabetic_retinopathy): open the prepared catalogue dataset, read its per-image
metadata, then stream its encoded images into our cases (one TFDS example = one case).

The catalogue dataset must already be prepared (`tfds build <name>`, or `download_and_prepare`)
in the same TFDS data_dir as ours, or in the config's `source_data_dir`. It is opened by its
catalogue class (`tfds.builder_cls(<catalogue name>)`), never by our name, and read with
`as_dataset` (`as_data_source` if prepared as ArrayRecord); nothing is downloaded. A missing
catalogue dataset is a `CatalogueNotPreparedError` (a `BadInputError`) saying how to prepare it,
raised before any work.

Two passes over the catalogue split(s):
1. `read_records` (in `_split_generators`): id / name and label of every image; the image bytes
   are not parsed (`tfds.decode.PartialDecoding`; a catalogue dataset prepared as ArrayRecord,
   which `as_dataset` cannot read, is read as undecoded records with `as_data_source`). The
   builder groups these into cases and checks them (bad-row policy of common.py) BEFORE any
   example is written.
2. `stream_cases` (in `_generate_examples`): the encoded image bytes, copied VERBATIM into our
   examples (no re-encoding: pixels are those of the catalogue). Images of a case that arrive
   before the rest of their case wait in memory up to `MEMORY_BUDGET` bytes, beyond that in a
   temporary folder (`tempfile`, i.e. $TMPDIR) removed when the split is written.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from data_builders import common

# Bytes of images that wait for the rest of their case in memory; the excess goes to disk.
MEMORY_BUDGET = 256 * 1024 * 1024
_READ_BATCH = 4096


class CatalogueNotPreparedError(common.BadInputError):
    """The TFDS catalogue dataset a builder reads is not prepared in the expected data_dir."""


@dataclasses.dataclass(frozen=True)
class SourceRecord:
    """One image of a catalogue split: its 0-based position in the split's read order, its id
    (the catalogue's `id` / `name` feature) and its label."""

    split: str
    index: int
    key: str
    label: int


def catalogue_class(catalogue: str) -> type[tfds.core.DatasetBuilder]:
    """The catalogue's own builder class (our builders never register over catalogue names)."""
    return tfds.builder_cls(catalogue)


def catalogue_configs(catalogue: str) -> tuple[str, ...]:
    """Names of the catalogue builder's configs (empty for a builder without configs)."""
    return tuple(c.name for c in (catalogue_class(catalogue).BUILDER_CONFIGS or []))


def open_catalogue(
    dataset: str,
    catalogue: str,
    config: str | None,
    data_dir: str | os.PathLike,
    instructions: str,
) -> tfds.core.DatasetBuilder:
    """The prepared catalogue builder `catalogue[/config]` in `data_dir`.

    Raises ValueError for a config the catalogue does not have, and `CatalogueNotPreparedError`
    (naming the expected folder and repeating `instructions`) when it is not prepared there.
    """
    cls = catalogue_class(catalogue)
    configs = catalogue_configs(catalogue)
    if config is not None and config not in configs:
        raise ValueError(
            f"{dataset}: the TFDS catalogue dataset {catalogue!r} has no config {config!r}; "
            f"valid: {configs}"
        )
    kwargs = {"config": config} if config is not None else {}
    builder = cls(data_dir=os.fspath(data_dir), **kwargs)
    if not builder.is_prepared():
        full = f"{catalogue}/{config}" if config else catalogue
        raise CatalogueNotPreparedError(
            f"{dataset}: reads its images from the TFDS catalogue dataset {full!r} "
            f"(version {builder.version}), which is not prepared in the data_dir "
            f"{os.fspath(data_dir)!r} (no dataset_info.json in {builder.data_dir}). Prepare it "
            f"there first; nothing was written.\n{instructions}"
        )
    return builder


def describe(source: tfds.core.DatasetBuilder) -> str:
    """'name/config version' of a catalogue dataset, for messages."""
    config = source.builder_config.name if source.builder_config else None
    full = f"{source.name}/{config}" if config else source.name
    return f"{full} {source.version}"


def where(source: tfds.core.DatasetBuilder, split: str) -> str:
    """How problems name a catalogue split ('file' of a `common.Problem`; its row is the
    1-based position of the example in the split's read order)."""
    return f"{describe(source)} split '{split}'"


def check_class_count(dataset: str, source: tfds.core.DatasetBuilder, num_classes: int) -> None:
    """The catalogue's `label` must have the classes our ClassLabel maps (same order)."""
    feature = source.info.features["label"]
    if getattr(feature, "num_classes", None) != num_classes:
        raise common.BadInputError(
            f"{dataset}: the catalogue dataset {describe(source)} has label feature "
            f"{feature!r}; expected a ClassLabel with {num_classes} classes"
        )


def _read_config() -> tfds.ReadConfig:
    return tfds.ReadConfig(try_autocache=False)


def _random_access(source: tfds.core.DatasetBuilder) -> bool:
    """Whether the catalogue dataset was prepared as ArrayRecord (or another random-access
    format), which `as_dataset` cannot read in this TFDS: it is read with `as_data_source`."""
    return source.info.file_format in tfds.core.FileFormat.with_random_access()


def iter_examples(
    source: tfds.core.DatasetBuilder, split: str, key: str, *, images: bool
) -> Iterator[tuple[str, int, bytes | None]]:
    """(id, label, encoded image bytes or None) of every example of catalogue `split`, in read
    order. Without `images` the image bytes are not parsed; with them they come undecoded."""
    if _random_access(source):
        data = source.as_data_source(
            split, deserialize_method=tfds.decode.DeserializeMethod.DESERIALIZE_NO_DECODE
        )
        for start in range(0, len(data), _READ_BATCH):
            for proto in data.__getitems__(list(range(start, min(len(data), start + _READ_BATCH)))):
                f = proto.features.feature
                yield (
                    f[key].bytes_list.value[0].decode("utf-8"),
                    int(f["label"].int64_list.value[0]),
                    bytes(f["image"].bytes_list.value[0]) if images else None,
                )
        return
    wanted = {key: True, "label": True}
    skip = None
    if images:
        wanted["image"] = True
        skip = {"image": tfds.decode.SkipDecoding()}
    ds = source.as_dataset(
        split,
        shuffle_files=False,
        decoders=tfds.decode.PartialDecoding(wanted, decoders=skip),
        read_config=_read_config(),
    )
    for batch in tfds.as_numpy(ds.batch(_READ_BATCH)):
        image_batch = batch["image"] if images else [None] * len(batch[key])
        for k, label, image in zip(batch[key], batch["label"], image_batch, strict=True):
            yield _text(k), int(label), None if image is None else bytes(image)


def read_records(source: tfds.core.DatasetBuilder, split: str, key: str) -> list[SourceRecord]:
    """Id (feature `key`) and label of every example of catalogue `split`, in read order; the
    images are not parsed."""
    return [
        SourceRecord(split, i, k, label)
        for i, (k, label, _) in enumerate(iter_examples(source, split, key, images=False))
    ]


class _Pending:
    """Encoded images waiting for the rest of their case: in memory up to `budget` bytes, then
    in a temporary folder (created on first need, removed by `close`)."""

    def __init__(self, budget: int):
        self.budget = budget
        self.used = 0
        self.memory: dict[str, bytes] = {}
        self.files: dict[str, str] = {}
        self.folder: str | None = None
        self.written = 0

    def put(self, key: str, data: bytes) -> None:
        if self.used + len(data) <= self.budget:
            self.memory[key] = data
            self.used += len(data)
            return
        if self.folder is None:
            self.folder = tempfile.mkdtemp(prefix="medssl_catalog_")
        path = os.path.join(self.folder, f"{self.written}.bin")
        self.written += 1
        with open(path, "wb") as f:
            f.write(data)
        self.files[key] = path

    def pop(self, key: str) -> bytes:
        if key in self.memory:
            data = self.memory.pop(key)
            self.used -= len(data)
            return data
        path = self.files.pop(key)
        with open(path, "rb") as f:
            data = f.read()
        os.remove(path)
        return data

    def close(self) -> None:
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None


def stream_cases(
    dataset: str,
    source: tfds.core.DatasetBuilder,
    cases: Sequence[common.Case],
    origin: Mapping[str, str],
    key: str,
) -> Iterator[tuple[common.Case, list[bytes]]]:
    """Yields (case, encoded image bytes in the case's image order) for every case, reading the
    catalogue splits its images come from (`origin`: image id -> catalogue split) once each.

    Images are matched by their catalogue id (feature `key`); ids not in `cases` (skipped rows,
    other splits) are passed over. BadInputError if an image of `cases` is not found (the
    catalogue dataset changed since `read_records`).
    """
    case_of: dict[str, common.Case] = {}
    for c in cases:
        for r in c.images:
            case_of[r.image_id] = c
    splits = sorted({origin[i] for i in case_of}, key=list(source.info.splits.keys()).index)
    missing = {c.case_id: len(c.images) for c in cases}
    pending = _Pending(MEMORY_BUDGET)
    try:
        for split in splits:
            for image_id, _, data in iter_examples(source, split, key, images=True):
                case = case_of.get(image_id)
                if case is None or origin[image_id] != split:
                    continue
                if len(case.images) == 1:
                    missing.pop(case.case_id)
                    yield case, [data]
                    continue
                pending.put(image_id, data)
                missing[case.case_id] -= 1
                if missing[case.case_id] == 0:
                    missing.pop(case.case_id)
                    yield case, [pending.pop(r.image_id) for r in case.images]
    finally:
        pending.close()
    if missing:
        lost = sorted(missing)[:10]
        raise common.BadInputError(
            f"{dataset}: {len(missing)} case(s) lack images that were listed when the catalogue "
            f"dataset {describe(source)} (splits {splits}) was first read (e.g. {lost}); was it "
            "re-prepared meanwhile? Rerun."
        )


def _text(value) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray):
        return _text(value.item())
    return str(value)


def source_metadata(source: tfds.core.DatasetBuilder) -> dict[str, str]:
    """What the dataset metadata records about the catalogue dataset it was built from."""
    config = source.builder_config.name if source.builder_config else ""
    return {
        "name": source.name,
        "config": config,
        "version": str(source.version),
        "data_dir": os.fspath(source.data_dir),
    }


def case_examples(
    builder: Any, cases: Sequence[common.Case], key: str, per_image: Sequence[str] = ("label",)
) -> Iterator[tuple[str, dict]]:
    """A catalogue-backed builder's `_generate_examples`: (case id, example) with the case's
    images streamed from the catalogue and the `per_image` fields of its records."""
    for case, images in stream_cases(builder.name, builder._source, cases, builder._origin, key):
        example = {
            "case_id": case.case_id,
            "patient_id": case.patient_id,
            "images": images,
            "image_ids": [r.image_id for r in case.images],
        }
        example |= {f: [r.fields[f] for r in case.images] for f in per_image}
        yield case.case_id, example
