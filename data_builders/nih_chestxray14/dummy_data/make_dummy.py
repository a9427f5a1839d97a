"""Writes the tiny fake NIH ChestX-ray14 release next to this script (deterministic).

Same layout as the real release: Data_Entry_2017.csv (2017 style: split bracket columns and a
trailing comma on every line, the header included), train_val_list.txt, test_list.txt and
16x16 8-bit grayscale PNGs in images_001/images/ and images_002/images/ (patient 00000004 spans
both). 8 patients, 15 images: follow-ups, multiple findings, 'No Finding', all 14 findings.
Patients 00000004 and 00000008 are the official test patients; with salt 'nih_chestxray14' and
a 0.9/0.1 split, train_val patients 00000002 and 00000007 hash to 'validation'.
Run: python data_builders/nih_chestxray14/dummy_data/make_dummy.py
"""

import pathlib

import numpy as np
from PIL import Image

ROOT = pathlib.Path(__file__).parent
HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
    "View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],"
)
# patient number -> (sex, [(finding labels, age, view position) per follow-up])
PATIENTS = {
    1: ("M", [("Cardiomegaly", 57, "PA"), ("Cardiomegaly|Emphysema", 58, "PA"),
              ("Cardiomegaly|Effusion", 58, "PA")]),
    2: ("M", [("No Finding", 81, "PA")]),
    3: ("F", [("Hernia", 74, "PA"), ("Hernia", 75, "AP")]),
    4: ("F", [("Mass|Nodule", 40, "AP"), ("Infiltration|Mass|Nodule", 41, "AP")]),
    5: ("M", [("No Finding", 60, "PA")]),
    6: ("F", [("Atelectasis|Pneumothorax", 25, "AP"), ("Consolidation|Pneumonia", 25, "AP"),
              ("Edema|Fibrosis|Pleural_Thickening", 26, "PA")]),
    7: ("M", [("Effusion|Infiltration", 33, "PA")]),
    8: ("F", [("No Finding", 70, "PA"), ("Atelectasis", 70, "AP")]),
}  # fmt: skip
TEST_PATIENTS = (4, 8)
FIRST_FOLDER_SIZE = 7  # the real folders hold ~10,000 images each, in image-name order


def main() -> None:
    rng = np.random.default_rng(0)
    lines, train_val, test = [HEADER], [], []
    n = 0
    for pnum, (sex, follow_ups) in PATIENTS.items():
        for fu, (labels, age, view) in enumerate(follow_ups):
            name = f"{pnum:08d}_{fu:03d}.png"
            folder = ROOT / ("images_001" if n < FIRST_FOLDER_SIZE else "images_002") / "images"
            folder.mkdir(parents=True, exist_ok=True)
            small = rng.integers(0, 256, size=(4, 4), dtype=np.uint8)
            Image.fromarray(small).resize((16, 16), Image.BILINEAR).save(folder / name)
            lines.append(f"{name},{labels},{fu},{pnum},{age},{sex},{view},16,16,0.143,0.143,")
            (test if pnum in TEST_PATIENTS else train_val).append(name)
            n += 1
    (ROOT / "Data_Entry_2017.csv").write_text("\n".join(lines) + "\n")
    (ROOT / "train_val_list.txt").write_text("\n".join(train_val) + "\n")
    (ROOT / "test_list.txt").write_text("\n".join(test) + "\n")


if __name__ == "__main__":
    main()
