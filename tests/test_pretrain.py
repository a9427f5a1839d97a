"""The generic pretraining step for every method: 1 device == 8 devices, AOT lowering, resume."""

import json

import jax
import numpy as np
import pytest

from medssl_jax import methods, pretrain, sharding
from medssl_jax.state import TrainState
from tests.utils import step_through, synthetic_pretrain_batch, tiny_pretrain_config

NUM_CLASSES = 5
METHODS = ("simclr", "swav", "dino", "hybrid")


def method_config(method: str):
    """Tiny config whose epoch-valued schedules all act within 2 steps (steps_per_epoch=1)."""
    c = tiny_pretrain_config(method)
    if method in ("swav", "hybrid"):
        c.swav.freeze_prototypes_epochs = 1.0  # frozen at step 0, updated at step 1
    if method == "dino":
        c.dino.freeze_last_layer_epochs = 1.0
        c.dino.warmup_teacher_temp_epochs = 2.0
        # The other methods run LARS; DINO's runs AdamW (its ViT recipe) so that the device,
        # FSDP and resume checks also cover Adam's moment state.
        c.optim.name, c.optim.base_learning_rate, c.optim.lr_scaling = "adamw", 1e-3, "none"
    return c


def run_steps(devices, config, batches, num_classes=NUM_CLASSES):
    """(initial state, final state, metrics per step) on a mesh of `devices`, host copies."""
    mesh = sharding.make_mesh(devices)
    built = pretrain.build(
        config,
        mesh,
        num_classes=num_classes,
        label_kind="multiclass",
        total_steps=10,
        warmup_steps=1,
        steps_per_epoch=1,
    )
    init, state, metrics = step_through(built, mesh, batches)
    return init, jax.device_get(state), metrics


def batches_for(config, n=2, batch=16):
    return [
        synthetic_pretrain_batch(s, batch, 32, NUM_CLASSES, config.crops.num_local, 16)
        for s in range(n)
    ]


def assert_updates_match(init, a, b, *, rel=2e-3, what="params", min_moved=0.5):
    """Leaf by leaf, the change a - init equals b - init to `rel` of its size (not merely
    a close to b: a tolerance above one update would pass 'no update at all'), and at least
    `min_moved` of the leaves changed."""
    leaves = jax.tree_util.tree_leaves_with_path(init)
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves) == len(la) == len(lb)
    moved = 0
    for (path, x0), xa, xb in zip(leaves, la, lb, strict=True):
        x0, xa, xb = (np.asarray(v, np.float64) for v in (x0, xa, xb))
        da, db = xa - x0, xb - x0
        scale = np.linalg.norm(da)
        moved += scale > 0
        err = np.linalg.norm(da - db)
        assert err <= rel * scale + 1e-9 * (1 + np.linalg.norm(x0)), (
            f"{what}{jax.tree_util.keystr(path)}: |d1 - d8| = {err:.3g} vs |d1| = {scale:.3g}"
        )
    assert moved >= min_moved * len(leaves), f"{what}: only {moved}/{len(leaves)} leaves moved"


@pytest.fixture(scope="module", params=METHODS)
def one_vs_eight(request):
    config = method_config(request.param)
    batches = batches_for(config)
    one = run_steps(jax.devices()[:1], config, batches)
    eight = run_steps(jax.devices(), config, batches)
    return request.param, one, eight


@pytest.mark.slow
def test_eight_devices_match_one_device(one_vs_eight):
    """Loss, parameters after 2 steps, BatchNorm statistics (global, not per device) and the
    method state (teacher, centre, queue) are the same on 1 and 8 devices."""
    method, (i1, s1, m1), (i8, s8, m8) = one_vs_eight
    assert len(jax.devices()) == 8
    np.testing.assert_array_equal(jax.tree.leaves(i1.params)[0], jax.tree.leaves(i8.params)[0])
    for a, b in zip(m1, m8, strict=True):
        assert set(a) == set(b)
        for k in a:
            np.testing.assert_allclose(a[k], b[k], rtol=2e-4, atol=1e-6, err_msg=f"{method}/{k}")
    assert_updates_match(i1.params, s1.params, s8.params, what=f"{method} params")
    assert_updates_match(i1.batch_stats, s1.batch_stats, s8.batch_stats, what="batch_stats")
    if method == "dino":
        t0, t1, t8 = (s.extra["teacher"] for s in (i1, s1, s8))
        assert_updates_match(t0, t1, t8, what="dino teacher")
        assert_updates_match(i1.extra["center"], s1.extra["center"], s8.extra["center"])
    assert int(s1.step) == int(s8.step) == 2


