"""Whole method losses (hybrid, SwAV's queue) against float64 NumPy recomputations from the
model's own outputs: the weighting of the terms, label masking, and the queue's codes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medssl_jax import losses, methods, state
from medssl_jax.methods import hybrid
from tests.test_method_losses import (  # NumPy references and constants
    LOCAL_SIZE,
    NUM_CLASSES,
    NUM_LOCAL,
    RTOL,
    SIZE,
    B,
    np_l2n,
    np_masked_softmax_ce,
    np_nt_xent,
    np_sinkhorn,
    np_swav_loss,
)
from tests.utils import synthetic_pretrain_batch, tiny_pretrain_config

# ----------------------------------------------------------------------------- whole methods


def _jnp_batch(**overrides):
    raw = synthetic_pretrain_batch(0, B, SIZE, NUM_CLASSES, NUM_LOCAL, LOCAL_SIZE)
    raw.update(overrides)
    return {k: jnp.asarray(v) for k, v in raw.items()}


def _build(method, **overrides):
    config = tiny_pretrain_config(method, **overrides)
    parts = methods.get(method).build(
        config,
        num_classes=NUM_CLASSES,
        label_kind="multiclass",
        total_steps=10,
        steps_per_epoch=2.0,
    )
    init = jax.jit(lambda rng: state.init_variables(parts.model, rng, SIZE))
    # An "rbg" key: threefry's unrolled rounds for every parameter take ~20 s to compile on
    # 2 CPU cores; the values of the initial parameters do not matter to these tests.
    params, batch_stats = init(jax.random.key(0, impl="rbg"))
    params = parts.init_params(params)
    extra = parts.init_extra(params, batch_stats)

    def forward(p, bs, views, local_views):
        """Globals, then locals with the statistics the globals updated (as the method does)."""
        g, mut = parts.model.apply(
            {"params": p, "batch_stats": bs}, views, train=True, mutable=["batch_stats"]
        )
        loc, mut = parts.model.apply(
            {"params": p, "batch_stats": mut["batch_stats"]},
            local_views,
            train=True,
            mutable=["batch_stats"],
        )
        return g, loc, mut["batch_stats"]

    return config, parts, params, batch_stats, extra, jax.jit(parts.loss), jax.jit(forward)


def _reference_forward(forward, params, batch_stats, batch):
    """The model's outputs, applied by the test: (global outputs, [per-crop scores as float64],
    z [B, 2, D], final batch_stats)."""
    g, loc, new_stats = forward(
        params,
        batch_stats,
        batch["views"].reshape(-1, SIZE, SIZE, 3),
        batch["local_views"].reshape(-1, LOCAL_SIZE, LOCAL_SIZE, 3),
    )
    g = {k: np.asarray(v, np.float64) for k, v in g.items()}
    sg = g["head"].reshape(B, 2, -1)
    sl = np.asarray(loc["head"], np.float64).reshape(B, NUM_LOCAL, -1)
    scores = [sg[:, 0], sg[:, 1]] + [sl[:, v] for v in range(NUM_LOCAL)]
    z = np_l2n(g["projection"]).reshape(B, 2, -1)
    return g, scores, z, new_stats


@pytest.fixture(scope="module")
def hybrid_setup():
    lam, mu, temp = 0.7, 0.3, 0.2
    built = _build(
        "hybrid",
        **{
            "hybrid.contrastive_weight": lam,
            "hybrid.supervised_weight": mu,
            "hybrid.temperature": temp,
        },
    )
    return (lam, mu, temp), built


def test_hybrid_loss_is_weighted_sum():
    assert hybrid.hybrid_loss(1.5, 2.0, 4.0, lam=0.5, mu=0.25) == pytest.approx(3.5)


def test_hybrid_whole_loss(hybrid_setup):
    (lam, mu, temp), (config, parts, params, batch_stats, extra, loss_fn, forward) = hybrid_setup
    batch = _jnp_batch()
    labels = np.asarray(batch["label"])
    assert (labels >= 0).any() and (labels < 0).any()
    loss, (metrics, new_stats, new_extra) = loss_fn(
        params, batch_stats, extra, batch, jax.random.key(1), jnp.int32(0)
    )
    m = {k: float(v) for k, v in metrics.items()}
    np.testing.assert_allclose(
        float(loss),
        m["swav_loss"] + lam * m["contrastive_loss"] + mu * m["supervised_loss"],
        rtol=RTOL,
    )

    g, scores, z, ref_stats = _reference_forward(forward, params, batch_stats, batch)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6),
        new_stats,
        ref_stats,
    )
    # Supervised: masked softmax CE of the global crops' logits (rows example-major).
    np.testing.assert_allclose(
        m["supervised_loss"], np_masked_softmax_ce(g["logits"], np.repeat(labels, 2)), rtol=RTOL
    )
    # Contrastive: NT-Xent of the two global crops' L2-normalised projections at hybrid.temperature.
    np.testing.assert_allclose(m["contrastive_loss"], np_nt_xent(z[:, 0], z[:, 1], temp), rtol=RTOL)
    nt, _ = losses.nt_xent(
        jnp.asarray(z[:, 0], jnp.float32), jnp.asarray(z[:, 1], jnp.float32), temp
    )
    np.testing.assert_allclose(m["contrastive_loss"], float(nt), rtol=RTOL)
    # Clustering: SwAV's loss over all 4 crops with Sinkhorn codes of the 2 global crops.
    s = config.swav
    codes = [np_sinkhorn(x, s.epsilon, s.sinkhorn_iterations) for x in scores[:2]]
    np.testing.assert_allclose(
        m["swav_loss"], np_swav_loss(scores, codes, s.temperature), rtol=RTOL
    )

    # Unlabelled batch: no supervised term, self-supervised terms unchanged.
    loss_u, (metrics_u, _, _) = loss_fn(
        params,
        batch_stats,
        extra,
        _jnp_batch(label=np.full(B, -1, np.int32)),
        jax.random.key(1),
        jnp.int32(0),
    )
    unl = {k: float(v) for k, v in metrics_u.items()}
    assert unl["supervised_loss"] == 0.0
    assert unl["swav_loss"] == pytest.approx(m["swav_loss"], rel=1e-6)
    assert unl["contrastive_loss"] == pytest.approx(m["contrastive_loss"], rel=1e-6)
    np.testing.assert_allclose(
        float(loss_u), m["swav_loss"] + lam * m["contrastive_loss"], rtol=RTOL
    )


@pytest.fixture(scope="module")
def swav_queue_setup():
    return _build("swav", **{"swav.queue_length": 2 * B, "swav.queue_start_epoch": 0.0})


def test_swav_queue(swav_queue_setup):
    config, parts, params, batch_stats, extra, loss_fn, forward = swav_queue_setup
    s = config.swav
    length = 2 * B
    batch = _jnp_batch()
    rng, step = jax.random.key(1), jnp.int32(0)
    _, scores, z, _ = _reference_forward(forward, params, batch_stats, batch)
    plain_codes = [np_sinkhorn(x, s.epsilon, s.sinkhorn_iterations) for x in scores[:2]]
    plain_loss = np_swav_loss(scores, plain_codes, s.temperature)

    # Empty queue: plain codes; the batch's global-crop embeddings are pushed, count = B.
    _, (metrics, _, new_extra) = loss_fn(params, batch_stats, extra, batch, rng, step)
    np.testing.assert_allclose(float(metrics["swav_loss"]), plain_loss, rtol=RTOL)
    queue = np.asarray(new_extra["queue"])
    assert queue.shape == (2, length, int(config.model.proj_out_dim))
    for i in range(2):
        np.testing.assert_allclose(queue[i, :B], z[:, i], rtol=RTOL, atol=1e-6)
        assert np.all(queue[i, B:] == 0)
    assert int(new_extra["queue_count"]) == B

    # A full queue of random unit vectors extends Sinkhorn's batch: codes = last B rows.
    qrng = np.random.default_rng(8)
    old = np_l2n(qrng.normal(size=(2, length, queue.shape[-1])))
    full = {"queue": jnp.asarray(old, jnp.float32), "queue_count": jnp.int32(length)}
    _, (metrics, _, new_extra) = loss_fn(params, batch_stats, full, batch, rng, step)
    protos = np.asarray(params["method_head"]["prototypes"]["kernel"], np.float64)  # [D, K]
    codes = []
    for i in range(2):
        extended = np.concatenate([old[i] @ protos, scores[i]])  # [L + B, K], queue first
        codes.append(np_sinkhorn(extended, s.epsilon, s.sinkhorn_iterations)[length:])
    queue_loss = np_swav_loss(scores, codes, s.temperature)
    assert abs(queue_loss - plain_loss) > 1e-3 * abs(plain_loss)  # the queue matters here
    np.testing.assert_allclose(float(metrics["swav_loss"]), queue_loss, rtol=RTOL)
    # Newest first, the oldest B entries drop out (main_swav.py's queue shift).
    queue = np.asarray(new_extra["queue"])
    for i in range(2):
        np.testing.assert_allclose(queue[i, :B], z[:, i], rtol=RTOL, atol=1e-6)
        np.testing.assert_allclose(queue[i, B:], old[i, : length - B], rtol=1e-6, atol=1e-7)
    assert int(new_extra["queue_count"]) == length

    # A partly filled queue is not used yet (the reference waits for queue[i, -1] != 0).
    partial = {"queue": jnp.asarray(old, jnp.float32), "queue_count": jnp.int32(B)}
    _, (metrics, _, new_extra) = loss_fn(params, batch_stats, partial, batch, rng, step)
    np.testing.assert_allclose(float(metrics["swav_loss"]), plain_loss, rtol=RTOL)
    assert int(new_extra["queue_count"]) == length
