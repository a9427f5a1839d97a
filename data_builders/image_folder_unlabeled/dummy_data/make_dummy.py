"""Writes a tiny fake unlabeled image tree next to this script (deterministic).

<patient>/<study>/[series/]<image>.{png,jpg,jpeg} (24x24 RGB): 6 patients, 1-2 studies each,
1-3 images per study, one study with a deeper series folder, plus a non-image notes.txt that the
builder must ignore (as must this script). This folder is the manual_dir.
Run: python data_builders/image_folder_unlabeled/dummy_data/make_dummy.py
"""

import pathlib

import numpy as np
from PIL import Image

ROOT = pathlib.Path(__file__).parent
EXTS = ["png", "jpg", "jpeg"]


def main() -> None:
    rng = np.random.default_rng(0)
    n = 0
    for p in range(6):
        for s in range(1 + p % 2):
            for i in range(1 + (p + s) % 3):
                n += 1
                deep = "series1/" if (p, s) == (3, 1) else ""
                path = ROOT / f"patient{p}" / f"study{s}" / f"{deep}img{i}.{EXTS[n % 3]}"
                path.parent.mkdir(parents=True, exist_ok=True)
                small = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
                Image.fromarray(small).resize((24, 24), Image.BILINEAR).save(
                    path, format="PNG" if path.suffix == ".png" else "JPEG"
                )
    (ROOT / "patient0" / "notes.txt").write_text("not an image; ignored by the builder\n")


if __name__ == "__main__":
    main()
