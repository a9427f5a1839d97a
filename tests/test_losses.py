"""NT-Xent against an independent NumPy reference, and the supervised losses."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medssl_jax import losses


def _reference_nt_xent(z1, z2, tau, keys=None):
    """Straightforward per-anchor loop (SimCLR's definition), float64."""
    z = np.concatenate([z1, z2]).astype(np.float64)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    n = len(z)
    b = n // 2
    total, correct, ent = 0.0, 0, 0.0
    for i in range(n):
        pos = (i + b) % n
        cands = []
        for j in range(n):
            if j == i:
                continue
            if keys is not None and j != pos and keys[j % b] == keys[i % b]:
                continue
            cands.append(j)
        s = np.array([z[i] @ z[j] / tau for j in cands])
        m = s.max()
        logp = s - m - np.log(np.exp(s - m).sum())
        total += -logp[cands.index(pos)]
        correct += int(cands[int(np.argmax(s))] == pos)
        ent += -(np.exp(logp) * logp).sum()
    return total / n, correct / n, ent / n


@pytest.mark.parametrize("seed,b,d,tau", [(0, 8, 16, 0.1), (1, 5, 3, 0.5), (2, 16, 128, 1.0)])
def test_nt_xent_matches_numpy_reference(seed, b, d, tau):
    rng = np.random.default_rng(seed)
    z1 = rng.normal(size=(b, d)).astype(np.float32)
    z2 = (z1 + 0.5 * rng.normal(size=(b, d))).astype(np.float32)
    loss, m = losses.nt_xent(jnp.asarray(z1), jnp.asarray(z2), tau)
    ref_loss, ref_acc, ref_ent = _reference_nt_xent(z1, z2, tau)
    np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-4)
    np.testing.assert_allclose(float(m["contrastive_acc"]), ref_acc, atol=1e-6)
    np.testing.assert_allclose(float(m["contrastive_entropy"]), ref_ent, rtol=1e-4)


def test_nt_xent_same_patient_mask_matches_reference():
    rng = np.random.default_rng(3)
    b, d = 10, 8
    z1 = rng.normal(size=(b, d)).astype(np.float32)
    z2 = rng.normal(size=(b, d)).astype(np.float32)
    keys = np.array([0, 0, 1, 2, 2, 2, 3, 4, 5, 5], np.int32)
    loss, _ = losses.nt_xent(jnp.asarray(z1), jnp.asarray(z2), 0.2, jnp.asarray(keys))
    ref, _, _ = _reference_nt_xent(z1, z2, 0.2, keys)
    np.testing.assert_allclose(float(loss), ref, rtol=1e-4)
    unmasked, _ = losses.nt_xent(jnp.asarray(z1), jnp.asarray(z2), 0.2)
    assert abs(float(unmasked) - ref) > 1e-3  # the mask really changes the loss


def test_nt_xent_is_invariant_to_scale_and_batch_permutation():
    rng = np.random.default_rng(4)
    z1, z2 = rng.normal(size=(2, 12, 6)).astype(np.float32)
    perm = rng.permutation(12)
    a, _ = losses.nt_xent(jnp.asarray(z1), jnp.asarray(z2), 0.1)
    b, _ = losses.nt_xent(jnp.asarray(3 * z1[perm]), jnp.asarray(0.5 * z2[perm]), 0.1)
    np.testing.assert_allclose(float(a), float(b), rtol=1e-5)


def test_nt_xent_gradient_matches_finite_difference():
    rng = np.random.default_rng(5)
    z1, z2 = (jnp.asarray(x) for x in rng.normal(size=(2, 4, 3)))
    f = lambda z: losses.nt_xent(z, z2, 0.5)[0]
    g = jax.grad(f)(z1)
    eps = 1e-3
    e = jnp.zeros_like(z1).at[1, 2].set(eps)
    fd = (f(z1 + e) - f(z1 - e)) / (2 * eps)
    np.testing.assert_allclose(float(g[1, 2]), float(fd), rtol=2e-2, atol=1e-4)


def test_masked_softmax_ce_ignores_unlabeled_rows():
    logits = jnp.array([[2.0, 0.0], [0.0, 2.0], [5.0, -5.0]])
    labels = jnp.array([0, -1, 1])
    loss, acc = losses.masked_softmax_ce(logits, labels)
    p = jax.nn.log_softmax(logits)
    np.testing.assert_allclose(float(loss), float(-(p[0, 0] + p[2, 1]) / 2), rtol=1e-6)
    assert float(acc) == 0.5
    zero, _ = losses.masked_softmax_ce(logits, jnp.array([-1, -1, -1]))
    assert float(zero) == 0.0


def test_masked_sigmoid_ce_uses_only_masked_entries():
    logits = jnp.array([[1.0, -2.0], [0.5, 3.0]])
    labels = jnp.array([[1.0, 0.0], [0.0, 1.0]])
    mask = jnp.array([[1.0, 0.0], [1.0, 1.0]])
    got = float(losses.masked_sigmoid_ce(logits, labels, mask))
    x, y = np.array([1.0, 0.5, 3.0]), np.array([1.0, 0.0, 1.0])
    ref = np.mean(np.log1p(np.exp(-x)) * y + np.log1p(np.exp(x)) * (1 - y))
    np.testing.assert_allclose(got, ref, rtol=1e-6)
