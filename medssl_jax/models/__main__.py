"""CLI: `python -m medssl_jax.models VARIANT [--image_size N] [--num_classes K] [--json]`.

Prints parameter counts and forward GFLOPs of a named variant, computed from shapes only.
"""

from __future__ import annotations

import argparse
import json
import sys

from medssl_jax.models.stats import model_stats
from medssl_jax.models.variants import get_variant


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, print the statistics table (or JSON); return the exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m medssl_jax.models",
        description="Parameter counts and FLOPs of a SimCLR ResNet variant (no weights allocated).",
    )
    parser.add_argument("variant", help="e.g. r50_1x_sk0, r152_3x_sk1, r18_0.125x_sk0, tiny")
    parser.add_argument("--image_size", type=_positive_int, default=224)
    parser.add_argument("--num_classes", type=_non_negative_int, default=0)
    parser.add_argument("--num_proj_layers", type=_non_negative_int, default=2)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    try:
        get_variant(args.variant)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    stats = model_stats(args.variant, args.image_size, args.num_classes, args.num_proj_layers)
    if args.json:
        print(json.dumps(stats))
        return 0
    rows = [
        ("variant", stats["variant"]),
        ("image size", f"{stats['image_size']} px"),
        ("feature dim", f"{stats['feature_dim']}"),
        (
            "backbone params",
            f"{stats['backbone_params']:,} ({stats['backbone_params'] / 1e6:.1f}M)",
        ),
        ("head params", f"{stats['head_params']:,} ({stats['head_params'] / 1e6:.2f}M)"),
        (
            "  (proj layers, classes)",
            f"{stats['num_proj_layers']}, {stats['num_classes']}",
        ),
        ("forward GFLOPs / image", f"{stats['gflops']:.2f} (XLA count, 2 per multiply-add)"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
