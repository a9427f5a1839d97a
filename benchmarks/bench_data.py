"""Data pipeline throughput: preparation (images/s while building a dataset) and reading (decoded
images/s through `load` + `to_images` + `decode_image`).

    python benchmarks/bench_data.py                       # demo, fresh temporary data_dir
    python benchmarks/bench_data.py --name ham10000 --manual_dir /data/ham --data_dir /tfds
    python benchmarks/bench_data.py --out bench_data.json

With --data_dir pointing at an already prepared dataset, preparation is not re-timed (reported
as null) unless --rebuild is given.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tensorflow as tf  # noqa: E402

from medssl_jax import datasets  # noqa: E402


def bench_prepare(name: str, data_dir: str, manual_dir: str | None, rebuild: bool) -> dict:
    """Builds `name` in `data_dir` (if needed) and times it; images counted over all splits."""
    builder = datasets.make_builder(name, data_dir)
    timed = rebuild or not builder.is_prepared()
    if rebuild and builder.is_prepared():
        shutil.rmtree(builder.data_dir)
        builder = datasets.make_builder(name, data_dir)
    start = time.perf_counter()
    datasets.prepare(builder, manual_dir, data_dir)
    seconds = time.perf_counter() - start
    splits = {}
    for split in builder.info.splits.keys():
        _, spec = datasets.load(name, split, data_dir=data_dir)
        splits[split] = {"cases": spec.num_cases, "images": spec.num_images}
    images = sum(s["images"] for s in splits.values())
    return {
        "splits": splits,
        "prepare_seconds": seconds if timed else None,
        "prepare_images_per_sec": images / seconds if timed else None,
    }


def bench_read(name: str, split: str, data_dir: str, epochs: int, batch: int) -> dict:
    """Decoded images/s of `split`, after one warm-up pass (file cache, tf.function tracing)."""
    ds, spec = datasets.load(name, split, data_dir=data_dir)
    images = datasets.to_images(ds).map(
        lambda e: datasets.decode_image(e["image"]), num_parallel_calls=tf.data.AUTOTUNE
    )
    # Images of different sizes cannot be batched densely: count pixels per element instead.
    images = images.map(lambda x: tf.cast(tf.size(x), tf.int64)).batch(batch)
    rates = []
    for epoch in range(epochs + 1):
        start = time.perf_counter()
        n = 0
        pixels = 0
        for sizes in images:
            n += int(sizes.shape[0])
            pixels += int(tf.reduce_sum(sizes))
        if epoch > 0:  # epoch 0 is warm-up
            rates.append(n / (time.perf_counter() - start))
    return {
        "split": split,
        "images": n,
        "mean_pixels": pixels / max(n, 1) / 3,
        "read_images_per_sec": max(rates) if rates else None,
        "read_images_per_sec_all": rates,
        "spec_num_images": spec.num_images,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="demo", help="dataset (builder) name, e.g. demo/small")
    parser.add_argument("--split", default="train", help="split to time reading on")
    parser.add_argument("--data_dir", default=None, help="default: a fresh temporary directory")
    parser.add_argument("--manual_dir", default=None, help="manual files of real data sets")
    parser.add_argument("--rebuild", action="store_true", help="re-time preparation")
    parser.add_argument("--epochs", type=int, default=3, help="timed read passes")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)

    tmp = None
    data_dir = args.data_dir
    if data_dir is None:
        tmp = tempfile.mkdtemp(prefix="bench_data_")
        data_dir = tmp
    try:
        result = {"name": args.name, "data_dir": data_dir, "cpu_count": os.cpu_count()}
        result.update(bench_prepare(args.name, data_dir, args.manual_dir, args.rebuild))
        result.update(bench_read(args.name, args.split, data_dir, args.epochs, args.batch))
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    rows = [
        ("dataset", args.name),
        ("cores", result["cpu_count"]),
        (
            "cases / images (all splits)",
            f"{sum(s['cases'] for s in result['splits'].values())} / "
            f"{sum(s['images'] for s in result['splits'].values())}",
        ),
        ("prepare time (s)", _fmt(result["prepare_seconds"])),
        ("prepare images/s", _fmt(result["prepare_images_per_sec"])),
        (f"read split '{args.split}' images", result["images"]),
        ("read decoded images/s (best pass)", _fmt(result["read_images_per_sec"])),
        ("mean pixels per image (HxW)", _fmt(result["mean_pixels"])),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.out}")
    return result


def _fmt(value: float | None) -> str:
    return "n/a (already prepared)" if value is None else f"{value:,.1f}"


if __name__ == "__main__":
    main()
