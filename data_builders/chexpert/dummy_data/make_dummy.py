"""Writes the tiny fake CheXpert-v1.0-small tree next to this script (deterministic).

Same layout and CSV columns as the real release; 24x20 grayscale JPEGs. Covers multi-image
studies, patients with several studies, uncertain (-1.0) and blank findings, 'Unknown' sex and
lateral views with blank AP/PA. Run: python data_builders/chexpert/dummy_data/make_dummy.py
"""

import csv
import pathlib
import random

import numpy as np
from PIL import Image

ROOT = pathlib.Path(__file__).parent / "CheXpert-v1.0-small"
FINDINGS = [
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion",
    "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
    "Pleural Other", "Fracture", "Support Devices",
]  # fmt: skip
HEADER = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *FINDINGS]
# split -> patient number -> list of studies, each a list of views ('frontal'/'lateral')
LAYOUT = {
    "train": {
        1: [["frontal", "lateral"], ["frontal"]],
        2: [["frontal"]],
        3: [["frontal", "frontal", "lateral"]],
        4: [["frontal"], ["frontal", "lateral"], ["lateral"]],
        5: [["frontal", "lateral"]],
        6: [["frontal"]],
    },
    "valid": {64541: [["frontal", "lateral"]], 64542: [["frontal"]]},
}


def main() -> None:
    rng = random.Random(0)
    nrng = np.random.default_rng(0)
    for split, patients in LAYOUT.items():
        rows = []
        for pnum, studies in patients.items():
            sex = rng.choice(["Male", "Female"]) if pnum != 2 else "Unknown"
            age = rng.randint(20, 90)
            for s, views in enumerate(studies, start=1):
                values = rng.choices(["1.0", "0.0", "-1.0", ""], k=len(FINDINGS))
                if split == "valid":  # the real valid.csv has only 0.0 / 1.0
                    values = [rng.choice(["1.0", "0.0"]) for _ in FINDINGS]
                for v, view in enumerate(views, start=1):
                    rel = f"{split}/patient{pnum:05d}/study{s}/view{v}_{view}.jpg"
                    path = ROOT / rel
                    path.parent.mkdir(parents=True, exist_ok=True)
                    small = nrng.integers(0, 256, size=(4, 4), dtype=np.uint8)
                    Image.fromarray(small).resize((20, 24), Image.BILINEAR).save(path, quality=75)
                    ap_pa = rng.choice(["AP", "PA"]) if view == "frontal" else ""
                    rows.append(
                        [f"CheXpert-v1.0-small/{rel}", sex, str(age), view.capitalize(), ap_pa]
                        + values
                    )
        with open(ROOT / f"{split}.csv", "w", newline="") as f:
            csv.writer(f).writerows([HEADER, *rows])


if __name__ == "__main__":
    main()
