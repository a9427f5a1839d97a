"""Writes a tiny fake PAD-UFES-20 next to this script (deterministic), laid out like the release.

metadata.csv with the real 26 columns and 24x24 PNGs under images/imgs_part_{1,2,3}/ named
PAT_<patient>_<lesion>_<n>.png. 16 patients, some with several lesions, lesions with 1-3 images,
all 6 classes, blank optional fields. Run: python data_builders/pad_ufes20/dummy_data/make_dummy.py
"""

import csv
import pathlib
import random

import numpy as np
from PIL import Image

ROOT = pathlib.Path(__file__).parent
HEADER = [
    "patient_id", "lesion_id", "smoke", "drink", "background_father", "background_mother", "age",
    "pesticide", "gender", "skin_cancer_history", "cancer_history", "has_piped_water",
    "has_sewage_system", "fitspatrick", "region", "diameter_1", "diameter_2", "diagnostic", "itch",
    "grew", "hurt", "changed", "bleed", "elevation", "img_id", "biopsed",
]  # fmt: skip
CLASSES = ["ACK", "BCC", "MEL", "NEV", "SCC", "SEK"]
REGIONS = ["FACE", "NECK", "BACK", "ARM", "CHEST", "NOSE"]


def image(rng: np.random.Generator) -> Image.Image:
    """Smooth random colours (compress well): 4x4 noise upsampled to 24x24."""
    small = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((24, 24), Image.BILINEAR)


def main() -> None:
    rng = random.Random(0)
    nrng = np.random.default_rng(0)
    rows = []
    lesion_id, img_num = 100, 500
    for p in range(16):
        patient = f"PAT_{1000 + 37 * p}"
        age = str(rng.randint(20, 90))
        gender = "" if p % 5 == 3 else rng.choice(["MALE", "FEMALE"])
        fitz = "" if p % 4 == 1 else f"{rng.randint(1, 6)}.0"
        for _ in range(1 + (p % 3 == 0)):  # every third patient has two lesions
            lesion_id += 1
            dx = CLASSES[lesion_id % len(CLASSES)]
            for _ in range(1 + lesion_id % 3):
                img_num += 1
                img_id = f"{patient}_{lesion_id}_{img_num}.png"
                folder = ROOT / "images" / f"imgs_part_{1 + img_num % 3}"
                folder.mkdir(parents=True, exist_ok=True)
                image(nrng).save(folder / img_id)
                row = {h: "" for h in HEADER}
                biopsed = dx in ("BCC", "MEL", "SCC") or rng.random() < 0.5
                row.update(
                    patient_id=patient, lesion_id=str(lesion_id), age=age, gender=gender,
                    fitspatrick=fitz, region=rng.choice(REGIONS), diagnostic=dx,
                    itch=rng.choice(["True", "False", "UNK"]), img_id=img_id,
                    biopsed=str(biopsed),
                )  # fmt: skip
                rows.append([row[h] for h in HEADER])
    with open(ROOT / "metadata.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(HEADER)
        w.writerows(rows)


if __name__ == "__main__":
    main()
