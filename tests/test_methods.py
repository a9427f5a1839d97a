"""Method plumbing: collapse guard, hidden labels for semi-supervised pretraining, teachers."""

import jax
import numpy as np
import pytest

from medssl_jax import checkpoint, datasets, methods
from medssl_jax.methods import base


def test_collapse_guard_names_each_signature():
    k = 256
    ln_k = np.log(k)
    healthy = {"assign_entropy": 0.9 * ln_k, "sample_entropy": 0.5 * ln_k, "embed_spread": 0.8}
    assert base.collapse_warning(dict(healthy, epoch=3.0), num_outputs=k) is None
    one_wins = dict(healthy, assign_entropy=0.05 * ln_k, epoch=3.0)
    assert "one output wins" in base.collapse_warning(one_wins, num_outputs=k)
    uniform = dict(healthy, sample_entropy=0.995 * ln_k)
    assert base.collapse_warning(dict(uniform, epoch=0.5), num_outputs=k) is None  # fresh net
    assert "uniform outputs" in base.collapse_warning(dict(uniform, epoch=1.5), num_outputs=k)
    point = dict(healthy, embed_spread=0.01)
    assert "collapse to a point" in base.collapse_warning(point, num_outputs=k)


def test_entropy_metrics_match_numpy():
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(7), size=5)
    m = p.mean(0)
    np.testing.assert_allclose(base.mean_assignment_entropy(p), -(m * np.log(m)).sum(), rtol=1e-5)
    want = -(p * np.log(p)).sum(1).mean()
    np.testing.assert_allclose(base.mean_sample_entropy(p), want, rtol=1e-5)
    z = rng.normal(size=(64, 16))
    zn = z / np.linalg.norm(z, axis=1, keepdims=True)
    np.testing.assert_allclose(
        base.embedding_spread(z), zn.std(0).mean() * 4.0, rtol=1e-5
    )  # sqrt(16) = 4
    assert float(base.embedding_spread(np.ones((8, 16)))) == 0.0


def test_registry_rejects_duplicates_and_unknown_names():
    with pytest.raises(ValueError, match="already registered"):
        methods.register(methods.get("swav"))
    with pytest.raises(ValueError, match="unknown pretraining method 'byol'"):
        methods.get("byol")


def test_semi_supervised_pretraining_sees_every_case_and_only_the_fraction_of_labels(
    tfds_data_dir,
):
    """unlabel_rest keeps all cases and hides labels outside exactly the cases that fine-tuning
    at the same fraction keeps (nested, case level)."""

    def cases(**kw):
        ds, spec = datasets.load("demo", "train", data_dir=tfds_data_dir, **kw)
        return {
            c: ds.labels[ds.offsets[k] : ds.offsets[k + 1]]
            for k, c in enumerate(ds.case_ids.astype(str))
        }, spec

    everything, _ = cases()
    kept, _ = cases(label_fraction=0.25)
    hidden, spec = cases(label_fraction=0.25, unlabel_rest=True)
    assert set(hidden) == set(everything) and spec.num_cases == len(everything)
    labelled = {c for c, lab in hidden.items() if (lab >= 0).all()}
    assert labelled == set(kept)
    assert all((hidden[c] == -1).all() for c in set(hidden) - labelled)
    for c in labelled:
        np.testing.assert_array_equal(hidden[c], everything[c])


def test_warm_start_from_a_run_with_an_ema_teacher_takes_the_teacher(tmp_path):
    student = {"backbone": {"w": np.zeros(3, np.float32)}}
    teacher = {"backbone": {"w": np.ones(3, np.float32)}}
    state = {
        "step": np.asarray(5, np.int32),
        "params": student,
        "batch_stats": {"backbone": {"m": np.zeros(2, np.float32)}},
        "extra": {
            "teacher": {"params": teacher, "batch_stats": {"backbone": {"m": np.ones(2)}}},
            "center": np.zeros(4, np.float32),
        },
    }
    ck = checkpoint.Checkpointer(str(tmp_path), every_steps=1, keep=1, async_save=False)
    ck.save(5, state, {"method": "dino"})
    ck.close()
    params, stats, step = checkpoint.load_variables(str(tmp_path))
    assert step == 5
    np.testing.assert_array_equal(params["backbone"]["w"], [1, 1, 1])
    np.testing.assert_array_equal(stats["backbone"]["m"], [1, 1])


def test_warm_start_of_dino_restarts_its_teacher_from_the_loaded_network(tmp_path):
    """A DINO run initialised from a checkpoint starts its teacher from the loaded weights,
    not from its own random initialisation."""
    from medssl_jax import pretrain, sharding
    from tests.utils import tiny_pretrain_config

    config = tiny_pretrain_config("dino")
    mesh = sharding.make_mesh()
    built = pretrain.build(
        config, mesh, num_classes=0, label_kind="none", total_steps=4, warmup_steps=1
    )
    source = jax.device_get(built.init(jax.random.key(1)))
    ck = checkpoint.Checkpointer(str(tmp_path), every_steps=1, keep=1, async_save=False)
    ck.save(1, {"params": source.params, "batch_stats": source.batch_stats}, {})
    ck.close()
    state = built.init(jax.random.key(0))
    fresh_teacher = jax.device_get(state.extra["teacher"]["params"]["backbone"])
    state = pretrain.warm_start(state, built, str(tmp_path), ("backbone",), mesh)
    got = jax.device_get(state.extra["teacher"]["params"]["backbone"])
    want = source.params["backbone"]
    jax.tree.map(np.testing.assert_array_equal, got, want)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params["backbone"]), want)
    differs = jax.tree.map(lambda a, b: not np.array_equal(a, b), fresh_teacher, want)
    assert any(jax.tree.leaves(differs))  # the check above is not vacuous
