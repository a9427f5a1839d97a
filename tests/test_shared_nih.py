"""Real data: 1,000 NIH ChestX-ray14 images from ../shared (skipped cleanly when absent).

The set ships with patients in several splits; described by a CSV (case = patient, label =
normal/abnormal, no split column), the derm_csv builder re-splits it at patient level, and
MICLe draws pairs of two distinct real follow-up images of one patient.
"""

import csv
import sys
from pathlib import Path

import pytest

from medssl_jax import input_pipeline
from medssl_jax.schedule import Schedule
from tests.utils import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import nih_pipeline  # noqa: E402

NIH = Path(__file__).resolve().parents[2] / "shared" / "data" / "nih_cxr_1000"
pytestmark = pytest.mark.skipif(not NIH.is_dir(), reason=f"{NIH} not present")


@pytest.fixture(scope="module")
def nih_manual_dir(tmp_path_factory) -> str:
    """labels.csv as benchmarks/nih_pipeline.py writes it (case = patient)."""
    d = tmp_path_factory.mktemp("nih_manual")
    assert nih_pipeline.write_labels_csv(str(NIH), str(d)) == 1000
    with open(d / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    png = Path(rows[0]["image_path"])
    assert rows[0] == {
        "image_path": str(png),
        "case_id": png.stem.split("_")[0],
        "label": png.parent.name,
    }
    return str(d)


@pytest.fixture(scope="module")
def stores(nih_manual_dir, tmp_path_factory):
    data = {
        "name": "derm_csv",
        "data_dir": str(tmp_path_factory.mktemp("nih_tfds")),
        "manual_dir": nih_manual_dir,
    }
    return {s: input_pipeline.load_store(data, s) for s in ("train", "validation", "test")}


def test_real_xrays_are_read_as_patient_level_splits(stores):
    total = sum(s.num_images for s in stores.values())
    assert total == len(list(NIH.glob("*/*/*.png"))) == 1000
    patients = {s: set(st.patient_ids) for s, st in stores.items()}
    assert not patients["train"] & patients["validation"]
    assert not patients["train"] & patients["test"]
    assert not patients["validation"] & patients["test"]
    assert stores["train"].spec.class_names == ("0_normal", "1_abnormal")
    assert stores["train"].counts.max() >= 2  # follow-up studies: real bags


def test_micle_pairs_on_real_follow_ups(stores):
    store = stores["train"]
    sched = Schedule(store.num_cases, 16, 0, patient_keys=store.patient_keys)
    gen = input_pipeline.pretrain_elements(
        store, sched, batch_size=16, seed=0, start_step=0, multi_instance=True
    )
    for _ in range(5):
        batch = [next(gen) for _ in range(16)]
        assert len({int(e["patient_key"]) for e in batch}) == 16
        for e in batch:
            imgs = store.case(int(e["case_index"]))["images"]
            if len(imgs) >= 2:
                assert e["distinct"] == 1.0 and e["a"] != e["b"] and e["b"] in imgs
