"""Named SimCLR variants (`r{depth}_{width}x_sk{0|1}`) and the `create_model` factory."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from medssl_jax.models.model import SimCLRModel
from medssl_jax.models.resnet import BLOCK_SIZES
from medssl_jax.models.vit import VIT_CONFIGS

SK_RATIO = 0.0625  # SimCLRv2's recommended selective-kernel ratio ("sk1").

# Backbones of the released SimCLRv2 checkpoints plus the ones used by Azizi et al.
RELEASED_VARIANTS = (
    "r50_1x_sk0",
    "r50_1x_sk1",
    "r50_2x_sk0",
    "r50_2x_sk1",
    "r50_4x_sk0",
    "r101_1x_sk0",
    "r101_1x_sk1",
    "r101_2x_sk0",
    "r101_2x_sk1",
    "r152_1x_sk0",
    "r152_1x_sk1",
    "r152_2x_sk0",
    "r152_2x_sk1",
    "r152_3x_sk1",
)
# Small aliases for tests and smoke runs (any fractional width also parses, e.g. r18_0.25x_sk0).
ALIASES = {
    "tiny": "r18_0.125x_sk0",
    "tiny_sk": "r50_0.125x_sk1",
}

_NAME_RE = re.compile(r"^r(?P<depth>\d+)_(?P<width>\d+(?:\.\d+)?)x_sk(?P<sk>[01])$")
_VALID_FORMS = (
    f"'r{{depth}}_{{width}}x_sk{{0|1}}' with depth in {sorted(BLOCK_SIZES)}, width > 0 "
    f"(e.g. r50_1x_sk0, r152_3x_sk1, r18_0.125x_sk0), a ViT in {sorted(VIT_CONFIGS)}, "
    f"or an alias in {sorted(ALIASES)}"
)


def get_variant(name: str) -> dict[str, Any]:
    """Parse a variant name into dict(depth=int, width_multiplier=int|float, sk_ratio=float),
    or dict(vit=name) for a Vision Transformer.

    Raises ValueError naming the valid forms for anything else.
    """
    if not isinstance(name, str):
        raise ValueError(f"variant must be a string of the form {_VALID_FORMS}; got {name!r}")
    canonical = ALIASES.get(name.strip(), name.strip())
    if canonical in VIT_CONFIGS:
        return dict(vit=canonical)
    m = _NAME_RE.match(canonical)
    if m is None:
        raise ValueError(f"unknown model variant {name!r}: expected {_VALID_FORMS}")
    depth = int(m["depth"])
    width = float(m["width"])
    if depth not in BLOCK_SIZES or width <= 0:
        raise ValueError(f"unknown model variant {name!r}: expected {_VALID_FORMS}")
    return dict(
        depth=depth,
        width_multiplier=int(width) if width.is_integer() else width,
        sk_ratio=SK_RATIO if m["sk"] == "1" else 0.0,
    )


def variant_name(depth: int, width_multiplier: float, sk_ratio: float) -> str:
    """Inverse of `get_variant` (any sk_ratio > 0 is written sk1)."""
    w = float(width_multiplier)
    width = str(int(w)) if w.is_integer() else repr(w)
    return f"r{depth}_{width}x_sk{1 if sk_ratio > 0 else 0}"


_MODEL_FIELDS = frozenset(
    f.name for f in dataclasses.fields(SimCLRModel) if f.name not in ("parent", "name")
)


def create_model(variant: str | None = None, num_classes: int = 0, **fields: Any) -> SimCLRModel:
    """Build a SimCLRModel from a variant name; keyword `fields` override the variant's values.

    With variant=None the SimCLRModel defaults (ResNet-50 1x, no SK) apply.
    """
    unknown = sorted(set(fields) - _MODEL_FIELDS)
    if unknown:
        raise ValueError(f"unknown SimCLRModel field(s) {unknown}; valid: {sorted(_MODEL_FIELDS)}")
    kwargs: dict[str, Any] = get_variant(variant) if variant is not None else {}
    kwargs["num_classes"] = num_classes
    kwargs.update(fields)
    return SimCLRModel(**kwargs)
