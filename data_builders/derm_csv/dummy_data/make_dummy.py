"""Writes a tiny fake CSV-described dermatology set next to this script (deterministic).

labels.csv (image_path, case_id, patient_id, label, split), images/<patient>/<case>_<n>.{jpg,png}
(24x24 RGB, mixed formats), and derm_csv.json naming the patient column. 15 patients, 22 cases,
1-3 images per case, 4 conditions. Run: python data_builders/derm_csv/dummy_data/make_dummy.py
"""

import csv
import json
import pathlib

import numpy as np
from PIL import Image

ROOT = pathlib.Path(__file__).parent
CONDITIONS = ["Acne", "Eczema", "Psoriasis", "Other"]


def main() -> None:
    rng = np.random.default_rng(0)
    rows = []
    case = 0
    for p in range(15):
        patient = f"P{p:03d}"
        split = ["train", "train", "train", "validation", "test"][p % 5]
        for _ in range(1 + (p % 2)):  # odd patients have two cases
            case += 1
            label = CONDITIONS[case % len(CONDITIONS)]
            for n in range(1 + case % 3):
                ext = "png" if (case + n) % 2 else "jpg"
                rel = f"images/{patient}/C{case:03d}_{n}.{ext}"
                (ROOT / rel).parent.mkdir(parents=True, exist_ok=True)
                small = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
                Image.fromarray(small).resize((24, 24), Image.BILINEAR).save(ROOT / rel)
                rows.append([rel, f"C{case:03d}", patient, label, split])
    with open(ROOT / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_path", "case_id", "patient_id", "label", "split"])
        w.writerows(rows)
    (ROOT / "derm_csv.json").write_text(
        json.dumps({"patient_column": "patient_id"}, indent=1) + "\n"
    )


if __name__ == "__main__":
    main()
