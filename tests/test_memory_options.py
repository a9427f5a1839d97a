"""Memory options (model.remat, sharding.fsdp) change where and when numbers live, not the
numbers: 2 steps on 8 devices give the losses and parameters of plain data parallelism."""

import re
from functools import partial

import jax
import numpy as np
import pytest

from medssl_jax import checkpoint as ckpt_lib
from medssl_jax import config_lib, pretrain, sharding
from tests.test_pretrain import NUM_CLASSES, batches_for, method_config
from tests.utils import step_through

OPTIONS = {  # name -> (model.remat, sharding.fsdp)
    "dp": (False, False),
    "remat": (True, False),
    "fsdp": (False, True),
    "fsdp_remat": (True, True),
}


def options_config(method: str, remat: bool, fsdp: bool):
    c = method_config(method)
    c.model.dtype = "float32"  # exact comparisons (the demo config is float32 already)
    c.model.remat, c.sharding.fsdp = remat, fsdp
    config_lib.validate(c)
    return c


def build(config):
    return pretrain.build(
        config,
        sharding.make_mesh(),
        num_classes=NUM_CLASSES,
        label_kind="multiclass",
        total_steps=10,
        warmup_steps=1,
        steps_per_epoch=1,
    )


def run(config, batches):
    """(built, initial state on host, final state on device, metrics per step on host)."""
    built = build(config)
    init, state, metrics = step_through(built, sharding.make_mesh(), batches)
    return built, init, state, metrics


def split_leaves(tree):
    """Leaves of `tree` that are really split over devices (a shard smaller than the array)."""
    return [
        x
        for x in jax.tree.leaves(tree)
        if not x.sharding.is_fully_replicated
        and x.addressable_shards[0].data.shape != x.shape
        and sharding.DATA_AXIS in x.sharding.spec
    ]


_RUNS: dict = {}


def get_run(method: str, name: str):
    """run() of `method` with option set `name`, computed once per test session."""
    if (method, name) not in _RUNS:
        batches = batches_for(method_config(method))
        _RUNS[method, name] = run(options_config(method, *OPTIONS[name]), batches)
    return _RUNS[method, name]


slow = pytest.mark.slow
# Both options at once is the quick check (2 compilations); each alone and DINO are slow.
CASES = [
    ("simclr", "fsdp_remat"),
    pytest.param("simclr", "remat", marks=slow),
    pytest.param("simclr", "fsdp", marks=slow),
    pytest.param("dino", "fsdp_remat", marks=slow),
    pytest.param("dino", "remat", marks=slow),
    pytest.param("dino", "fsdp", marks=slow),
]


@pytest.mark.parametrize("method,name", CASES)
def test_option_equals_data_parallelism(method, name):
    """Same variables, same losses and metrics at both steps, same whole state after 2 steps
    (params, BatchNorm statistics, optimiser, method state) as plain data parallelism."""
    _, init_dp, final_dp, metrics_dp = get_run(method, "dp")
    _, init, final, metrics = get_run(method, name)
    what = f"{method}/{name}"
    # Same variables (paths, shapes, initial values): checkpoints are interchangeable.
    assert jax.tree.structure(init) == jax.tree.structure(init_dp), what
    for a, b in zip(jax.tree.leaves(init), jax.tree.leaves(init_dp), strict=True):
        np.testing.assert_array_equal(a, b, err_msg=what)
    for m, m_dp in zip(metrics, metrics_dp, strict=True):
        assert set(m) == set(m_dp)
        for k in m:
            np.testing.assert_allclose(m[k], m_dp[k], rtol=1e-5, atol=1e-6, err_msg=f"{what}/{k}")
    host, host_dp = jax.device_get(final), jax.device_get(final_dp)
    assert int(host.step) == 2
    leaves = jax.tree_util.tree_leaves_with_path(host)
    for (path, a), b in zip(leaves, jax.tree.leaves(host_dp), strict=True):
        np.testing.assert_allclose(
            a, b, rtol=1e-5, atol=1e-6, err_msg=f"{what}{jax.tree_util.keystr(path)}"
        )
    # The steps moved the parameters (equality is not 'nothing happened').
    moved = [
        np.abs(np.asarray(a) - np.asarray(b)).max() > 0
        for a, b in zip(jax.tree.leaves(host.params), jax.tree.leaves(init.params), strict=True)
    ]
    assert np.mean(moved) > 0.5, what


