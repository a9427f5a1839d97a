"""Fine-tuning and linear evaluation: frozen backbone, warm start, results and predictions."""

import json

import jax
import numpy as np
import pytest

from medssl_jax import checkpoint, config_lib, finetune, results, sharding, train
from tests.utils import ROOT  # (also puts configs/ on sys.path)


def _config(method="linear_eval", **kw):
    import common

    c = common.supervised_config(method)
    common.finetune_demo(c)
    c.num_steps = 4
    c.eval_every_steps = 2
    c.log_every_steps = 2
    c.checkpoint_every_steps = 2
    c.batch_size = 32
    c.data.image_size = 32
    c.async_checkpointing = False
    c.eval_splits = ("validation", "test_shifted")
    for k, v in kw.items():
        c[k] = v
    return c


def _train_steps(method: str, label_kind: str, num_classes: int, steps: int = 3):
    """(state before, state after, metrics) of `steps` updates on random 32 px batches."""
    mesh = sharding.make_mesh()
    built, _ = finetune.build(
        _config(method),
        mesh,
        num_classes=num_classes,
        label_kind=label_kind,
        total_steps=5,
        warmup_steps=0,
    )
    state = built.init(jax.random.key(0))
    before = jax.device_get(state)
    rng = np.random.default_rng(0)
    metrics = []
    for _ in range(steps):
        batch = {"image": rng.uniform(size=(32, 32, 32, 3)).astype(np.float32)}
        if label_kind == "multilabel":
            batch["label"] = (rng.uniform(size=(32, num_classes)) < 0.3).astype(np.float32)
            batch["label_mask"] = (rng.uniform(size=(32, num_classes)) < 0.8).astype(np.float32)
        else:
            batch["label"] = rng.integers(0, num_classes, 32).astype(np.int32)
        state, m = built.step(state, sharding.to_global(batch, mesh))
        metrics.append(jax.device_get(m))
    return before, jax.device_get(state), metrics


def test_linear_eval_freezes_backbone_bit_identically():
    before, after, _ = _train_steps("linear_eval", "multiclass", 4)
    for part in ("backbone", "projection_head"):
        jax.tree.map(np.testing.assert_array_equal, before.params[part], after.params[part])
    jax.tree.map(np.testing.assert_array_equal, before.batch_stats, after.batch_stats)
    head_changed = jax.tree.map(
        lambda a, b: not np.array_equal(a, b),
        before.params["supervised_head"],
        after.params["supervised_head"],
    )
    assert all(jax.tree.leaves(head_changed))


def test_full_finetune_updates_backbone_and_batch_stats():
    # Three steps: at step 1 the zero-initialised last gamma of every residual branch blocks
    # the gradient into that branch (by design), so only later steps move all parameters.
    before, after, metrics = _train_steps("finetune", "multilabel", 3)
    assert all(np.isfinite(m["loss"]) for m in metrics)
    changed = jax.tree.map(
        lambda a, b: not np.array_equal(a, b), before.params["backbone"], after.params["backbone"]
    )
    assert np.mean(jax.tree.leaves(changed)) > 0.95
    assert not np.array_equal(
        jax.tree.leaves(before.batch_stats)[0], jax.tree.leaves(after.batch_stats)[0]
    )


@pytest.fixture(scope="module")
def pretrained_dir(tmp_path_factory, tfds_data_dir):
    """A 4-step SimCLR run on the demo data (a real checkpoint to warm-start from)."""
    from tests.utils import tiny_pretrain_config

    c = tiny_pretrain_config(num_steps=4, checkpoint_every_steps=4)
    c.data.data_dir = tfds_data_dir
    d = tmp_path_factory.mktemp("pretrain")
    train.train_and_evaluate(c, str(d))
    return str(d)


@pytest.mark.slow
def test_end_to_end_linear_eval_from_checkpoint(tmp_path, pretrained_dir, tfds_data_dir):
    c = _config("linear_eval", init_checkpoint=pretrained_dir, init_name="simclr")
    c.data.data_dir = tfds_data_dir
    c.data.label_fraction = 0.5
    # Stopped early (as on SIGTERM): checkpoint and results.json, but nothing evaluated (the
    # launcher's grace period is short, and a partly trained model's metrics are not results).
    c.stop_after_steps = 2
    stopped = train.train_and_evaluate(c, str(tmp_path))
    assert stopped["stop_reason"] == "stop_after_steps" and stopped["splits"] == {}
    assert not list(tmp_path.glob("predictions_*.csv")) and not results.finished(tmp_path)
    c.stop_after_steps = 0
    res = train.train_and_evaluate(c, str(tmp_path))  # resumes at step 2, then evaluates
    assert res["train"]["resumed_from_step"] == 2 and res["stop_reason"] == "completed"
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["init"] == "simclr" and saved["label_fraction"] == 0.5
    assert set(saved["splits"]) == {"validation", "test_shifted"}
    for split, m in saved["splits"].items():
        assert 0 <= m["top1"] <= 1 and 0 <= m["auc_mean"] <= 1
        assert (tmp_path / saved["predictions"][split]).exists()
    # The warm start really loaded the pretrained backbone (and linear eval kept it).
    src, _, _ = checkpoint.load_variables(pretrained_dir)
    got, _, _ = checkpoint.load_variables(str(tmp_path))
    jax.tree.map(np.testing.assert_array_equal, src["backbone"], got["backbone"])
    # Predictions CSV rows = validation images, scores are probabilities.
    from medssl_jax import predictions

    pred = predictions.read_predictions_csv(tmp_path / saved["predictions"]["validation"])
    assert len(pred.case_ids) == saved["splits"]["validation"]["num_examples"]
    np.testing.assert_allclose(pred.scores.sum(1), 1.0, atol=1e-5)
    assert res["selected_on"] == "validation"
    # The best step was chosen by balanced accuracy (the multi-class default), and the CSV
    # carries the patients the report's confidence intervals resample.
    assert saved["selection_metric"] == "balanced_accuracy"
    assert not pred.patients_from_cases
    assert pred.patient_ids == [c.split("_L")[0] for c in pred.case_ids]  # demo: P00012_L1
    assert len(set(pred.patient_ids)) < len(set(pred.case_ids))  # some patients have 2+ cases
    assert 0 <= saved["splits"]["validation"]["balanced_accuracy"] <= 1


