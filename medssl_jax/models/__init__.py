"""SimCLR ResNet model zoo: backbone, heads, named variants and size statistics."""

from medssl_jax.models.heads import LinearBN, ProjectionHead, SupervisedHead
from medssl_jax.models.layer_order import layer_call_order
from medssl_jax.models.model import SimCLRModel
from medssl_jax.models.resnet import (
    BasicBlock,
    BottleneckBlock,
    ResNet,
    SelectiveKernelConv,
    feature_dim,
    scaled_channels,
)
from medssl_jax.models.stats import abstract_variables, count_params, forward_flops, model_stats
from medssl_jax.models.variants import (
    ALIASES,
    RELEASED_VARIANTS,
    create_model,
    get_variant,
    variant_name,
)

__all__ = [
    "ALIASES",
    "RELEASED_VARIANTS",
    "BasicBlock",
    "BottleneckBlock",
    "LinearBN",
    "ProjectionHead",
    "ResNet",
    "SelectiveKernelConv",
    "SimCLRModel",
    "SupervisedHead",
    "abstract_variables",
    "count_params",
    "create_model",
    "feature_dim",
    "forward_flops",
    "get_variant",
    "layer_call_order",
    "model_stats",
    "scaled_channels",
    "variant_name",
]
