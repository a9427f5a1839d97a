"""SimCLR projection head and supervised (linear) head.

Heads compute in float32 whatever the backbone dtype: they are a negligible share of the
FLOPs and keep projections (fed to NT-Xent) and logits precise.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from medssl_jax.models.resnet import batch_norm

head_kernel_init = nn.initializers.normal(stddev=0.01)


class LinearBN(nn.Module):
    """Bias-free dense layer followed by BN (with or without beta), optional ReLU."""

    features: int
    use_beta: bool = True
    relu: bool = False
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = nn.Dense(
            self.features,
            use_bias=False,
            kernel_init=head_kernel_init,
            dtype=jnp.float32,
            param_dtype=jnp.float32,
            name="dense",
        )(x)
        return batch_norm(
            x,
            train=train,
            relu=self.relu,
            use_bias=self.use_beta,
            momentum=self.bn_momentum,
            epsilon=self.bn_epsilon,
            dtype=jnp.float32,
            name="bn",
        )


class ProjectionHead(nn.Module):
    """SimCLR non-linear projection head, `num_layers` LinearBN layers named layer_0, layer_1...

    Hidden layers keep the input width (BN with beta, ReLU); the last maps to `out_dim`
    (BN without beta, no ReLU). With num_layers == 0 the head is the identity.
    Returns (projection [B, out_dim], hiddens) where hiddens[k] is the output after k layers
    (hiddens[0] = the input), which is what SimCLR's `ft_proj_selector` indexes.
    """

    num_layers: int = 2
    out_dim: int = 128
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, list[jax.Array]]:
        x = x.astype(jnp.float32)
        hidden_dim = x.shape[-1]
        hiddens = [x]
        for j in range(self.num_layers):
            last = j == self.num_layers - 1
            x = LinearBN(
                self.out_dim if last else hidden_dim,
                use_beta=not last,
                relu=not last,
                bn_momentum=self.bn_momentum,
                bn_epsilon=self.bn_epsilon,
                name=f"layer_{j}",
            )(x, train)
            hiddens.append(x)
        return x, hiddens


class SupervisedHead(nn.Module):
    """Linear classifier: dense with bias, kernel init normal(0.01); float32 logits."""

    num_classes: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.Dense(
            self.num_classes,
            use_bias=True,
            kernel_init=head_kernel_init,
            dtype=jnp.float32,
            param_dtype=jnp.float32,
            name="dense",
        )(x.astype(jnp.float32))
