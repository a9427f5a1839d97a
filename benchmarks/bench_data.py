"""Input pipeline at scale: host memory and start-up against dataset size, and read throughput.

    # memory / start-up of a pretraining run's input pipeline on generated 32-px datasets
    python benchmarks/bench_data.py scale --sizes 10000,100000,1000000 \\
        --data_dir /tmp/bench_scale --out benchmarks/results/bench_data_scale.json
    # throughput at 224 px on real X-rays (the shared NIH set, upscaled to 256-px JPEGs)
    python benchmarks/bench_data.py throughput --nih ../shared/data/nih_cxr_1000 \\
        --out benchmarks/results/bench_data_throughput.json

`scale` prepares one generated dataset per size (timed once: preparation, not start-up), then
measures each in a FRESH process: start-up (`load_store` + first batch), peak resident memory
above the imports, and the O(cases) metadata it holds (`CaseStore.nbytes` + the schedule), as
bytes per case. `throughput` times the pretraining pipeline (2 x 224-px SimCLR views, uint8)
with the colour stage on the host and on the device, and reports the host cores needed to
feed one accelerator at `--demand` images/s.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import types

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402

from medssl_jax import augment, datasets, input_pipeline  # noqa: E402
from medssl_jax.methods.base import Crops, Views  # noqa: E402

SIZES = (1_000, 10_000, 100_000, 1_000_000)
POOL = 256  # distinct encoded images cycled through (generation cost is not what we measure)


class BenchSynthetic(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """N cases of one 32-px PNG each (two cases per patient), split 'train' only."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=f"n{n}") for n in SIZES]

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "case_id": tfds.features.Text(),
                    "patient_id": tfds.features.Text(),
                    "images": tfds.features.Sequence(tfds.features.Image(shape=(32, 32, 3))),
                    "image_ids": tfds.features.Sequence(tfds.features.Text()),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(int(self.builder_config.name[1:]))}

    def _generate_examples(self, n: int):
        rng = np.random.default_rng(0)
        pool = [
            tf.io.encode_png(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).numpy()
            for _ in range(POOL)
        ]
        for i in range(n):
            case = f"c{i:07d}"
            yield (
                case,
                {
                    "case_id": case,
                    "patient_id": f"p{i // 2:07d}",
                    "images": [pool[i % POOL]],
                    "image_ids": [f"{case}_0"],
                },
            )


def _register() -> None:
    module = types.ModuleType("data_builders.bench_synthetic")
    module.BenchSynthetic = BenchSynthetic
    sys.modules["data_builders.bench_synthetic"] = module


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    """VmHWM (reset by `_reset_peak`), else the process's lifetime maximum."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _trim() -> None:
    """Returns freed heap pages to the OS (glibc), so RSS deltas show what is still held."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak() -> bool:
    try:  # makes ru_maxrss restart from the current RSS (Linux)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ----------------------------------------------------------------------------- scale


def scale_worker(n: int, data_dir: str, batch: int, steps: int) -> dict:
    """One fresh process: start-up, peak RSS and metadata of a pretraining pipeline on n cases."""
    _register()
    views = Views(Crops(2, 32, (0.08, 1.0)))
    # Warm the libraries on a tiny graph so their one-off allocations are not counted.
    tf.constant(0).numpy()
    base = _rss_bytes()
    exact_peak = _reset_peak()
    start, start_cpu = time.perf_counter(), time.process_time()
    store = input_pipeline.load_store(
        {"name": f"bench_synthetic/n{n}", "data_dir": data_dir}, "train"
    )
    loaded = time.perf_counter()
    # Open the ArrayRecord readers (reads across every shard), as the first batch would anyway.
    # They keep an offset index per record: O(cases) metadata that is not ours (TFDS writes
    # group_size 1). reader_index_bytes: its RSS once freed buffers are returned (malloc_trim).
    _trim()
    before_readers = _rss_bytes()
    t = time.perf_counter()
    store.read([(int(c), 0) for c in np.linspace(0, store.num_cases - 1, 64).astype(int)])
    reader_open_s = time.perf_counter() - t
    _trim()
    reader_bytes = _rss_bytes() - before_readers
    ds, sched = input_pipeline.pretrain_dataset(
        store, batch_size=batch, views=views, aug=augment.recipe("simclr"), seed=0
    )
    it = ds.as_numpy_iterator()
    next(it)
    first, first_cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        next(it)
    done = time.perf_counter()
    del it, ds  # stop the reader thread now: at interpreter exit it may abort
    gc.collect()
    # The index is memory-mapped: pages become resident as they are touched. Touch them all,
    # as a long run eventually does, so the peak below is the worst case.
    arrays = [a for a in vars(store).values() if isinstance(a, np.ndarray)]
    mapped = sum(a.nbytes for a in arrays if isinstance(a, np.memmap))
    for a in arrays:
        int(a.reshape(-1).view(np.uint8)[:: os.sysconf("SC_PAGE_SIZE")].sum())
    # O(cases) metadata: the store and the schedule's cached epochs (it indexes image rows).
    schedule_bytes = sum(a.nbytes for a in sched._epoch_cache.values())
    return {
        "cases": store.num_cases,
        "load_store_s": loaded - start,
        "startup_s": first - start,  # load_store + first batch
        "startup_cpu_s": first_cpu - start_cpu,  # all threads: less sensitive to other load
        "images_per_s": steps * batch * 2 / (done - first),
        # (without a reset the lifetime peak: an upper bound)
        "peak_rss_above_base_bytes": _peak_rss_bytes() - base,
        "peak_is_exact": exact_peak,
        "rss_after_bytes": _rss_bytes() - base,
        "metadata_bytes": store.nbytes() + schedule_bytes,
        "metadata_bytes_per_case": (store.nbytes() + schedule_bytes) / store.num_cases,
        "metadata_mapped_bytes": mapped,  # of which shared by a host's processes (page cache)
        "reader_index_bytes": reader_bytes,
        "reader_open_s": reader_open_s,
    }