@pytest.mark.parametrize("method,name", [c for c in CASES if "fsdp" in str(c)])
def test_fsdp_state_is_split_over_data(method, name):
    built, _, final, _ = get_run(method, name)
    for part in ("params", "opt_state"):
        split = split_leaves(getattr(final, part))
        assert split, f"{method}/{name}: no leaf of {part} is split"
        for x in split:  # 1/8 of the array on each device
            assert x.addressable_shards[0].data.size * 8 == x.size
    assert not split_leaves(final.batch_stats)  # BatchNorm statistics stay replicated
    if method == "dino":  # the EMA teacher is split like the student
        assert split_leaves(final.extra["teacher"]["params"])
    # Small arrays (biases, BN scales) stay whole.
    for x in jax.tree.leaves(final.params):
        if x.size < sharding.FSDP_MIN_SIZE:
            assert x.sharding.is_fully_replicated
    # The placement the step declares (AOT, restore targets) is the one it returns.
    for a, x in zip(jax.tree.leaves(built.abstract_state), jax.tree.leaves(final), strict=True):
        assert a.sharding.is_equivalent_to(x.sharding, x.ndim)
    _, _, final_dp, _ = get_run(method, "dp")
    assert not split_leaves(final_dp)  # data parallelism: everything replicated


def test_fsdp_checkpoint_resumes_split_or_replicated(tmp_path):
    """A state saved with FSDP restores split (resume) and replicated (a data-parallel run
    reading it), with the same values."""
    state = get_run("simclr", "fsdp_remat")[2]
    ckpt = ckpt_lib.Checkpointer(str(tmp_path), every_steps=1, keep=1, async_save=False)
    ckpt.save(2, state, {"step": 2}, force=True)
    for name in ("fsdp_remat", "dp"):
        abstract = get_run("simclr", name)[0].abstract_state
        ckpt_lib.check_compatible(ckpt.manager.item_metadata(2)["state"], abstract, name)
        restored, _ = ckpt.restore(abstract, 2)
        for a, want, b in zip(
            jax.tree.leaves(restored),
            jax.tree.leaves(abstract),
            jax.tree.leaves(state),
            strict=True,
        ):
            assert a.sharding.is_equivalent_to(want.sharding, a.ndim), name
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    ckpt.close()


def test_fsdp_sharding_rule():
    mesh = sharding.make_mesh()
    spec = lambda shape, **kw: tuple(sharding.fsdp_sharding(shape, mesh, **kw).spec)  # noqa: E731
    assert spec((3, 3, 64, 128)) == (None, None, None, "data")  # largest divisible dim
    assert spec((3, 3, 64, 64)) == (None, None, None, "data")  # ties: the last one
    assert spec((4096, 12)) == ("data", None)
    assert spec((4099, 13)) == ()  # nothing divisible by 8: replicated
    assert spec((512,)) == ()  # below fsdp_min_size
    assert spec((512,), min_size=0) == ("data",)
    single = sharding.make_mesh(jax.devices()[:1])
    assert tuple(sharding.fsdp_sharding((4096, 64), single).spec) == ()


@pytest.mark.parametrize(
    "field,value",
    [("model.remat", 1), ("sharding.fsdp", "yes"), ("sharding.fsdp_min_size", -1)],
)
def test_bad_memory_options_name_the_field(field, value):
    c = method_config("simclr")
    section, name = field.split(".")
    with c[section].ignore_type():
        c[section][name] = value
    with pytest.raises(config_lib.ConfigError, match=r"config\." + field.replace(".", r"\.")):
        config_lib.validate(c)


@pytest.mark.parametrize("variant", ["r18_0.125x_sk1", "vit_tiny"])
def test_remat_blocks_keep_variables_and_gradients(variant):
    """model.remat wraps the ResNet stem and every backbone block in a checkpoint (recomputed
    in the backward pass) with the same variable tree (paths, shapes, initial values) and the
    same gradients and BatchNorm updates."""
    from medssl_jax.models import create_model

    x = jax.random.uniform(jax.random.key(1), (4, 32, 32, 3))
    models = [create_model(variant, num_classes=3, remat=r) for r in (False, True)]
    inits = [m.init(jax.random.key(0), x, train=False) for m in models]
    assert jax.tree.structure(inits[0]) == jax.tree.structure(inits[1])
    for a, b in zip(jax.tree.leaves(inits[0]), jax.tree.leaves(inits[1]), strict=True):
        np.testing.assert_array_equal(a, b)
    params, stats = inits[0]["params"], inits[0].get("batch_stats", {})

    def loss(model, params, stats):
        out, new = model.apply(
            {"params": params, "batch_stats": stats}, x, train=True, mutable=["batch_stats"]
        )
        return (out["projection"] ** 2).sum() + out["logits"].sum(), new

    jaxprs = [str(jax.make_jaxpr(partial(loss, m))(params, stats)) for m in models]
    remats = [len(re.findall(r"= (?:remat2?|checkpoint)\[", j)) for j in jaxprs]
    assert remats == ([0, 8 + 1] if variant.startswith("r18") else [0, 4])  # r18: + the stem
    grad = lambda m: jax.jit(jax.grad(partial(loss, m), has_aux=True))(params, stats)  # noqa: E731
    # Leaf by leaf to 2e-5 of its norm: float32 rounding of other fusions (remat off/on differ
    # by <1e-5; the same jitted and eager grads differ by ~2e-4).
    for a, b in zip(
        jax.tree.leaves(grad(models[0])), jax.tree.leaves(grad(models[1])), strict=True
    ):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert np.linalg.norm(a - b) <= 2e-5 * np.linalg.norm(a) + 1e-12
