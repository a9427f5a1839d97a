"""SimCLRModel: ResNet or ViT backbone + projection head + optional supervised / method heads."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from medssl_jax.models.heads import ProjectionHead, SupervisedHead
from medssl_jax.models.resnet import ResNet, validate_backbone
from medssl_jax.models.vit import VIT_CONFIGS, VisionTransformer

INPUT_NORMS = ("none", "imagenet")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class SimCLRModel(nn.Module):
    """SimCLR network; variables are keyed 'backbone', 'projection_head', 'supervised_head'.

    `__call__(x [B, H, W, 3] in [0, 1], train)` (normalised with ImageNet's mean and std first
    when `input_norm='imagenet'`, as the PyTorch releases expect) returns a dict of float32 arrays:
      features     [B, D]    pooled backbone output,
      projection   [B, proj_out_dim] projection head output (not l2-normalised),
      ft_features  [B, D']   supervised head input: projection-head output after
                             `ft_proj_selector` layers (0 = backbone features),
      logits       [B, num_classes] only when num_classes > 0,
      head         a pretraining method's own head (`method_head`: SwAV prototypes, DINO head)
                   applied to `features` or `projection` (`method_head_input`), when set.
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
    torch_maxpool: bool = False  # torchvision's stem max-pool padding (converted PyTorch nets)
    input_norm: str = "none"  # or "imagenet": (x - mean) / std on device, inside the model
    method_head: nn.Module | None = None  # params under 'method_head'
    # A ViT backbone (name in VIT_CONFIGS) instead of the ResNet: features are the CLS tokens
    # of the last `vit_n_last_blocks` blocks (+ mean patch token with `vit_avgpool`), DINO's way.
    vit: str = ""
    vit_n_last_blocks: int = 1
    vit_avgpool: bool = False
    method_head_input: str = "projection"  # or "features"
    dtype: Any = jnp.float32
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    remat: bool = False  # recompute each backbone block in the backward pass (less memory)

    def __post_init__(self) -> None:
        if self.vit and self.vit not in VIT_CONFIGS:
            raise ValueError(f"vit must be one of {sorted(VIT_CONFIGS)}, got {self.vit!r}")
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
        if self.method_head_input not in ("projection", "features"):
            raise ValueError(
                f"method_head_input must be 'projection' or 'features', got "
                f"{self.method_head_input!r}"
            )
        if self.input_norm not in INPUT_NORMS:
            raise ValueError(f"input_norm must be one of {INPUT_NORMS}, got {self.input_norm!r}")
        if jnp.dtype(self.dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
            raise ValueError(f"dtype must be float32 or bfloat16, got {self.dtype!r}")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> dict[str, jax.Array]:
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"SimCLRModel expects RGB images [B, H, W, 3], got shape {x.shape}")
        body_train = train and not self.freeze_backbone
        if self.input_norm == "imagenet":
            x = (x - jnp.asarray(IMAGENET_MEAN, x.dtype)) / jnp.asarray(IMAGENET_STD, x.dtype)
        if self.vit:
            backbone = VisionTransformer(
                **VIT_CONFIGS[self.vit],
                n_last_blocks=self.vit_n_last_blocks,
                avgpool=self.vit_avgpool,
                dtype=self.dtype,
                remat=self.remat,
                name="backbone",
            )
        else:
            backbone = ResNet(
                depth=self.depth,
                width_multiplier=self.width_multiplier,
                sk_ratio=self.sk_ratio,
                cifar_stem=self.cifar_stem,
                torch_maxpool=self.torch_maxpool,
                dtype=self.dtype,
                bn_momentum=self.bn_momentum,
                bn_epsilon=self.bn_epsilon,
                remat=self.remat,
                name="backbone",
            )
        features = backbone(x, train=body_train)
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
        if self.method_head is not None:
            out["head"] = self.method_head(out[self.method_head_input], train=body_train)
        if self.num_classes > 0:
            head_in = jax.lax.stop_gradient(ft_features) if self.head_stop_gradient else ft_features
            out["logits"] = SupervisedHead(self.num_classes, name="supervised_head")(head_in)
        return out
