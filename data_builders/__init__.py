"""TFDS builders for medssl_jax, one package per dataset (one TFDS example = one case).

`medssl_jax.datasets.load(name, ...)` imports `data_builders.<name>` lazily, which registers the
builder class; the reader hook each package may expose is documented in medssl_jax/datasets.py.
"""

KNOWN = (
    "demo",
    "chexpert",
    "ham10000",
    "pad_ufes20",
    "derm_csv",
    "image_folder_unlabeled",
    "dicom_folder",
    "nih_chestxray14",
    "patch_camelyon",
    "diabetic_retinopathy",
)
