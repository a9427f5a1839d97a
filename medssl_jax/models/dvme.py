"""DVME (Dynamic Visual Meta-Embedding, Truong et al. 2021): attention fusion of the embeddings
of several pretrained encoders.

Our reading of the paper (its code is not public): each encoder's embedding is projected to
`token_dim` (512), the projections form a sequence of one token per encoder, ONE pre-norm
Transformer block mixes them (multi-head self-attention across encoders, then an MLP, both
with residuals, ViT-style: LayerNorm -> attention -> +, LayerNorm -> Dense-GELU-Dense -> +),
the tokens are concatenated and projected to `out_dim` (512), and a linear task head follows.
No nonlinearity sits between the fusion projection and the head, so with one encoder and the
block removed (`attention=False`) DVME is a (factored) linear head on that encoder.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["DVME", "DVMEOverImages"]


class DVME(nn.Module):
    """(embeddings: one [B, D_i] per encoder) -> dict(logits [B, K], attention [B, H, M, M],
    encoder_weights [B, M]).

    encoder_weights: the attention each encoder's token RECEIVES, averaged over heads and
    query tokens: a distribution over the M encoders per example (rows of a softmax averaged).
    """

    num_classes: int
    token_dim: int = 512
    out_dim: int = 512
    num_heads: int = 8
    mlp_ratio: float = 4.0
    attention: bool = True
    dropout: float = 0.0

    @nn.compact
    def __call__(self, embeddings: Sequence[jax.Array], train: bool = False) -> dict:
        if not embeddings:
            raise ValueError("DVME needs at least one encoder's embeddings")
        if self.token_dim % self.num_heads:
            raise ValueError(
                f"token_dim={self.token_dim} must be divisible by num_heads={self.num_heads}"
            )
        b = embeddings[0].shape[0]
        m = len(embeddings)
        tokens = jnp.stack(
            [
                nn.Dense(self.token_dim, name=f"embed_{i}")(e.astype(jnp.float32))
                for i, e in enumerate(embeddings)
            ],
            axis=1,
        )  # [B, M, d]
        h, dh = self.num_heads, self.token_dim // self.num_heads
        attn = jnp.ones((b, h, m, m), jnp.float32) / m
        if self.attention:
            y = nn.LayerNorm(name="norm1")(tokens)
            q = nn.Dense(self.token_dim, name="query")(y).reshape(b, m, h, dh)
            k = nn.Dense(self.token_dim, name="key")(y).reshape(b, m, h, dh)
            v = nn.Dense(self.token_dim, name="value")(y).reshape(b, m, h, dh)
            attn = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(dh), axis=-1)
            mixed = jnp.einsum("bhqk,bkhd->bqhd", attn, v).reshape(b, m, self.token_dim)
            mixed = nn.Dense(self.token_dim, name="attn_out")(mixed)
            tokens = tokens + nn.Dropout(self.dropout, deterministic=not train)(mixed)
            y = nn.LayerNorm(name="norm2")(tokens)
            y = nn.Dense(int(self.token_dim * self.mlp_ratio), name="mlp_in")(y)
            y = nn.Dense(self.token_dim, name="mlp_out")(nn.gelu(y, approximate=False))
            tokens = tokens + nn.Dropout(self.dropout, deterministic=not train)(y)
        fused = nn.Dense(self.out_dim, name="fuse")(tokens.reshape(b, m * self.token_dim))
        logits = nn.Dense(self.num_classes, name="head")(fused)
        return {"logits": logits, "attention": attn, "encoder_weights": attn.mean(axis=(1, 2))}


class DVMEOverImages(nn.Module):
    """End-to-end DVME: images [B, H, W, 3] in [0, 1] -> each encoder's pooled features (a
    SimCLRModel each, params under 'encoders_<i>') -> the DVME `head` (params under 'head').
    Returns the head's dict (logits, attention, encoder_weights)."""

    encoders: Sequence[nn.Module]
    head: DVME

    def __call__(self, x: jax.Array, train: bool) -> dict:
        feats = [enc(x, train=train)["features"] for enc in self.encoders]
        return self.head(feats, train=train)
