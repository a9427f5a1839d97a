r"""Convert a released checkpoint into one `--config.init_checkpoint` accepts in every stage.

  python -m medssl_jax.convert --source=r50_1x_sk0/model.ckpt-250228 \
      --format=simclr_v2_tf1 --variant=r50_1x_sk0 --out=/ckpt/simclrv2_r50_1x_sk0
  python -m medssl_jax.convert --source=dino_resnet50_pretrain.pth --format=torch_resnet \
      --variant=r50_1x_sk0 --out=/ckpt/dino_r50

Writes OUT/checkpoints/0/state and OUT/converted.json (source, format, variant, parts, input
normalisation). Every source array must be used exactly once and every model variable filled,
otherwise nothing is written and the error lists what did not match.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from medssl_jax.convert import common

# format -> module defining `convert(source, variant, **options) -> common.Converted`
FORMATS = {
    "simclr_v2_tf1": "medssl_jax.convert.tf_simclr",
    "simclr_v1_tf1": "medssl_jax.convert.tf_simclr",
    "simclr_v2_tf2": "medssl_jax.convert.tf_simclr",
    "torch_resnet": "medssl_jax.convert.torch_models",
    "dino_vit": "medssl_jax.convert.torch_models",
}


def convert(source: str, fmt: str, variant: str, **options) -> common.Converted:
    """Read `source` in format `fmt` into the variables of `variant`."""
    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {sorted(FORMATS)}, got {fmt!r}")
    module = importlib.import_module(FORMATS[fmt])
    # An option the format does not read would be silently ignored (--drop_heads keeping the
    # heads of a SimCLR file): refuse it, naming it, unless left at its default.
    given = {k: v for k, v in options.items() if v not in (None, False)}
    foreign = sorted(set(given) - set(module.OPTIONS))
    if foreign:
        raise ValueError(
            f"--{foreign[0]} does not apply to --format={fmt} (its options: "
            f"{', '.join('--' + o for o in module.OPTIONS)})"
        )
    return module.convert(source, variant, fmt=fmt, **given)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m medssl_jax.convert",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--source", required=True, help="checkpoint prefix, SavedModel dir or .pth")
    p.add_argument("--format", required=True, choices=sorted(FORMATS))
    p.add_argument("--variant", required=True, help="e.g. r50_1x_sk0, r152_3x_sk1, vit_s16")
    p.add_argument("--out", required=True, help="new folder for the converted checkpoint")
    p.add_argument("--ema", action="store_true", help="SimCLRv2 TF1: take the ema_model/ copy")
    p.add_argument(
        "--rescale_v1",
        action="store_true",
        help="SimCLRv1: scale conv kernels down to v2 size (BN statistics follow; same outputs)",
    )
    p.add_argument(
        "--checkpoint_key",
        default=None,
        help="PyTorch files holding several networks: which one (DINO: teacher (default), student)",
    )
    p.add_argument(
        "--drop_heads", action="store_true", help="PyTorch: keep the backbone (and fc) only"
    )
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        converted = convert(
            a.source,
            a.format,
            a.variant,
            ema=a.ema,
            rescale_v1=a.rescale_v1,
            checkpoint_key=a.checkpoint_key,
            drop_heads=a.drop_heads,
        )
        out = common.write(converted, a.out)
    except (common.ConversionError, FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    info = converted.info()
    print(
        f"wrote {out}: {info['variant']}, parts {info['parts']}, {info['num_params']:,} "
        f"parameters, input_norm={info['input_norm']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
