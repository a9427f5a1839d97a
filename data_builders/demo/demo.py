"""`demo`: synthetic dermatology-like MICLe dataset, generated on the fly (no files needed).

One example = one lesion (case) with 1-5 images; patients have 1-3 lesions. Splits are assigned
per patient (`patient_split`), so no patient is in two splits. `test_shifted` uses its own
patients and a different acquisition process (see render.py) for distribution-shift evaluation.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from data_builders import case_builder
from data_builders.demo import render
from medssl_jax.data_splits import patient_split

SPLIT_FRACTIONS = {"train": 0.65, "validation": 0.175, "test": 0.175}
_SPLIT_SALT = "demo-v1"
_CASES_PER_PATIENT_PROBS = (0.6, 0.28, 0.12)  # 1..3 lesions


@dataclasses.dataclass(eq=False)
class DemoConfig(tfds.core.BuilderConfig):
    """Seed and size of the generated data."""

    seed: int = 0
    image_size: int = 64
    num_patients: int = 640  # shared by train / validation / test
    num_shifted_patients: int = 100  # test_shifted


class Demo(tfds.core.GeneratorBasedBuilder):
    """Synthetic lesions: class = lesion pattern; per-image viewpoint/lighting/skin nuisance."""

    VERSION = tfds.core.Version("1.2.0")
    RELEASE_NOTES = {
        "1.0.0": "First version.",
        "1.1.0": "Lesion colour varies per image; stronger class patterns.",
        "1.2.0": "Coarser class patterns, larger lesions, less per-image blur.",
    }
    BUILDER_CONFIGS = [
        DemoConfig(name="default", description="64x64 images, ~620/170/170/150 cases."),
        DemoConfig(
            name="small",
            description="32x32 images, few cases: for fast tests.",
            image_size=32,
            num_patients=60,
            num_shifted_patients=12,
        ),
    ]
    DEFAULT_CONFIG_NAME = "default"

    def _info(self) -> tfds.core.DatasetInfo:
        s = self.builder_config.image_size
        return self.dataset_info_from_configs(
            description=__doc__,
            features=case_builder.case_features(
                tfds.features.Image(shape=(s, s, 3), encoding_format="png"),
                tfds.features.ClassLabel(names=list(render.CLASS_NAMES)),
            ),
            homepage="https://github.com/google-research/simclr",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # nothing to download
        return {
            "train": self._generate_examples("train"),
            "validation": self._generate_examples("validation"),
            "test": self._generate_examples("test"),
            "test_shifted": self._generate_examples("test_shifted"),
        }

    def _generate_examples(self, split: str):
        cfg = self.builder_config
        shifted = split == "test_shifted"
        n = cfg.num_shifted_patients if shifted else cfg.num_patients
        for p in range(n):
            pid = f"{'S' if shifted else 'P'}{p:05d}"
            if not shifted and patient_split(pid, SPLIT_FRACTIONS, _SPLIT_SALT) != split:
                continue
            for case in generate_patient(cfg.seed, pid, p, shifted, cfg.image_size):
                yield case["case_id"], case


def generate_patient(seed: int, pid: str, p: int, shifted: bool, size: int) -> list[dict]:
    """All cases of one patient as TFDS examples; each draw has its own seeded stream."""
    tag = int(shifted)
    rng = np.random.default_rng([seed, tag, p])
    n_cases = 1 + int(rng.choice(len(_CASES_PER_PATIENT_PROBS), p=_CASES_PER_PATIENT_PROBS))
    cases = []
    for c in range(n_cases):
        crng = np.random.default_rng([seed, tag, p, c])
        lesion = render.sample_lesion(crng)
        m = 1 + int(crng.choice(len(render.IMAGES_PER_CASE_PROBS), p=render.IMAGES_PER_CASE_PROBS))
        case_id = f"{pid}_L{c}"
        images = [
            render.render(lesion, np.random.default_rng([seed, tag, p, c, k + 1]), size, shifted)
            for k in range(m)
        ]
        cases.append(
            {
                "case_id": case_id,
                "patient_id": pid,
                "images": images,
                "image_ids": [f"{case_id}_{k}" for k in range(m)],
                "label": [lesion.label] * m,
            }
        )
    return cases
