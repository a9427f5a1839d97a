"""The sharded SimCLR/MICLe train step: device-count invariance, AOT lowering, resume, learning."""

import json

import jax
import numpy as np
import pytest

from medssl_jax import pretrain, sharding
from medssl_jax.train import TrainState
from tests.utils import synthetic_pretrain_batch, tiny_pretrain_config

NUM_CLASSES = 5


def _run_steps(devices, config, batches):
    mesh = sharding.make_mesh(devices)
    built = pretrain.build(
        config,
        mesh,
        num_classes=NUM_CLASSES,
        label_kind="multiclass",
        total_steps=10,
        warmup_steps=2,
    )
    state = built.init(jax.random.key(0))
    metrics = []
    for b in batches:
        state, m = built.step(state, sharding.to_global(b, mesh))
        metrics.append(jax.device_get(m))
    return jax.device_get(state), metrics


@pytest.fixture(scope="module")
def one_vs_eight():
    config = tiny_pretrain_config()
    batches = [synthetic_pretrain_batch(s, 16, 32, NUM_CLASSES) for s in range(2)]
    return _run_steps(jax.devices()[:1], config, batches), _run_steps(
        jax.devices(), config, batches
    )


def test_eight_devices_match_one_device(one_vs_eight):
    (s1, m1), (s8, m8) = one_vs_eight
    assert len(jax.devices()) == 8
    for a, b in zip(m1, m8, strict=True):
        for k in ("loss", "contrastive_loss", "probe_loss", "contrastive_acc", "grad_norm"):
            np.testing.assert_allclose(a[k], b[k], rtol=2e-4, atol=1e-5, err_msg=k)
    # Parameters after two updates (i.e. the gradients) and the global BatchNorm statistics.
    jax.tree.map(
        lambda x, y: np.testing.assert_allclose(x, y, rtol=2e-3, atol=2e-5), s1.params, s8.params
    )
    jax.tree.map(
        lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-3, atol=1e-5),
        s1.batch_stats,
        s8.batch_stats,
    )


def test_batchnorm_statistics_are_global(one_vs_eight):
    """Running means moved by the full-batch statistics, not by one device's shard."""
    (_, _), (s8, _) = one_vs_eight
    stem_mean = jax.tree.leaves(s8.batch_stats["backbone"])[0]
    assert np.abs(stem_mean).max() > 0


def test_train_step_lowers_from_abstract_shapes():
    """AOT: compile for the 8-device mesh from ShapeDtypeStructs only (no arrays allocated)."""
    config = tiny_pretrain_config(batch_size=32)
    mesh = sharding.make_mesh()
    built = pretrain.build(
        config, mesh, num_classes=3, label_kind="multiclass", total_steps=5, warmup_steps=1
    )
    assert isinstance(built.abstract_state, TrainState)
    lowered = built.step.lower(built.abstract_state, built.abstract_batch)
    compiled = lowered.compile()
    text = lowered.as_text()
    assert "sharding" in text
    out_state, out_metrics = compiled.output_shardings
    assert out_metrics["loss"].is_fully_replicated


def test_impossible_configs_fail_fast_naming_the_field(tmp_path):
    from medssl_jax import config_lib

    cases = {
        "batch_size": dict(batch_size=12),  # not divisible by 8 devices
        "model.variant": {"model.variant": "r51_1x_sk0"},
        "num_steps": dict(num_steps=-3, num_epochs=0.0),
        "data.name": {"data.name": "imagenet"},
        "init_checkpoint": dict(init_checkpoint=str(tmp_path / "missing")),
        "loss.temperature": {"loss.temperature": 0.0},
    }
    for field, overrides in cases.items():
        config = tiny_pretrain_config(**overrides)
        with pytest.raises(ValueError, match=field.replace(".", r"\.")):
            config_lib.validate(config)
            sharding.check_batch_size(config.batch_size, sharding.make_mesh())


def _params_at(workdir, step):
    from medssl_jax import checkpoint

    params, stats, got = checkpoint.load_variables(str(workdir))
    assert got == step
    return params, stats


@pytest.mark.slow
def test_resume_reproduces_uninterrupted_run(tmp_path, tfds_data_dir):
    from medssl_jax import train

    config = tiny_pretrain_config(num_steps=6, checkpoint_every_steps=2)
    config.data.data_dir = tfds_data_dir
    full = train.train_and_evaluate(config, str(tmp_path / "full"))
    part = tiny_pretrain_config(num_steps=6, checkpoint_every_steps=2, stop_after_steps=3)
    part.data.data_dir = tfds_data_dir
    first = train.train_and_evaluate(part, str(tmp_path / "resumed"))
    assert first["stop_reason"] == "stop_after_steps" and first["step"] == 3
    part.stop_after_steps = 0
    second = train.train_and_evaluate(part, str(tmp_path / "resumed"))
    assert second["resumed_from_step"] == 3 and second["step"] == 6
    p_full, s_full = _params_at(tmp_path / "full", 6)
    p_res, s_res = _params_at(tmp_path / "resumed", 6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), p_full, p_res)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), s_full, s_res)
    np.testing.assert_allclose(
        full["final_metrics"]["loss"], second["final_metrics"]["loss"], rtol=1e-5
    )
    results = json.loads((tmp_path / "resumed" / "results.json").read_text())
    assert results["resumed_from_step"] == 3