def run_scale(sizes: list[int], data_dir: str, batch: int, steps: int, repeats: int) -> dict:
    _register()
    rows = []
    for n in sizes:
        builder = datasets.make_builder(f"bench_synthetic/n{n}", data_dir)
        start = time.perf_counter()
        fresh = not builder.is_prepared()
        datasets.load(f"bench_synthetic/n{n}", "train", data_dir=data_dir)  # prepare + index
        prepare_s = time.perf_counter() - start if fresh else None
        runs = []
        for _ in range(repeats):  # the least disturbed of `repeats` fresh processes
            cmd = [sys.executable, os.path.abspath(__file__), "_scale_worker"]
            cmd += [str(n), data_dir, str(batch), str(steps)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            runs.append(json.loads(out.stdout.splitlines()[-1]))
        best = min(runs, key=lambda r: r["startup_s"])
        for key in ("peak_rss_above_base_bytes", "rss_after_bytes", "reader_index_bytes"):
            best[key] = min(r[key] for r in runs)
        best["startup_s_all"] = [r["startup_s"] for r in runs]
        best["startup_cpu_s"] = min(r["startup_cpu_s"] for r in runs)
        best["reader_open_s"] = min(r["reader_open_s"] for r in runs)
        row = {"n": n, "prepare_and_index_s": prepare_s, **best}
        rows.append(row)
        print(json.dumps(row), flush=True)
    small, big = rows[0], rows[-1]
    summary = {}
    if len(rows) > 1:

        def growth(key: str) -> float | None:
            if small[key] is None or big[key] is None:
                return None
            return big[key] / small[key] - 1.0

        def without_meta(r: dict, key: str) -> float:
            return r[key] - r["metadata_bytes"]

        # the ArrayRecord readers' per-record offsets, per case (growth of reader_index_bytes)
        reader_per_case = (big["reader_index_bytes"] - small["reader_index_bytes"]) / (
            big["n"] - small["n"]
        )

        def without_all(r: dict, key: str) -> float:
            return without_meta(r, key) - reader_per_case * r["n"]

        # start-up without reading O(cases) metadata (our index, the readers' offsets)
        load = {r["n"]: r["startup_s"] - r["load_store_s"] - r["reader_open_s"] for r in rows}
        summary = {
            "from_to": [small["n"], big["n"]],
            "startup_growth": growth("startup_s"),
            "startup_cpu_growth": growth("startup_cpu_s"),
            "startup_minus_index_and_reader_open_growth": load[big["n"]] / load[small["n"]] - 1,
            "peak_rss_growth": growth("peak_rss_above_base_bytes"),
            "metadata_bytes_per_case": big["metadata_bytes_per_case"],
            # everything but our metadata: libraries, tf.data buffers, the ArrayRecord readers
            "peak_rss_minus_metadata_growth": without_meta(big, "peak_rss_above_base_bytes")
            / without_meta(small, "peak_rss_above_base_bytes")
            - 1,
            "rss_after_minus_metadata_growth": without_meta(big, "rss_after_bytes")
            / without_meta(small, "rss_after_bytes")
            - 1,
            "reader_index_bytes_per_case": reader_per_case,
            "peak_rss_minus_metadata_and_reader_index_growth": without_all(
                big, "peak_rss_above_base_bytes"
            )
            / without_all(small, "peak_rss_above_base_bytes")
            - 1,
            "rss_bytes_per_extra_case": (
                big["peak_rss_above_base_bytes"] - small["peak_rss_above_base_bytes"]
            )
            / (big["n"] - small["n"]),
        }
    return {"rows": rows, "summary": summary}


# ----------------------------------------------------------------------------- throughput


def _nih_jpegs(nih: str, root: str, size: int) -> int:
    """The shared NIH X-rays (64 px) upscaled (bicubic) to size px JPEGs: root/<patient>/x.jpg."""
    n = 0
    for dirpath, _, files in os.walk(nih):
        for name in sorted(files):
            if not name.endswith(".png"):
                continue
            img = tf.io.decode_png(tf.io.read_file(os.path.join(dirpath, name)), channels=3)
            big = tf.image.resize(img, (size, size), method="bicubic")
            big = tf.cast(tf.clip_by_value(tf.round(big), 0, 255), tf.uint8)
            patient = name.split("_")[0]
            os.makedirs(os.path.join(root, patient), exist_ok=True)
            split = os.path.basename(os.path.dirname(dirpath))
            path = os.path.join(root, patient, f"{split}_{name[:-4]}.jpg")
            tf.io.write_file(path, tf.io.encode_jpeg(big, quality=95))
            n += 1
    return n


def _rate(it, batch: int, per_example: int, steps: int) -> float:
    next(it)  # warm-up (tracing, file cache)
    start = time.perf_counter()
    for _ in range(steps):
        next(it)
    return steps * batch * per_example / (time.perf_counter() - start)


def run_throughput(
    nih: str, data_dir: str, size: int, batch: int, steps: int, demand: float
) -> dict:
    manual = os.path.join(data_dir, "nih_jpeg")
    if not os.path.isdir(manual):
        _nih_jpegs(nih, manual, size + size // 7)  # 256 px for 224-px crops
    data = {"name": "image_folder_unlabeled", "data_dir": data_dir, "manual_dir": manual}
    store = input_pipeline.load_store(data, "train")
    # Raw random reads of encoded records (no decoding).
    order = np.random.default_rng(0).permutation(store.num_images)
    pairs = list(zip(*(a.tolist() for a in store.locate(order)), strict=True))
    start = time.perf_counter()
    nbytes = sum(len(b) for k in range(0, len(pairs), 256) for b in store.read(pairs[k : k + 256]))
    read_s = time.perf_counter() - start
    views = Views(Crops(2, size, (0.08, 1.0)))
    out = {
        "images": store.num_images,
        "mean_jpeg_bytes": nbytes / len(pairs),
        "random_read_images_per_s": len(pairs) / read_s,
        "random_read_mb_per_s": nbytes / read_s / 2**20,
        "cores": os.cpu_count(),
        "demand_images_per_s": demand,
    }
    for on_device in (False, True):
        ds, _ = input_pipeline.pretrain_dataset(
            store,
            batch_size=batch,
            views=views,
            aug=augment.recipe("simclr"),
            seed=0,
            color_on_device=on_device,
        )
        rate = _rate(ds.as_numpy_iterator(), batch, 2, steps)
        key = "colour_on_device" if on_device else "colour_on_host"
        out[f"pipeline_images_per_s_{key}"] = rate
        out[f"cores_per_accelerator_{key}"] = demand / (rate / os.cpu_count())
    return out


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_scale_worker":
        n, data_dir, batch, steps = int(argv[1]), argv[2], int(argv[3]), int(argv[4])
        result = scale_worker(n, data_dir, batch, steps)
        print(json.dumps(result))
        return result
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("scale")
    s.add_argument("--sizes", default="10000,100000,1000000")
    s.add_argument("--batch", type=int, default=256)
    s.add_argument("--steps", type=int, default=20)
    s.add_argument("--repeats", type=int, default=3, help="fresh processes per size (best kept)")
    t = sub.add_parser("throughput")
    t.add_argument("--nih", default="../shared/data/nih_cxr_1000")
    t.add_argument("--size", type=int, default=224)
    t.add_argument("--batch", type=int, default=64)
    t.add_argument("--steps", type=int, default=10)
    t.add_argument(
        "--demand",
        type=float,
        default=2500.0,
        help="images/s one accelerator's train step consumes (assumed, e.g. a ResNet-50 "
        "SimCLR step in bfloat16 on one current GPU; measure yours with bench_train.py)",
    )
    for q in (s, t):
        q.add_argument("--data_dir", default=None, help="default: a temporary directory")
        q.add_argument("--out", default=None)
    args = p.parse_args(argv)
    tmp = None if args.data_dir else tempfile.mkdtemp(prefix="bench_data_")
    data_dir = args.data_dir or tmp
    try:
        if args.mode == "scale":
            sizes = sorted(int(x) for x in args.sizes.split(","))
            bad = [n for n in sizes if n not in SIZES]
            if bad:
                p.error(f"--sizes: {bad} not among the generated sizes {SIZES}")
            result = run_scale(sizes, data_dir, args.batch, args.steps, args.repeats)
        else:
            if not os.path.isdir(args.nih):
                p.error(f"--nih: {args.nih!r} is not a directory")
            result = run_throughput(
                args.nih, data_dir, args.size, args.batch, args.steps, args.demand
            )
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    result = {"mode": args.mode, "cpu_count": os.cpu_count(), **result}
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
