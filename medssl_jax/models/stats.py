"""Parameter and FLOP counts computed from shapes only (no weights are allocated)."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from medssl_jax.models.resnet import feature_dim
from medssl_jax.models.variants import create_model


def count_params(tree: Any) -> int:
    """Total number of scalars in a pytree of arrays or jax.ShapeDtypeStruct."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def abstract_variables(model: Any, image_size: int, batch_size: int = 1) -> Any:
    """Shapes/dtypes of `model.init` variables for [batch, size, size, 3] inputs, via eval_shape."""
    x = jax.ShapeDtypeStruct((batch_size, image_size, image_size, 3), jnp.float32)
    return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)


def forward_flops(model: Any, variables: Any, image_size: int) -> float:
    """XLA cost-analysis FLOPs of one eval-mode forward pass on one image.

    XLA counts 2 flops per multiply-add of convs/matmuls plus 1 per elementwise op (BN, ReLU,
    pooling), on the lowered (unoptimised) HLO; nothing is compiled or allocated. Conv taps
    that fall on padding are not counted, so the total sits a little below the textbook
    2 x MACs (ResNet-50 1x at 224 px: 7.99 vs ~8.2).
    """
    x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    lowered = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, x)
    cost = lowered.cost_analysis()
    if isinstance(cost, list | tuple):  # older jax returned one dict per computation
        cost = cost[0]
    return float(cost["flops"])


def model_stats(
    variant: str, image_size: int = 224, num_classes: int = 0, num_proj_layers: int = 2
) -> dict[str, Any]:
    """Sizes of a variant: backbone_params, head_params (projection + supervised),
    gflops (XLA count of one eval forward on one image, 2 flops per multiply-add, see
    `forward_flops`), feature_dim. Computed abstractly; fast even for r152_3x_sk1."""
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    model = create_model(variant, num_classes=num_classes, num_proj_layers=num_proj_layers)
    variables = abstract_variables(model, image_size)
    params = variables["params"]
    x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    return dict(
        variant=variant,
        image_size=image_size,
        num_classes=num_classes,
        num_proj_layers=num_proj_layers,
        feature_dim=(
            jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)[
                "features"
            ].shape[-1]
            if model.vit
            else feature_dim(model.depth, model.width_multiplier)
        ),
        backbone_params=count_params(params["backbone"]),
        head_params=count_params(params.get("projection_head", {}))
        + count_params(params.get("supervised_head", {})),
        gflops=forward_flops(model, variables, image_size) / 1e9,
    )
