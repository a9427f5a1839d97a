"""Writes a tiny fake HAM10000 next to this script (deterministic), laid out like the release.

HAM10000_metadata.csv (lesion_id,image_id,dx,dx_type,age,sex,localization) and 24x24 RGB JPEGs
split over HAM10000_images_part_1/ and HAM10000_images_part_2/. 24 lesions covering the 7
classes, 1-3 images per lesion, some blank ages.
Run: python data_builders/ham10000/dummy_data/make_dummy.py
"""

import csv
import pathlib
import random

import numpy as np
from PIL import Image

ROOT = pathlib.Path(__file__).parent
CLASSES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
DX_TYPES = ["histo", "follow_up", "consensus", "confocal"]
SITES = ["back", "face", "lower extremity", "trunk", "unknown", "scalp"]


def image(rng: np.random.Generator) -> Image.Image:
    """Smooth random colours (compress well): 4x4 noise upsampled to 24x24."""
    small = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((24, 24), Image.BILINEAR)


def main() -> None:
    rng = random.Random(0)
    nrng = np.random.default_rng(0)
    rows = []
    image_num = 24306
    for lesion in range(24):
        dx = CLASSES[lesion % len(CLASSES)]
        age = "" if lesion % 9 == 4 else f"{rng.randint(5, 85) // 5 * 5}.0"
        sex = rng.choice(["male", "female", "unknown"] if lesion % 8 == 0 else ["male", "female"])
        site = rng.choice(SITES)
        for _ in range(1 + lesion % 3):
            image_id = f"ISIC_{image_num:07d}"
            part = 1 if image_num % 2 == 0 else 2
            folder = ROOT / f"HAM10000_images_part_{part}"
            folder.mkdir(exist_ok=True)
            image(nrng).save(folder / f"{image_id}.jpg", quality=75)
            rows.append([f"HAM_{lesion:07d}", image_id, dx, rng.choice(DX_TYPES), age, sex, site])
            image_num += 7
    rng.shuffle(rows)  # the real file is not grouped by lesion either
    with open(ROOT / "HAM10000_metadata.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization"])
        w.writerows(rows)


if __name__ == "__main__":
    main()
