"""python -m medssl_jax.prepare: every split a config reads, with counts and class balance."""

import numpy as np
import pytest

from medssl_jax import config_lib, datasets, prepare
from tests.test_finetune import _config


def test_prepare_summarises_every_split_the_config_reads(tfds_data_dir):
    c = _config("finetune")
    c.data.data_dir = tfds_data_dir
    c.eval_splits = ("validation,test_shifted",)  # the command line's list syntax
    rows = prepare.prepare(c)
    assert [(r["split"], r["read_by"]) for r in rows] == [
        ("train", "data.split"),
        ("validation", "val_split"),
        ("test_shifted", "eval_splits"),
    ]
    for r in rows:
        store, spec = datasets.load("demo", r["split"], data_dir=tfds_data_dir)
        counts = np.diff(store.offsets)
        assert (r["cases"], r["images"]) == (store.num_cases, int(counts.sum()))
        assert r["patients"] == len(set(store.patient_ids.tolist()))
        assert r["bags"] == int((counts > 1).sum()) > 0
        per = {c: int((store.labels == i).sum()) for i, c in enumerate(spec.class_names)}
        assert {c: v["images"] for c, v in r["classes"].items()} == per
        assert sum(v["share"] for v in r["classes"].values()) == pytest.approx(1.0)
        assert r["split"] in prepare.format_summary(r)
    c.eval_splits = ()  # the default: the dataset's own splits but the training one
    assert [r["split"] for r in prepare.prepare(c)] == [
        "train",
        "validation",
        "test",
        "test_shifted",
    ]
    c.eval_splits = ("nope",)
    with pytest.raises(config_lib.ConfigError, match="config.eval_splits: .*nope"):
        prepare.prepare(c)


def test_prepare_a_pipeline_config_reads_every_stages_splits_once(tfds_data_dir):
    import sys

    from tests.utils import ROOT

    sys.path.insert(0, str(ROOT / "configs"))
    c = __import__("pipeline").get_config("demo")
    c.data.data_dir = tfds_data_dir
    rows = prepare.prepare(c)
    keys = [(r["dataset"], r["split"]) for r in rows]
    assert len(keys) == len(set(keys))  # each split once, whichever stages read it
    assert {s for _, s in keys} >= {"train", "validation", "test", "test_shifted"}
