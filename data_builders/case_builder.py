"""Base classes and schema of the TFDS builders: the `skip_bad_rows` option (real data), the
created-split fractions, the shared case features (one example = one MICLe bag) and the
`finish` step that records skipped rows and split counts (see common.py for the bad-row policy).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import tensorflow_datasets as tfds
from absl import logging

from data_builders.common import (
    DEFAULT_SPLIT_FRACTIONS,
    BadInputError,
    Case,
    ProblemLog,
    generate_examples,
    split_counts,
)


@dataclasses.dataclass(eq=False)
class CaseBuilderConfig(tfds.core.BuilderConfig):
    """Config fields shared by every real-data builder."""

    skip_bad_rows: bool = False


@dataclasses.dataclass(eq=False)
class SplitCaseBuilderConfig(CaseBuilderConfig):
    """`split_fractions`: (split name, fraction) pairs of a created patient-level split."""

    split_fractions: tuple[tuple[str, float], ...] = DEFAULT_SPLIT_FRACTIONS


def case_features(
    image: tfds.features.Image,
    label: tfds.features.FeatureConnector | None = None,
    **per_image: tfds.features.FeatureConnector,
) -> tfds.features.FeaturesDict:
    """The case schema every builder shares: `case_id`, `patient_id`, and per image (each a
    Sequence over the case's images) `images`, `image_ids`, `label` (when given) and `per_image`."""
    seq = tfds.features.Sequence
    fields = {
        "case_id": tfds.features.Text(),
        "patient_id": tfds.features.Text(),
        "images": seq(image),
        "image_ids": seq(tfds.features.Text()),
    }
    if label is not None:
        fields["label"] = seq(label)
    fields.update({k: seq(v) for k, v in per_image.items()})
    return tfds.features.FeaturesDict(fields)


class CaseBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base of the real-data builders: `skip_bad_rows` option and skipped-row metadata.

    `skip_bad_rows` comes from the BuilderConfig field of that name, overridden by the builder
    kwarg (`tfds.builder(name, skip_bad_rows=True)`) when given.
    """

    def __init__(self, *, skip_bad_rows: bool | None = None, **kwargs: Any):
        self._skip_bad_rows_kwarg = skip_bad_rows
        super().__init__(**kwargs)

    @property
    def skip_bad_rows(self) -> bool:
        if self._skip_bad_rows_kwarg is not None:
            return bool(self._skip_bad_rows_kwarg)
        return bool(getattr(self.builder_config, "skip_bad_rows", False))

    def new_problem_log(self) -> ProblemLog:
        return ProblemLog(self.name, self.skip_bad_rows)

    def finish(self, log: ProblemLog, splits: Mapping[str, Sequence[Case]], **extra: Any) -> dict:
        """Records skipped rows and split counts in the metadata; returns TFDS split generators.

        Empty splits are left out (TFDS cannot write a split without examples).
        """
        log.check("validating the input")
        log.record(self.info.metadata)
        counts = split_counts(splits)
        self.info.metadata["split_counts"] = counts
        for key, value in extra.items():
            self.info.metadata[key] = value
        logging.info("%s: cases/images/patients per split: %s", self.name, counts)
        empty = [name for name, cs in splits.items() if not cs]
        if splits and len(empty) == len(splits):  # e.g. every row skipped: nothing to cache
            raise BadInputError(
                f"{self.name}: no usable case in the input (every split is empty"
                f"{'; ' + str(len(log.problems)) + ' bad row(s) skipped' if log.problems else ''})"
            )
        if empty:
            logging.warning("%s: split(s) %s have no case and are left out", self.name, empty)
        return {name: self._generate_examples(cs) for name, cs in splits.items() if cs}

    def _generate_examples(self, cases: Sequence[Case]) -> Iterator[tuple[str, dict[str, Any]]]:
        """One example per case; per-image `fields` stacked into lists (Sequence features)."""
        return generate_examples(cases)
