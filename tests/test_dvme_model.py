"""DVME's forward against an independent NumPy computation on random weights; its reduction
to a linear head (one encoder, no attention); attention weights are distributions."""

import jax
import numpy as np
import pytest
from scipy.special import erf

from medssl_jax.models.dvme import DVME


def _np_layernorm(x, p, eps=1e-6):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _np_dense(x, p):
    return x @ p["kernel"] + p["bias"]


def _np_gelu(x):
    return 0.5 * x * (1 + erf(x / np.sqrt(2)))


def _np_softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _np_dvme(p, embeddings, heads):
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    tok = np.stack([_np_dense(e, p[f"embed_{i}"]) for i, e in enumerate(embeddings)], 1)
    b, m, d = tok.shape
    dh = d // heads
    y = _np_layernorm(tok, p["norm1"])
    q, k, v = (_np_dense(y, p[n]).reshape(b, m, heads, dh) for n in ("query", "key", "value"))
    attn = np.zeros((b, heads, m, m))
    mixed = np.zeros((b, m, heads, dh))
    for bi in range(b):
        for h in range(heads):
            a = _np_softmax(q[bi, :, h] @ k[bi, :, h].T / np.sqrt(dh))  # [M, M]
            attn[bi, h] = a
            mixed[bi, :, h] = a @ v[bi, :, h]
    tok = tok + _np_dense(mixed.reshape(b, m, d), p["attn_out"])
    y = _np_dense(_np_gelu(_np_dense(_np_layernorm(tok, p["norm2"]), p["mlp_in"])), p["mlp_out"])
    tok = tok + y
    logits = _np_dense(_np_dense(tok.reshape(b, m * d), p["fuse"]), p["head"])
    return logits, attn


def _random_params(model, embeddings, seed):
    """Init, then every leaf re-drawn (LayerNorm scales and biases included, not 1 / 0)."""
    params = model.init(jax.random.key(seed), embeddings)["params"]
    leaves, tree = jax.tree.flatten(params)
    rng = np.random.default_rng(seed)
    leaves = [rng.normal(0, 0.3, leaf.shape).astype(np.float32) for leaf in leaves]
    return jax.tree.unflatten(tree, leaves)


def test_forward_equals_numpy_reference():
    rng = np.random.default_rng(0)
    embeddings = [rng.normal(size=(5, d)).astype(np.float32) for d in (24, 16, 12)]
    model = DVME(num_classes=4, token_dim=16, out_dim=8, num_heads=4, mlp_ratio=2.0)
    params = _random_params(model, embeddings, 0)
    out = model.apply({"params": params}, embeddings)
    ref_logits, ref_attn = _np_dvme(params, embeddings, heads=4)
    np.testing.assert_allclose(out["logits"], ref_logits, rtol=2e-4, atol=2e-4)
    np.testing.assert_allclose(out["attention"], ref_attn, atol=1e-5)
    # encoder_weights: attention received per encoder, a distribution per example.
    np.testing.assert_allclose(out["encoder_weights"], ref_attn.mean((1, 2)), atol=1e-6)
    np.testing.assert_allclose(np.asarray(out["encoder_weights"]).sum(1), 1.0, atol=1e-6)
    assert (np.asarray(out["encoder_weights"]) >= 0).all()
    assert np.ptp(np.asarray(out["encoder_weights"]), axis=1).max() > 1e-3  # not uniform


def test_one_encoder_without_attention_is_a_linear_head():
    rng = np.random.default_rng(1)
    e = rng.normal(size=(7, 10)).astype(np.float32)
    model = DVME(num_classes=3, token_dim=8, out_dim=6, num_heads=2, attention=False)
    params = _random_params(model, [e], 1)
    assert set(params) == {"embed_0", "fuse", "head"}
    out = model.apply({"params": params}, [e])
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    w = p["embed_0"]["kernel"] @ p["fuse"]["kernel"] @ p["head"]["kernel"]  # [10, 3]
    bias = (p["embed_0"]["bias"] @ p["fuse"]["kernel"] + p["fuse"]["bias"]) @ p["head"][
        "kernel"
    ] + p["head"]["bias"]
    np.testing.assert_allclose(out["logits"], e @ w + bias, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out["encoder_weights"], 1.0)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="divisible by num_heads"):
        DVME(num_classes=2, token_dim=10, num_heads=4).init(
            jax.random.key(0), [np.zeros((1, 3), np.float32)]
        )
    with pytest.raises(ValueError, match="at least one encoder"):
        DVME(num_classes=2).init(jax.random.key(0), [])
