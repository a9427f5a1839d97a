"""SimCLRModel: ResNet backbone + projection head + optional supervised head."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from medssl_jax.models.heads import ProjectionHead, SupervisedHead
from medssl_jax.models.resnet import ResNet, validate_backbone


class SimCLRModel(nn.Module):
    """SimCLR network; variables are keyed 'backbone', 'projection_head', 'supervised_head'.

    `__call__(x [B, H, W, 3] in [0, 1], train)` returns a dict of float32 arrays:
      features     [B, D]    pooled backbone output,
      projection   [B, proj_out_dim] projection head output (not l2-normalised),
      ft_features  [B, D']   supervised head input: projection-head output after
                             `ft_proj_selector` layers (0 = backbone features),
      logits       [B, num_classes] only when num_classes > 0.
    `head_stop_gradient`: logits see stop_gradient(ft_features) (online linear probe while
    pretraining). `freeze_backbone`: linear evaluation, backbone and projection head run with
    BN in inference mode (running stats, no batch_stats update) behind a stop_gradient.
    """

    depth: int = 50
    width_multiplier: float = 1
    sk_ratio: float = 0.0
    num_classes: int = 0
    num_proj_layers: int = 2
    proj_out_dim: int = 128
    ft_proj_selector: int = 0
    head_stop_gradient: bool = False
    freeze_backbone: bool = False
    cifar_stem: bool = False
    dtype: Any = jnp.float32
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5

    def __post_init__(self) -> None:
        validate_backbone(self.depth, self.width_multiplier, self.sk_ratio)
        if self.num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {self.num_classes}")
        if self.num_proj_layers < 0:
            raise ValueError(f"num_proj_layers must be >= 0, got {self.num_proj_layers}")
        if self.proj_out_dim < 1:
            raise ValueError(f"proj_out_dim must be >= 1, got {self.proj_out_dim}")
        if not 0 <= self.ft_proj_selector <= self.num_proj_layers:
            raise ValueError(
                f"ft_proj_selector must be in [0, num_proj_layers={self.num_proj_layers}], "
                f"got {self.ft_proj_selector}"
            )
        if jnp.dtype(self.dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
            raise ValueError(f"dtype must be float32 or bfloat16, got {self.dtype!r}")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> dict[str, jax.Array]:
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"SimCLRModel expects RGB images [B, H, W, 3], got shape {x.shape}")
        body_train = train and not self.freeze_backbone
        features = ResNet(
            depth=self.depth,
            width_multiplier=self.width_multiplier,
            sk_ratio=self.sk_ratio,
            cifar_stem=self.cifar_stem,
            dtype=self.dtype,
            bn_momentum=self.bn_momentum,
            bn_epsilon=self.bn_epsilon,
            name="backbone",
        )(x, train=body_train)
        projection, hiddens = ProjectionHead(
            num_layers=self.num_proj_layers,
            out_dim=self.proj_out_dim,
            bn_momentum=self.bn_momentum,
            bn_epsilon=self.bn_epsilon,
            name="projection_head",
        )(features, train=body_train)
        ft_features = hiddens[self.ft_proj_selector]
        if self.freeze_backbone:
            features, projection, ft_features = jax.lax.stop_gradient(
                (features, projection, ft_features)
            )
        out = {"features": features, "projection": projection, "ft_features": ft_features}
        if self.num_classes > 0:
            head_in = jax.lax.stop_gradient(ft_features) if self.head_stop_gradient else ft_features
            out["logits"] = SupervisedHead(self.num_classes, name="supervised_head")(head_in)
        return out
