"""PatchCamelyon (Veeling et al. 2018) lymph-node patches as cases, read from the TFDS catalogue.

Source: the TFDS catalogue dataset `patch_camelyon` (2.0.0; features `id` like 'train_17',
`image` 96x96x3 PNG, `label` ClassLabel(num_classes=2)), which must already be prepared in the
same data_dir (`tfds build patch_camelyon --data_dir=<data_dir>`, it downloads from Zenodo) or
in the config's `source_data_dir`. Its train / validation / test splits are kept as they are.

One TFDS example = one case = one patch: PCam has no patient (or slide) ids, so
case_id = patient_id = the patch id ('train_17'), and everything patient-level in this project
(patient-level bootstrap confidence intervals, process sharding by patient, label fractions)
works on PATCHES here. The patches of one whole-slide image are not independent, so the
confidence intervals on PCam resample patches and are narrower than patient-level ones would be.

Labels: the catalogue's ClassLabel has the names '0', '1' (no tumour tissue / metastatic tumour
tissue in the central 32x32 region); our ClassLabel keeps that order with the names
('normal', 'tumor'). The PNG bytes are copied verbatim, so pixels equal the catalogue's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import tensorflow_datasets as tfds

from data_builders import case_builder, catalog, common

CATALOGUE = "patch_camelyon"
CLASSES: tuple[str, ...] = ("normal", "tumor")  # catalogue labels 0, 1
SPLITS: tuple[str, ...] = ("train", "validation", "test")

INSTRUCTIONS = f"""\
The TFDS catalogue dataset 'patch_camelyon' (downloaded from Zenodo by TFDS, ~7.5 GB) must be
prepared in the same TFDS data_dir first, e.g.
  tfds build patch_camelyon --data_dir=<data_dir>
or in Python: tfds.builder('patch_camelyon', data_dir=<data_dir>).download_and_prepare()
(or set PatchCamelyonConfig.source_data_dir to the data_dir where it is prepared). This builder
then copies its {", ".join(SPLITS)} splits into one case per patch; no manual_dir is needed.
"""


@dataclasses.dataclass(eq=False)
class PatchCamelyonConfig(case_builder.CaseBuilderConfig):
    """`source_data_dir`: TFDS data_dir holding the prepared catalogue `patch_camelyon`
    (None: the data_dir of this builder). A config with another `source_data_dir` needs a name
    other than 'default' (TFDS rule)."""

    source_data_dir: str | None = None


class PatchCamelyon(case_builder.CaseBuilder, skip_registration=True):
    """PCam patches (normal / tumor), one case per patch, the catalogue's splits.

    Not registered with TFDS (`tfds.builder('patch_camelyon')` stays the catalogue builder this
    one reads); `medssl_jax.datasets.load('patch_camelyon', ...)` finds it in this package. Its
    data lives under <data_dir>/patch_camelyon/default/1.0.0, next to the catalogue's
    <data_dir>/patch_camelyon/2.0.0.
    """

    name = "patch_camelyon"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "One case per patch from the catalogue's patch_camelyon 2.0.0."}
    BUILDER_CONFIGS = [
        PatchCamelyonConfig(name="default", description="The catalogue's train/validation/test.")
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=(
                "PatchCamelyon 96x96 lymph-node patches (TFDS catalogue patch_camelyon), one "
                "example per patch; per-image label normal/tumor. No patient ids: patient_id = "
                "case_id = patch id, so patient-level statistics resample patches."
            ),
            features=case_builder.case_features(
                tfds.features.Image(shape=(96, 96, 3), encoding_format="png"),
                tfds.features.ClassLabel(names=list(CLASSES)),
            ),
            homepage="https://github.com/basveeling/pcam",
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # nothing is downloaded: the catalogue dataset is read
        source_dir = self.builder_config.source_data_dir or self.data_dir_root
        self._source = catalog.open_catalogue(self.name, CATALOGUE, None, source_dir, INSTRUCTIONS)
        catalog.check_class_count(self.name, self._source, len(CLASSES))
        log = self.new_problem_log()
        splits: dict[str, list[common.Case]] = {}
        self._origin: dict[str, str] = {}
        first: dict[str, common.ImageRow] = {}
        for split in SPLITS:
            file = catalog.where(self._source, split)
            splits[split] = []
            for rec in catalog.read_records(self._source, split, "id"):
                row = rec.index + 1
                if not rec.key:
                    log.add(file, row, "field 'id' is empty")
                    continue
                if rec.key in first:
                    f = first[rec.key]
                    log.add(
                        file,
                        row,
                        f"duplicate patch id {rec.key!r} (first at {f.file}, row {f.row})",
                    )
                    continue
                image = common.ImageRow(
                    file=file,
                    row=row,
                    path=self._source.data_path,
                    image_id=rec.key,
                    case_id=rec.key,
                    patient_id=rec.key,
                    fields={"label": rec.label},
                    split=split,
                )
                first[rec.key] = image
                self._origin[rec.key] = split
                splits[split].append(common.Case(rec.key, rec.key, [image], split))
        return self.finish(log, splits, source=catalog.source_metadata(self._source))

    def _generate_examples(self, cases: Sequence[common.Case]) -> Iterator[tuple[str, dict]]:
        return catalog.case_examples(self, cases, "id", ("label",))
