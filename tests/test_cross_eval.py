"""Evaluation on another dataset through a label mapping (medssl_jax.cross_eval): the mapped
metrics equal a reference computed from the in-distribution predictions, bad mappings name
their field before training, and the label remapping is exact."""

import json

import ml_collections
import numpy as np
import pytest

from medssl_jax import config_lib, cross_eval, metrics, predictions, train
from tests.test_finetune import _config


def _target(pairs):
    return cross_eval.Target("x", "d", "test", "test_x", None, tuple(pairs), ())


def test_to_training_space_multilabel_and_multiclass():
    ext = np.array([[1, 0, 1], [0, 1, 0]], np.float32)
    ext_mask = np.array([[1, 1, 0], [1, 1, 1]], np.float32)
    lab, mask = cross_eval.to_training_space(_target([(3, 0), (0, 2)]), ext, ext_mask, 4)
    np.testing.assert_array_equal(lab, [[1, 0, 0, 1], [0, 0, 0, 0]])
    np.testing.assert_array_equal(mask, [[0, 0, 0, 1], [1, 0, 0, 1]])
    lab, mask = cross_eval.to_training_space(
        _target([(2, 0), (0, 1)]), np.array([0, 1, 2, 1, -1]), None, 3
    )
    np.testing.assert_array_equal(lab, [2, 0, -1, 0, -1])  # -1: an image without a label
    np.testing.assert_array_equal(mask, [True, True, False, True, False])
    lab, mask = cross_eval.to_training_space(  # the highest external class is mapped
        _target([(0, 0), (1, 2)]), np.array([0, 2, -1, 1]), None, 4
    )
    np.testing.assert_array_equal(lab, [0, 1, -1, -1])
    np.testing.assert_array_equal(mask, [True, True, False, False])


@pytest.mark.parametrize(
    "label_map, message",
    [
        ("homogeneous", "is not training_class=external_class"),
        ("homogeneous=homogeneous,homogeneous=reticular", "a training class is mapped twice"),
        ("nope=homogeneous", "'nope' is not a class of the training data 'demo'"),
        ("homogeneous=nope", "'nope' is not a class of 'demo'"),
    ],
)
def test_bad_mapping_names_the_field_before_training(tmp_path, tfds_data_dir, label_map, message):
    c = _config("linear_eval")
    c.data.data_dir = tfds_data_dir
    c.eval_datasets.same = ml_collections.ConfigDict(
        dict(name="demo", splits=("test",), label_map=label_map)
    )
    with pytest.raises(config_lib.ConfigError, match="config.eval_datasets.same.label_map: "):
        try:
            train.train_and_evaluate(c, str(tmp_path))
        except config_lib.ConfigError as e:
            assert message in str(e)
            raise
    assert not (tmp_path / "checkpoints").exists()  # refused before training


@pytest.mark.slow
def test_mapped_metrics_equal_the_in_distribution_predictions_restricted(tmp_path, tfds_data_dir):
    """demo -> demo's own test split with 3 of the 6 classes mapped: the 'test_same' metrics are
    the 'test' predictions restricted to images of those classes (scores over all 6)."""
    mapped = ("homogeneous", "globular", "streaks")
    c = _config("linear_eval")
    c.data.data_dir = tfds_data_dir
    c.eval_splits = ()  # the default: the dataset's own splits but the training one
    c.eval_datasets.same = ml_collections.ConfigDict(
        dict(name="demo", splits="test", label_map=",".join(f"{k}={k}" for k in mapped))
    )
    train.train_and_evaluate(c, str(tmp_path))
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["eval_datasets"]["test_same"]["classes"] == {k: k for k in mapped}
    assert set(saved["splits"]) == {"validation", "test", "test_shifted", "test_same"}
    full = predictions.read_predictions_csv(tmp_path / saved["predictions"]["test"])
    keep = np.isin(full.labels, [saved["class_names"].index(k) for k in mapped])
    assert 0 < keep.sum() < keep.size
    ref = metrics.softmax_metrics(
        np.log(full.scores[keep]), full.labels[keep], class_names=saved["class_names"]
    )
    got = saved["splits"]["test_same"]
    assert got["num_examples"] == keep.sum()
    for k in ("top1", "balanced_accuracy"):
        assert got[k] == pytest.approx(ref[k], abs=1e-9), k
    # The CSV holds float32 probabilities (ties among near-equal scores): AUC to 1e-3.
    assert got["auc_mean"] == pytest.approx(ref["auc_mean"], abs=1e-3)
    assert set(k for k in got if k.startswith("auc/")) == {f"auc/{k}" for k in mapped}
    # Its prediction CSV: same images, labels of unmapped classes masked out.
    shifted = predictions.read_predictions_csv(tmp_path / saved["predictions"]["test_same"])
    assert shifted.image_ids == full.image_ids
    np.testing.assert_array_equal(shifted.label_mask, keep)


def test_list_fields_parse_the_same_everywhere():
    import sys

    from tests.utils import ROOT

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import micle_vs_simclr

    c = _config("linear_eval")
    c.eval_splits = ("validation,test", "test_shifted")
    config_lib.normalize_lists(c)
    assert c.eval_splits == ("validation", "test", "test_shifted")
    micle_vs_simclr._set(c, "eval_splits", "validation, test")
    assert c.eval_splits == ("validation", "test")
    micle_vs_simclr._set(c, "async_checkpointing", "True")
    assert c.async_checkpointing is True
    with pytest.raises(config_lib.ConfigError, match="expected True or False"):
        micle_vs_simclr._set(c, "async_checkpointing", "yes")


@pytest.mark.slow
def test_chexpert_finetune_evaluated_on_nih_through_the_mapping(tmp_path, tfds_data_dir):
    """CheXpert-layout dummy data -> fine-tune -> NIH-layout dummy test list via eval_nih:
    the mapped conditions' AUCs in results.json and the report's shift section."""
    import common

    from medssl_jax import report
    from tests.utils import ROOT

    c = _config("finetune")
    common.finetune_chexpert(c)
    common.eval_nih(c)
    c.data.data_dir = tfds_data_dir
    c.data.manual_dir = str(ROOT / "data_builders/chexpert/dummy_data")
    c.data.image_size = 32
    c.batch_size = 8
    c.eval_datasets.nih.manual_dir = str(ROOT / "data_builders/nih_chestxray14/dummy_data")
    train.train_and_evaluate(c, str(tmp_path))
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["eval_datasets"]["test_nih"]["classes"]["Pleural Effusion"] == "Effusion"
    nih = saved["splits"]["test_nih"]
    pred = predictions.read_predictions_csv(tmp_path / saved["predictions"]["test_nih"])
    assert nih["num_examples"] == len(pred.image_ids) > 0
    # Every mapped condition with both label values in the NIH test images has its AUC, equal
    # to the AUC of the CSV's scores on its labels; none other is reported.
    for c_idx, name in enumerate(saved["class_names"]):
        y = pred.labels[pred.label_mask[:, c_idx], c_idx]
        if 0 < y.sum() < y.size:
            s = pred.scores[pred.label_mask[:, c_idx], c_idx]
            assert nih[f"auc/{name}"] == pytest.approx(metrics.roc_auc(s, y), abs=1e-3)
        else:
            assert f"auc/{name}" not in nih
    assert any(k.startswith("auc/") for k in nih)
    report.build_report([tmp_path], tmp_path / "report", bootstrap=20)
    md = (tmp_path / "report" / "report.md").read_text()
    assert "test_nih auc_mean" in md
    assert (tmp_path / "report" / "shift_chexpert_finetune_auc_mean.png").exists()
