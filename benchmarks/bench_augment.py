"""Throughput of ``augment.pretrain_view`` through tf.data (parallel map + batch) on this host.

Measures augmented images/sec for each requested output size on synthetic uint8 inputs of a
given size, so the input pipeline can be sized against accelerator step time. Example:

    python benchmarks/bench_augment.py --image-size 224 448 --input-size 320x390 \
        --recipe simclr --num-images 512 --out /tmp/bench_augment.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np
import tensorflow as tf

try:
    from medssl_jax import augment
except ImportError:  # run as a script from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from medssl_jax import augment


def _parse_hw(text: str) -> tuple[int, int]:
    """Parses 'HxW' (or a single 'N' for a square) into (H, W)."""
    parts = text.lower().split("x")
    try:
        hw = (int(parts[0]), int(parts[-1]))
    except ValueError as err:
        raise argparse.ArgumentTypeError(
            f"--input-size must look like 320x390, got {text!r}"
        ) from err
    if len(parts) > 2 or min(hw) <= 0:
        raise argparse.ArgumentTypeError(f"--input-size must look like 320x390, got {text!r}")
    return hw


def build_dataset(
    images: np.ndarray,
    *,
    image_size: int,
    recipe: str,
    batch_size: int,
    views: int,
    threads: int,
) -> tf.data.Dataset:
    """Infinite dataset of ``[batch, views, S, S, 3]`` augmented batches from ``images``."""
    kwargs = augment.recipe(recipe)
    pool = tf.data.Dataset.from_tensor_slices(images).repeat().enumerate()

    def _views(i: tf.Tensor, image: tf.Tensor) -> tf.Tensor:
        seeds = tf.random.experimental.stateless_split(
            tf.stack([tf.constant(0, tf.int64), i]), views
        )
        return tf.stack(
            [
                augment.pretrain_view(image, seeds[v], image_size=image_size, **kwargs)
                for v in range(views)
            ]
        )

    ds = pool.map(_views, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(batch_size, drop_remainder=True).prefetch(2)
    options = tf.data.Options()
    options.threading.private_threadpool_size = threads
    return ds.with_options(options)


def measure(ds: tf.data.Dataset, *, num_batches: int, warmup_batches: int) -> float:
    """Seconds to pull ``num_batches`` batches after ``warmup_batches`` (graph tracing, fill)."""
    it = iter(ds)
    for _ in range(warmup_batches):
        next(it)
    start = time.perf_counter()
    for _ in range(num_batches):
        next(it)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--image-size", type=int, nargs="+", default=[224], help="output side(s)")
    p.add_argument("--input-size", type=_parse_hw, default=(320, 390), help="HxW of inputs")
    p.add_argument("--recipe", default="simclr", help="augment.recipe name: simclr | chexpert")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch")
    p.add_argument("--views", type=int, default=2, help="augmented views per image (SimCLR: 2)")
    p.add_argument("--num-images", type=int, default=512, help="images timed per size")
    p.add_argument("--warmup-batches", type=int, default=2)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="tf.data threads")
    p.add_argument("--out", default=None, help="write results as JSON here")
    args = p.parse_args(argv)
    augment.recipe(args.recipe)  # fail early on a bad name
    if args.batch_size <= 0 or args.views <= 0 or args.num_images < args.batch_size:
        p.error("need batch-size > 0, views > 0 and num-images >= batch-size")

    h, w = args.input_size
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (32, h, w, 3), dtype=np.uint8)  # distinct inputs, reused
    num_batches = args.num_images // args.batch_size
    rows = []
    for size in args.image_size:
        ds = build_dataset(
            images,
            image_size=size,
            recipe=args.recipe,
            batch_size=args.batch_size,
            views=args.views,
            threads=args.threads,
        )
        secs = measure(ds, num_batches=num_batches, warmup_batches=args.warmup_batches)
        n_views = num_batches * args.batch_size * args.views
        rows.append(
            dict(
                image_size=size,
                input_size=f"{h}x{w}",
                augmented_images_per_sec=n_views / secs,
                augmented_images_per_sec_per_thread=n_views / secs / args.threads,
                seconds=secs,
                augmented_images_timed=n_views,
            )
        )

    print(f"pretrain_view recipe={args.recipe} threads={args.threads} batch={args.batch_size}")
    print(
        f"{'out size':>8} {'input':>10} {'aug img/s':>10} {'aug img/s/thread':>17} {'seconds':>8}"
    )
    for r in rows:
        print(
            f"{r['image_size']:>8} {r['input_size']:>10} {r['augmented_images_per_sec']:>10.1f} "
            f"{r['augmented_images_per_sec_per_thread']:>17.1f} {r['seconds']:>8.2f}"
        )
    result = dict(
        benchmark="augment.pretrain_view",
        recipe=args.recipe,
        batch_size=args.batch_size,
        views=args.views,
        threads=args.threads,
        host=platform.node(),
        cpu_count=os.cpu_count(),
        tensorflow=tf.__version__,
        results=rows,
    )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