def test_batchnorm_statistics_are_global():
    """One step of BatchNorm on 8 devices moves the running mean by the FULL batch's mean."""
    config = method_config("simclr")
    config.model.num_proj_layers = 1
    batch = batches_for(config, n=1)[0]
    mesh = sharding.make_mesh()
    built = pretrain.build(
        config, mesh, num_classes=0, label_kind="none", total_steps=4, warmup_steps=1
    )
    state = built.init(jax.random.key(0))
    head0 = jax.device_get(state.params["projection_head"]["layer_0"]["dense"]["kernel"])
    # The head's BN sees the backbone's train-mode features of all 32 views.
    out_train, _ = built.model.apply(
        {"params": state.params, "batch_stats": state.batch_stats},
        batch["views"].reshape(-1, 32, 32, 3),
        train=True,
        mutable=["batch_stats"],
    )
    feats = np.asarray(out_train["features"], np.float64)
    b = {k: v for k, v in batch.items() if k in built.abstract_batch}
    state, _ = built.step(state, sharding.to_global(b, mesh))
    running = jax.device_get(state.batch_stats["projection_head"]["layer_0"]["bn"]["mean"])
    expected = 0.1 * (feats @ np.asarray(head0, np.float64)).mean(axis=0)  # momentum 0.9
    np.testing.assert_allclose(running, expected, rtol=1e-3, atol=1e-6)
    # Per-device statistics (2 examples each) would give a different mean on some device.
    per_device = 0.1 * (feats[:4] @ head0).mean(axis=0)
    assert np.abs(per_device - expected).max() > 10 * np.abs(running - expected).max()


def _head_leaves(tree, frozen) -> dict:
    """{key path: leaf} of `tree`'s leaves that `frozen` names (params or optimiser state)."""
    return {
        jax.tree_util.keystr(p): np.asarray(x)
        for p, x in jax.tree_util.tree_leaves_with_path(tree)
        if frozen.matches(p)
    }


@pytest.mark.parametrize(
    "method,optimizer", [("swav", "lars"), ("dino", "adamw"), ("dino", "adam")]
)
def test_frozen_head_is_held_then_trained(method, optimizer):
    """SwAV's prototypes / DINO's last layer and its learned gain, frozen for 2 steps: neither
    their values nor their optimiser state (LARS momentum, Adam moments) move, weight decay
    included (PyTorch skips a parameter with no grad), while the rest trains; step 3 moves them."""
    config = method_config(method)
    config.optim.name, config.optim.weight_decay = optimizer, 0.04
    config.optim.weight_decay_end = None
    if method == "dino":
        config.dino.freeze_last_layer_epochs, config.dino.norm_last_layer = 2.0, False
    else:
        config.swav.freeze_prototypes_epochs = 2.0
    mesh = sharding.make_mesh(jax.devices()[:1])
    built = pretrain.build(
        config, mesh, num_classes=NUM_CLASSES, label_kind="multiclass", total_steps=10,
        warmup_steps=1, steps_per_epoch=1,
    )  # fmt: skip
    frozen = built.method.frozen
    assert frozen.steps == 2 and len(frozen.paths) == (2 if method == "dino" else 1)
    state = built.init(jax.random.key(0))
    states = [jax.device_get(state)]
    for b in batches_for(config, n=3):
        b = {k: v for k, v in b.items() if k in built.abstract_batch}
        state, _ = built.step(state, sharding.to_global(b, mesh))
        states.append(jax.device_get(state))
    heads = [_head_leaves(s.params, frozen) for s in states]
    moments = [_head_leaves(s.opt_state, frozen) for s in states]
    assert len(heads[0]) == len(frozen.paths) and moments[0]
    assert any(np.abs(x).max() > 0 for x in heads[0].values())
    for step in (1, 2):
        for k, x in heads[0].items():
            np.testing.assert_allclose(heads[step][k], x, rtol=1e-6, atol=1e-7, err_msg=k)
        for k, x in moments[0].items():
            np.testing.assert_array_equal(moments[step][k], x, err_msg=k)
    for k, x in heads[0].items():
        assert np.abs(heads[3][k] - x).max() > 1e-4, k
    assert any(np.abs(moments[3][k] - x).max() > 0 for k, x in moments[0].items())
    # The learning rate warms up from 0 at step 0: the rest trains from the second step.
    rest = [jax.tree.leaves(s.params["backbone"]) for s in (states[1], states[2])]
    assert sum(np.abs(a - b).max() > 0 for a, b in zip(*rest, strict=True)) > len(rest[0]) // 2


@pytest.mark.parametrize("method", ["dino"])
def test_train_step_lowers_from_abstract_shapes(method):
    """AOT: compile for the 8-device mesh from ShapeDtypeStructs only (no arrays allocated)."""
    config = tiny_pretrain_config(method, batch_size=32)
    config.model.variant = "vit_tiny"
    mesh = sharding.make_mesh()
    built = pretrain.build(
        config, mesh, num_classes=3, label_kind="multiclass", total_steps=5, warmup_steps=1
    )
    assert isinstance(built.abstract_state, TrainState)
    assert "teacher" in built.abstract_state.extra
    lowered = built.step.lower(built.abstract_state, built.abstract_batch)
    compiled = lowered.compile()
    assert "sharding" in lowered.as_text()
    out_state, out_metrics = compiled.output_shardings
    assert out_metrics["loss"].is_fully_replicated
    assert built.abstract_batch["local_views"].shape == (32, 2, 16, 16, 3)


