"""Losses: global NT-Xent (SimCLR / MICLe) and the supervised losses used by probes and fine-tuning.

All functions are pure and operate on GLOBAL arrays: under `jax.jit` over a Mesh('data'), a
[B, D] input sharded on the batch axis is the whole global batch, so the similarity matrix below
covers every example on every device and host (SimCLR's cross-replica negatives) and gradients
flow through every copy, exactly as in the single-device computation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

LARGE_NUM = 1e9  # SimCLR's mask value for self-similarities.


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """x / max(||x||, eps) along the last axis (tf.math.l2_normalize semantics)."""
    sq = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))


def nt_xent(
    z1: jax.Array,
    z2: jax.Array,
    temperature: float,
    negative_mask_keys: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Normalised-temperature cross-entropy over the global batch.

    Args:
      z1, z2: [B, D] projections of the two views; row i of z1 and row i of z2 are a positive pair.
      temperature: softmax temperature tau.
      negative_mask_keys: optional int [B] (e.g. patient keys). Pairs of different rows with the
        same key are removed from the negatives (MICLe option for datasets whose cases are smaller
        than patients). The positive pair is always kept.

    Returns:
      (loss, metrics): mean softmax cross-entropy over all 2B anchors; metrics hold the
      contrastive top-1 accuracy and the mean entropy of the anchors' softmax distributions.
    """
    b = z1.shape[0]
    z = l2_normalize(jnp.concatenate([z1, z2], axis=0).astype(jnp.float32))  # [2B, D]
    logits = z @ z.T / temperature  # [2B, 2B]
    idx = jnp.arange(2 * b)
    positive = (idx + b) % (2 * b)  # index of the other view of the same example
    invalid = jnp.eye(2 * b, dtype=bool)
    if negative_mask_keys is not None:
        keys = jnp.concatenate([negative_mask_keys, negative_mask_keys])
        same = keys[:, None] == keys[None, :]
        invalid = invalid | (same & (idx[None, :] != positive[:, None]))
    logits = jnp.where(invalid, logits - LARGE_NUM, logits)
    labels = jax.nn.one_hot(positive, 2 * b, dtype=jnp.float32)
    loss = jnp.mean(optax.softmax_cross_entropy(logits, labels))
    log_p = jax.nn.log_softmax(logits, axis=-1)
    p = jnp.exp(log_p)
    entropy = -jnp.mean(jnp.sum(jnp.where(invalid, 0.0, p * log_p), axis=-1))
    acc = jnp.mean((jnp.argmax(logits, axis=-1) == positive).astype(jnp.float32))
    return loss, {"contrastive_acc": acc, "contrastive_entropy": entropy}


def masked_softmax_ce(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean softmax CE and top-1 accuracy over rows with label >= 0 (label -1 = unlabeled).

    Returns zeros when no row is labeled, so unlabeled batches train the rest of the model only.
    """
    valid = (labels >= 0).astype(jnp.float32)
    safe = jnp.maximum(labels, 0)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), safe)
    n = jnp.maximum(jnp.sum(valid), 1.0)
    acc = jnp.sum(valid * (jnp.argmax(logits, -1) == safe)) / n
    return jnp.sum(ce * valid) / n, acc


def masked_sigmoid_ce(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean sigmoid BCE over the entries with mask == 1 (CheXpert U-Ignore / blank labels)."""
    bce = optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32), labels)
    return jnp.sum(bce * mask) / jnp.maximum(jnp.sum(mask), 1.0)
