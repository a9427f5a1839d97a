"""Call order of a model's parametrised layers (for mapping TF1 auto-numbered checkpoints).

TF1 SimCLR checkpoints name variables `conv2d[_N]`, `batch_normalization[_N]`, `dense[_N]`
in creation order. Flax variable dicts lose creation order (jax.tree sorts dict keys), so this
records the order in which Conv / BatchNorm / Dense layers are called during an abstract init,
which equals the TF creation order for SimCLRModel (shortcut before residual branch, etc.).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

LAYER_KINDS = {nn.Conv: "conv2d", nn.BatchNorm: "batch_normalization", nn.Dense: "dense"}


def layer_call_order(model: nn.Module, image_size: int = 32) -> list[tuple[str, tuple[str, ...]]]:
    """[(kind, variable path)] of every Conv/BatchNorm/Dense in call order, kind being the TF
    layer name ('conv2d', 'batch_normalization', 'dense'); nothing is allocated."""
    order: list[tuple[str, tuple[str, ...]]] = []

    def record(next_fun: Any, args: Any, kwargs: Any, context: Any) -> Any:
        kind = LAYER_KINDS.get(type(context.module))
        if kind is not None and context.method_name == "__call__":
            order.append((kind, tuple(context.module.scope.path)))
        return next_fun(*args, **kwargs)

    x = jax.ShapeDtypeStruct((2, image_size, image_size, 3), jnp.float32)
    with nn.intercept_methods(record):
        jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
    return order