def test_methods_are_registered_and_configs_validate():
    from medssl_jax import config_lib

    assert set(METHODS) <= set(methods.names())
    for method in METHODS + ("micle",):
        config_lib.validate(tiny_pretrain_config(method))


def test_impossible_configs_fail_fast_naming_the_field(tmp_path):
    from medssl_jax import config_lib

    cases = {
        "simclr": {
            "batch_size": dict(batch_size=12),  # not divisible by 8 devices
            "model.variant": {"model.variant": "r51_1x_sk0"},
            "num_steps": dict(num_steps=-3, num_epochs=0.0),
            "data.name": {"data.name": "imagenet"},
            "init_checkpoint": dict(init_checkpoint=str(tmp_path / "missing")),
            "loss.temperature": {"loss.temperature": 0.0},
            "method": {"method": "byol"},
            "sampler.same_patient": {"sampler.same_patient": "sometimes"},
            "crops.num_local": {"crops.num_local": 2},
            "nan_policy": {"nan_policy": "retry"},
            "nan_max_skips": {"nan_max_skips": 0},
        },
        "swav": {
            "swav.queue_length": {"swav.queue_length": 20},  # not a multiple of the batch
            "swav.epsilon": {"swav.epsilon": 0.0},
            "crops.local_area": {"crops.local_area": (0.3, 0.1)},
        },
        "dino": {
            "dino.teacher_temp": {"dino.teacher_temp": -1.0},
            "dino.freeze_last_layer_epochs": {"dino.freeze_last_layer_epochs": -1.0},
            "model.num_proj_layers": {"model.num_proj_layers": 2},
        },
        "hybrid": {"hybrid.supervised_weight": {"hybrid.supervised_weight": -1.0}},
    }
    for method, by_field in cases.items():
        for field, overrides in by_field.items():
            config = tiny_pretrain_config(method, **overrides)
            with pytest.raises(ValueError, match=r"config\." + field.replace(".", r"\.")):
                config_lib.validate(config)
                sharding.check_batch_size(config.batch_size, sharding.make_mesh())


def _state_at(workdir, step):
    """The whole saved train state (params, batch_stats, opt_state, extra) at `step`."""
    import orbax.checkpoint as ocp

    mngr = ocp.CheckpointManager(
        f"{workdir}/checkpoints", item_handlers={"state": ocp.StandardCheckpointHandler()}
    )
    assert mngr.latest_step() == step
    state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore())).state
    mngr.close()
    return state


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_resume_is_bit_exact(tmp_path, tfds_data_dir, method):
    """Stop after 3 of 6 steps, rerun: the whole state (teacher, centre, queue, optimiser
    included) is bit-identical to an uninterrupted run's."""
    from medssl_jax import train

    def config(**kw):
        c = tiny_pretrain_config(method, num_steps=6, checkpoint_every_steps=2, **kw)
        c.data.data_dir = tfds_data_dir
        if method == "swav":
            c.swav.queue_length, c.swav.queue_start_epoch = 32, 0.0
        return c

    full = train.train_and_evaluate(config(), str(tmp_path / "full"))
    first = train.train_and_evaluate(config(stop_after_steps=3), str(tmp_path / "resumed"))
    assert first["stop_reason"] == "stop_after_steps" and first["step"] == 3
    second = train.train_and_evaluate(config(), str(tmp_path / "resumed"))
    assert second["resumed_from_step"] == 3 and second["step"] == 6
    a, b = _state_at(tmp_path / "full", 6), _state_at(tmp_path / "resumed", 6)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, x), y in zip(
        jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b), strict=True
    ):
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))
    if method == "swav":
        assert int(a["extra"]["queue_count"]) == 32  # the queue filled and was carried over
    if method == "dino":
        assert np.abs(a["extra"]["center"]).sum() > 0
    assert full["final_metrics"]["loss"] == second["final_metrics"]["loss"]
    results = json.loads((tmp_path / "resumed" / "results.json").read_text())
    assert results["resumed_from_step"] == 3 and results["method"] == method
    # The summary spans both pieces: the first log window was in the first one.
    assert second["first_metrics"]["step"] == full["first_metrics"]["step"] < 3
    assert second["first_metrics"]["loss"] == full["first_metrics"]["loss"]
    # Killed after the final checkpoint, before results.json: the rerun restores at step 6,
    # trains nothing, and still reports the run's metrics.
    (tmp_path / "resumed" / "results.json").unlink()
    third = train.train_and_evaluate(config(), str(tmp_path / "resumed"))
    assert third["resumed_from_step"] == 6 and third["stop_reason"] == "completed"
    assert third["final_metrics"] == second["final_metrics"]
    assert third["first_metrics"] == second["first_metrics"]