@pytest.mark.parametrize(
    "label_kind, field, message",
    [
        ("multiclass", "accuracy", "not a multiclass metric"),
        ("multilabel", "top1", "not a multilabel metric"),
        ("multiclass", "kappa_quadratic", "needs --config.graded=True"),
    ],
)
def test_selection_metric_is_checked_against_the_label_kind(label_kind, field, message):
    c = _config("finetune")
    c.selection_metric = field
    with pytest.raises(config_lib.ConfigError, match=f"config.selection_metric: .*{message}"):
        finetune.selection_metric(c, label_kind)
    c.selection_metric = ""
    assert finetune.selection_metric(c, label_kind) == (
        "balanced_accuracy" if label_kind == "multiclass" else "auc_mean"
    )


def test_warm_start_rejects_mismatched_architecture(tmp_path, pretrained_dir):
    c = _config("finetune")
    c.model.variant = "r18_0.25x_sk0"  # wider than the checkpoint
    mesh = sharding.make_mesh()
    built, _ = finetune.build(
        c, mesh, num_classes=3, label_kind="multiclass", total_steps=2, warmup_steps=0
    )
    state = built.init(jax.random.key(0))
    with pytest.raises(checkpoint.CheckpointError, match=r"init_checkpoint .*bn1.*shape \(8,\)"):
        checkpoint.warm_start(state, pretrained_dir, ("backbone",))


@pytest.mark.parametrize(
    "field, value", [("input_norm", "imagenet"), ("torch_maxpool", True), ("cifar_stem", True)]
)
def test_warm_start_from_a_run_keeps_its_input_norm_and_stem(pretrained_dir, field, value):
    """Same weights, different computation: named before anything is compiled."""
    c = _config("linear_eval", init_checkpoint=pretrained_dir)
    config_lib.validate(c)  # as the run was trained
    c.model[field] = value
    with pytest.raises(config_lib.ConfigError, match=rf"config\.model\.{field}: {value!r}, but"):
        config_lib.validate(c)


def test_eval_every_steps_must_be_positive():
    c = _config("finetune", eval_every_steps=0)
    with pytest.raises(config_lib.ConfigError, match=r"config\.eval_every_steps: must be > 0"):
        config_lib.validate(c)


def test_unlabeled_dataset_cannot_be_finetuned():
    c = _config("finetune")
    with pytest.raises(ValueError, match="needs labels"):
        finetune.build(
            c, sharding.make_mesh(), num_classes=0, label_kind="none", total_steps=2, warmup_steps=0
        )


def test_checkpoint_saved_on_8_devices_warm_starts_on_1_device(pretrained_dir):
    """A pod's pretraining checkpoint must load on any topology (here: a 1-device process)."""
    import os
    import subprocess
    import sys

    code = (
        "import jax; from medssl_jax import checkpoint; "
        f"p, b, s = checkpoint.load_variables({pretrained_dir!r}); "
        "print(jax.device_count(), s, sorted(p))"
    )
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=str(ROOT)
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1].startswith("1 4 ['backbone'")


@pytest.mark.parametrize("multilabel", [True, False])
def test_prediction_csv_scores_rank_as_the_logits_do(tmp_path, multilabel):
    """Confident logits keep their order in the CSV (float64 probabilities), so the CSV's AUC,
    which the confidence intervals and ROC plots use, equals results.json's (from logits)."""
    from medssl_jax import confidence, metrics, predictions
    from medssl_jax.case_store import CaseStore, DataSpec

    rng = np.random.default_rng(0)
    n, k = 40, 2
    y = rng.integers(0, 2, n)
    y[:2] = [0, 1]
    margin = np.where(y == 1, rng.uniform(18, 30, n), rng.uniform(-5, 5, n))
    margin[0] = 24.0  # a confident error among the confident hits
    logits = np.stack([np.zeros(n), margin], 1).astype(np.float32)  # [N, 2]
    labels = np.eye(k, dtype=np.float32)[y] if multilabel else y.astype(np.int32)
    spec = DataSpec("t", "test", "multilabel" if multilabel else "multiclass", k, ("a", "b"), n, n)
    ids = np.array([f"c{i}".encode() for i in range(n)])
    store = CaseStore(
        spec,
        lambda: [],
        ids,
        ids,
        np.zeros(n, np.int32),
        np.arange(n),
        np.arange(n + 1),
        ids,
        np.zeros(n, np.int32),
        labels,
        np.ones((n, k), np.float32) if multilabel else None,
    )
    finetune.write_predictions(
        tmp_path / "p.csv", dict(local_index=np.arange(n), local_logits=logits), store
    )
    pred = predictions.read_predictions_csv(tmp_path / "p.csv")
    np.testing.assert_array_equal(pred.scores, metrics.probabilities(logits, multilabel))
    assert (pred.scores[:, 1] < 1).all()  # float32 rounds every sigmoid above ~16.6 to 1.0
    want = metrics.roc_auc(margin.astype(np.float32), y == 1)  # AUC on the logits
    assert confidence.metric_from_predictions(pred, "auc/b") == pytest.approx(want, abs=1e-12)
