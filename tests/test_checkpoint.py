"""Checkpointing: relative run directories, SIGTERM handling, partial warm starts."""

import os
import signal

import numpy as np
import pytest

from medssl_jax import checkpoint


def test_relative_workdir_round_trip(tmp_path, monkeypatch):
    """`--workdir=runs/x` (relative, as in the README) must save and restore."""
    monkeypatch.chdir(tmp_path)
    state = {"params": {"w": np.arange(6, dtype=np.float32)}, "step": np.asarray(3, np.int32)}
    ck = checkpoint.Checkpointer("runs/x", every_steps=1, keep=2, async_save=False)
    assert ck.save(3, state, {"note": "hi"})
    ck.close()
    ck = checkpoint.Checkpointer("runs/x", every_steps=1, keep=2)
    assert ck.latest_step() == 3
    restored, meta = ck.restore(state)
    ck.close()
    np.testing.assert_array_equal(restored["params"]["w"], state["params"]["w"])
    assert meta == {"note": "hi"}
    assert (tmp_path / "runs" / "x" / "checkpoints" / "3").is_dir()
    assert checkpoint.absolute("gs://bucket/run") == "gs://bucket/run"


def test_a_finished_finetune_stands_for_its_validation_selected_weights(tmp_path):
    """load_variables (export, DVME features, warm starts) gives the best/ weights a finished
    fine-tune's results.json reports, not its last step; the latest checkpoint otherwise."""
    import json

    from medssl_jax.finetune import BestKeeper
    from medssl_jax.state import TrainState

    def state(v):
        return TrainState(
            step=np.asarray(0, np.int32),
            params={"head": {"kernel": np.full((2, 3), v, np.float32)}},
            batch_stats={"bn": {"mean": np.full((3,), v, np.float32)}},
            opt_state={},
        )

    ck = checkpoint.Checkpointer(str(tmp_path), every_steps=1, keep=2, async_save=False)
    best = BestKeeper(str(tmp_path), "validation", "top1")
    meta = {"config": {"model": {"variant": "r18_0.125x_sk0"}}}
    for step, top1 in ((2, 0.9), (6, 0.5)):
        ck.save(step, state(step), meta, force=True)
        best.offer(step, {"top1": top1}, state(step))
    ck.close()
    from medssl_jax.features import encoder_from_checkpoint

    assert checkpoint.load_variables(str(tmp_path))[2] == 6  # running: no results.json yet
    latest = encoder_from_checkpoint("ft", str(tmp_path))
    assert (latest.step, latest.weights) == (6, "latest")
    (tmp_path / "results.json").write_text(json.dumps({"kind": "finetune", "step": 2}))
    params, stats, step = checkpoint.load_variables(str(tmp_path))
    assert step == 2 == checkpoint.reported_best_step(str(tmp_path))
    # DVME's encoder record (results.json, feature-cache key) names the weights it loads.
    best = encoder_from_checkpoint("ft", str(tmp_path))
    assert (best.step, best.weights) == (2, "best") and best.describe() != latest.describe()
    np.testing.assert_array_equal(params["head"]["kernel"], np.full((2, 3), 2, np.float32))
    np.testing.assert_array_equal(stats["bn"]["mean"], np.full((3,), 2, np.float32))
    # Selected on "last step" (or stopped early): results.json names a step best/ does not hold.
    (tmp_path / "results.json").write_text(json.dumps({"kind": "finetune", "step": 6}))
    assert checkpoint.load_variables(str(tmp_path))[2] == 6
    assert checkpoint.reported_best_step(str(tmp_path)) is None


def test_sigterm_is_recorded_not_fatal_and_handler_restored():
    before = signal.getsignal(signal.SIGTERM)
    with checkpoint.PreemptionGuard() as guard:
        assert not guard.requested()
        os.kill(os.getpid(), signal.SIGTERM)
        assert guard.requested()  # we are still alive; the loop will save and stop
    assert signal.getsignal(signal.SIGTERM) == before


def test_merge_pretrained_takes_selected_projection_layers_only():
    target = {
        "backbone": {"k": np.zeros(2)},
        "projection_head": {"layer_0": {"k": np.zeros(2)}, "layer_1": {"k": np.zeros(2)}},
        "supervised_head": {"k": np.zeros(3)},
    }
    source = {
        "backbone": {"k": np.ones(2)},
        "projection_head": {"layer_0": {"k": np.full(2, 2.0)}, "layer_1": {"k": np.full(2, 3.0)}},
        "supervised_head": {"k": np.ones(5)},  # another task's head: never copied
    }
    out = checkpoint.merge_pretrained(
        target, source, ("backbone", "projection_head"), proj_layers=1
    )
    np.testing.assert_array_equal(out["backbone"]["k"], [1, 1])
    np.testing.assert_array_equal(out["projection_head"]["layer_0"]["k"], [2, 2])
    np.testing.assert_array_equal(out["projection_head"]["layer_1"]["k"], [0, 0])
    np.testing.assert_array_equal(out["supervised_head"]["k"], [0, 0, 0])
    with pytest.raises(ValueError, match="shape"):
        checkpoint.merge_pretrained({"backbone": {"k": np.zeros(3)}}, source, ("backbone",))
