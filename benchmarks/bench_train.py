"""Benchmark the full pretraining step (`pretrain.build`): compile time, step time, images/sec.

The step is exactly what `main.py` runs (SimCLR/MICLe forward+backward over both views, global
NT-Xent, LARS update, sharded over a Mesh('data') of all visible devices; respects XLA_FLAGS),
fed with synthetic batches, so no dataset is needed. Compilation (lower + compile on the
abstract shapes) is timed separately from execution. With --pipeline, the input pipeline's
augmented images/sec on the demo data is measured too (no training), and compared with the
step's images/sec (ratio > 1: the input keeps up). Two views per example count as 2 images.

  python benchmarks/bench_train.py --config=configs/simclr.py:demo --variant r50_1x_sk0 \
      --image_size 64 --batch_size 32 --dtype float32 --steps 5 --warmup 1 --out r50.json
  python benchmarks/bench_train.py --config=configs/micle.py:demo --variant tiny,r50_1x_sk0 \
      --image_size 32,64 --pipeline                      # a sweep: every variant x size
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import itertools
import os
import platform
import sys
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_memory  # noqa: E402
from bench_table import print_table  # noqa: E402

from medssl_jax import config_lib, pretrain, sharding  # noqa: E402
from medssl_jax.models import count_params, get_variant, pooling, resnet  # noqa: E402
from medssl_jax.peak import step_peak  # noqa: E402


def load_config(spec: str) -> ml_collections.ConfigDict:
    """`path/to/config.py[:variants]` -> the file's get_config(variants), as main.py reads it."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path) and os.path.isfile(os.path.join(ROOT, path)):
        path = os.path.join(ROOT, path)  # relative to the repository, from anywhere
    if not os.path.isfile(path):
        raise SystemExit(f"--config: file {path!r} does not exist")
    module_spec = importlib.util.spec_from_file_location("bench_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise SystemExit(f"--config: {path!r} has no get_config()")
    try:
        return module.get_config(arg or None)
    except ValueError as e:
        raise SystemExit(f"--config {spec!r}: {e}") from None


def apply_override(config: ml_collections.ConfigDict, text: str) -> None:
    """`a.b=value` (value as a Python literal, else a string) -> config.a.b = value."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise SystemExit(f"--set {text!r}: expected key=value, e.g. model.num_proj_layers=3")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    node = config
    for part in key.split(".")[:-1]:
        if part not in node:
            raise SystemExit(f"--set {text!r}: config has no field {part!r}")
        node = node[part]
    last = key.split(".")[-1]
    if last not in node:
        raise SystemExit(f"--set {text!r}: config has no field {key!r}")
    node[last] = value


def _architecture(name: str) -> str:
    """Accepts model variant names (r50_1x_sk0, tiny) and the configs' aliases (r50_1x)."""
    configs_dir = os.path.join(ROOT, "configs")
    if configs_dir not in sys.path:
        sys.path.insert(0, configs_dir)
    import common

    name = common.ARCHITECTURES.get(name, name)
    get_variant(name)  # raises ValueError naming the valid forms
    return name


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        msg = f"expected comma-separated integers, got {text!r}"
        raise argparse.ArgumentTypeError(msg) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; lists (a,b) of variants, sizes, batches, dtypes make a sweep."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/simclr.py:demo", help="config file[:variants]")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override, e.g. --set loss.temperature=0.5 (repeatable)",
    )
    p.add_argument(
        "--suite",
        default="",
        choices=["", "paper"],
        help="paper: SimCLR and MICLe steps of R50-1x, R50-4x and R152-2x at 224 px in bfloat16 "
        "(--variant/--image_size/--dtype/--batch_size still override; with --fit)",
    )
    p.add_argument(
        "--fit",
        action="store_true",
        help="halve the batch until the step fits the device memory (compile-time buffer "
        "assignment against the device's bytes_limit, or out of memory at run time)",
    )
    p.add_argument("--variant", default="", help="model variant(s); default: the config's")
    p.add_argument("--image_size", type=_int_list, default=None, help="default: the config's")
    p.add_argument("--batch_size", type=_int_list, default=None, help="global; default: config")
    p.add_argument("--dtype", default="", help="float32|bfloat16 (list ok); default: config")
    p.add_argument(
        "--num_classes",
        type=int,
        default=0,
        help="> 0: include the online linear probe with this many classes",
    )
    p.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
    p.add_argument(
        "--pipeline",
        action="store_true",
        help="also time the input pipeline (augmented images/s) on the config's data",
    )
    p.add_argument("--pipeline_batches", type=int, default=10, help="timed pipeline batches")
    p.add_argument(
        "--conv1x1",
        default="auto",
        help="1x1 convolutions as a dot or as XLA convs: auto|dot|conv (list ok: dot,conv "
        "benchmarks both; sets MEDSSL_CONV1X1, see models/resnet.py)",
    )
    p.add_argument("--out", default="", help="write the results here as JSON")
    args = p.parse_args(argv)
    args.conv1x1_modes = [m.strip() for m in args.conv1x1.split(",") if m.strip()]
    if not args.conv1x1_modes or set(args.conv1x1_modes) - {"auto", "dot", "conv"}:
        p.error(f"--conv1x1: {args.conv1x1!r}: expected auto, dot, conv or a list of them")
    if args.steps < 1 or args.warmup < 0 or args.pipeline_batches < 1 or args.num_classes < 0:
        p.error("--steps and --pipeline_batches must be >= 1, --warmup/--num_classes >= 0")
    specs = [args.config]
    if args.suite == "paper":
        specs = [os.path.join(ROOT, "configs", f) for f in ("simclr.py", "micle.py")]
        args.variant = args.variant or "r50_1x,r50_4x,r152_2x"
        args.image_size = args.image_size or [224]
        args.dtype = args.dtype or "bfloat16"
        args.batch_size = args.batch_size or [256]  # global; --fit halves it where needed
    args.config_dicts = []
    for spec in specs:
        c = load_config(spec)
        for text in args.set:
            apply_override(c, text)
        args.config_dicts.append(c)
    config = args.config_dicts[0]
    try:
        variants = [_architecture(v) for v in args.variant.split(",") if v.strip()]
    except ValueError as e:
        p.error(f"--variant: {e}")
    dtypes = [d for d in args.dtype.split(",") if d.strip()]
    bad = [d for d in dtypes if d not in config_lib.DTYPES]
    if bad:
        p.error(f"--dtype: {bad} not in {tuple(config_lib.DTYPES)}")
    args.config_dict = config
    args.variants = variants or [config.model.variant]
    args.image_sizes = args.image_size or [int(config.data.image_size)]
    args.batch_sizes = args.batch_size or [int(config.batch_size)]
    args.dtypes = dtypes or [config.model.dtype]
    return args


def sweep_configs(args: argparse.Namespace) -> list[ml_collections.ConfigDict]:
    """One config per (variant, image size, batch size, dtype), validated before any compile."""
    mesh_size = jax.device_count()
    out = []
    for base, variant, size, batch, dtype in itertools.product(
        args.config_dicts, args.variants, args.image_sizes, args.batch_sizes, args.dtypes
    ):
        c = ml_collections.ConfigDict(base.to_dict())
        c.model.variant, c.data.image_size, c.batch_size, c.model.dtype = (
            variant,
            size,
            batch,
            dtype,
        )
        if batch % mesh_size:
            raise SystemExit(
                f"--batch_size {batch} must be a multiple of the number of devices ({mesh_size}; "
                f"set XLA_FLAGS=--xla_force_host_platform_device_count=N to change it on CPU)"
            )
        try:
            config_lib.validate(c)
        except config_lib.ConfigError as e:
            raise SystemExit(f"invalid benchmark config: {e}") from None
        out.append(c)
    return out


def synthetic_batch(
    abstract_batch: dict[str, jax.ShapeDtypeStruct], seed: int, num_classes: int = 0
) -> dict:
    """Random global arrays with the step's batch shapes and shardings (distinct patients;
    labels in [0, num_classes) for the probe, or -1 = unlabeled when there is none)."""
    rng = np.random.default_rng(seed)
    batch = {}
    for k, a in abstract_batch.items():
        if k in ("views", "local_views", "image"):
            x = rng.integers(0, 256, size=a.shape).astype(a.dtype)
        elif k == "color_params":
            x = np.zeros(a.shape, a.dtype)  # flags 0; the device computes every op anyway
        elif k == "patient_key":
            x = np.arange(a.shape[0], dtype=a.dtype)
        elif k == "label" and a.ndim == 1 and num_classes > 0:
            x = rng.integers(0, num_classes, size=a.shape).astype(a.dtype)
        elif k == "label":
            x = np.zeros(a.shape, a.dtype) if a.ndim > 1 else np.full(a.shape, -1, a.dtype)
        elif k == "label_mask":
            x = np.ones(a.shape, a.dtype)
        else:  # 'distinct'
            x = np.zeros(a.shape, a.dtype)
        batch[k] = jax.device_put(x, a.sharding)
    return batch


def _flops(stage: Any) -> float:
    """FLOPs from XLA's cost analysis of `stage`: a Lowered counts the global step, a Compiled
    one device's share; 0 where the backend has none."""
    try:
        cost = stage.cost_analysis()
    except Exception:  # not every backend implements it
        return 0.0
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return float((cost or {}).get("flops", 0.0))


def bench_step(config: ml_collections.ConfigDict, args: argparse.Namespace) -> dict[str, Any]:
    """Builds, compiles (timed apart) and times the pretraining step of `config`."""
    mesh = sharding.make_mesh()
    devices = list(mesh.devices.flat)
    local = [d for d in devices if d.process_index == jax.process_index()]
    label_kind = "multiclass" if args.num_classes > 0 else "none"
    total = int(config.num_steps) if int(config.num_steps) > 0 else 100_000
    warmup_steps = min(max(int(config.optim.warmup_steps), 0), total)
    rss0 = bench_memory.host_rss_now()
    bench_memory.reset_host_peak()

    built = pretrain.build(
        config,
        mesh,
        num_classes=args.num_classes,
        label_kind=label_kind,
        total_steps=total,
        warmup_steps=warmup_steps,
    )
    t0 = time.perf_counter()
    lowered = built.step.lower(built.abstract_state, built.abstract_batch)
    lower_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    compile_host_peak = max(bench_memory.host_peak_bytes() - rss0, 0)
    compiled_bytes = bench_memory.check_fits(
        compiled, local
    )  # DoesNotFit before any device allocation
    # Execution memory apart from the compiler's: restart the high-water mark from here.
    rss0 = bench_memory.host_rss_now()
    can_reset = bench_memory.reset_host_peak()

    # RBG keys: threefry initialisers compile slowly on XLA:CPU; the values do not matter here.
    t0 = time.perf_counter()
    state = jax.block_until_ready(built.init(jax.random.key(int(config.seed), impl="rbg")))
    init_s = time.perf_counter() - t0
    params = count_params(state.params)
    backbone_params = count_params(state.params.get("backbone", {}))
    batch = synthetic_batch(built.abstract_batch, int(config.seed), args.num_classes)

    for _ in range(args.warmup):
        state, metrics = jax.block_until_ready(compiled(state, batch))
    times, cpu_times = [], []
    for _ in range(args.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        state, metrics = jax.block_until_ready(compiled(state, batch))
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    loss = float(jax.device_get(metrics["loss"]))
    if not np.isfinite(loss):
        raise RuntimeError(f"non-finite loss {loss} for {config.model.variant}")

    dev_peaks = bench_memory.device_peak_bytes(local)
    if dev_peaks is not None:
        peak, source = (
            max(dev_peaks),
            "device peak_bytes_in_use since process start (max over local devices)",
        )
    else:
        peak = max(bench_memory.host_peak_bytes() - rss0, 0)
        source = "host RSS high-water mark increase over init+steps" + (
            "" if can_reset else " (peak not resettable: includes earlier work)"
        )
    median = float(np.median(times))
    global_batch = int(config.batch_size)
    from medssl_jax import methods

    views = methods.get(config.method).views(config)
    images_per_s = global_batch * views.images_per_example / median  # all crops, any size
    # MFU counts the model's FLOPs in the step as traced (the lowered HLO): the compiled GPU
    # program hands convolutions to cuDNN custom calls, which XLA's compiled cost analysis
    # does not count (it reported 0.3% MFU for an R50 step at 16%); on CPU the two agree to 1%.
    # The lowered HLO is the global step (the whole batch, before SPMD partitioning); the
    # compiled program is one device's share, so only its count scales with the devices.
    compiled_flops = _flops(compiled) * len(devices)
    flops = _flops(lowered) or compiled_flops
    del state, batch, compiled, lowered
    peak_flops, peak_source = step_peak(devices[0], len(devices), str(config.model.dtype))
    achieved = flops / median
    return dict(
        method=config.method,
        label=pretrain.method_label(config),  # 'micle' for SimCLR with multi-instance pairs
        variant=config.model.variant,
        image_size=int(config.data.image_size),
        batch_size=global_batch,
        dtype=config.model.dtype,
        num_devices=len(devices),
        platform=devices[0].platform,
        device_kind=devices[0].device_kind,
        params=params,
        backbone_params=backbone_params,
        linear_probe_classes=args.num_classes,
        lower_s=lower_s,
        compile_s=compile_s,
        compile_total_s=lower_s + compile_s,
        init_s=init_s,
        steps=args.steps,
        warmup=args.warmup,
        step_s_median=median,
        step_s_min=float(np.min(times)),
        step_s_all=[float(t) for t in times],
        # Host CPU seconds of this process per step (all threads): on a shared CPU host,
        # cpu / cores approximates the step time the host would give with no other load.
        step_cpu_s_median=float(np.median(cpu_times)),
        images_per_s=images_per_s,
        images_per_example=views.images_per_example,  # crops per example (global + local)
        images_per_s_per_device=images_per_s / len(devices),
        step_gflop=flops / 1e9,  # the whole step, all devices
        compiled_step_gflop=compiled_flops / 1e9,  # as XLA counts it after fusion
        achieved_gflop_s=achieved / 1e9,
        # Model FLOPs utilisation: the compiled step's FLOPs per second against the peak of
        # the devices that ran it (peak_source says which figure).
        peak_gflop_s=peak_flops / 1e9,
        peak_source=peak_source,
        mfu=achieved / peak_flops,
        peak_memory_bytes=int(peak),
        peak_memory_source=source,
        compile_host_memory_bytes=int(compile_host_peak),
        compiled_bytes_per_device=compiled_bytes,
        final_loss=loss,
    )


def bench_fitting(config: ml_collections.ConfigDict, args: argparse.Namespace) -> dict[str, Any]:
    """`bench_step` at the config's batch, halved while the step does not fit the devices."""
    n = jax.device_count()
    tried = []
    while True:
        try:
            res = bench_step(config, args)
            res["batch_tried_and_too_big"] = tried
            return res
        except Exception as e:  # noqa: BLE001
            if not bench_memory.out_of_memory(e):
                raise
            tried.append(int(config.batch_size))
            half = int(config.batch_size) // 2 // n * n
            print(f"batch {config.batch_size} does not fit ({str(e)[:120]}); trying {half}")
            if half < n:
                raise SystemExit(f"{config.model.variant}: not even batch {n} fits") from None
            config = ml_collections.ConfigDict(config.to_dict())
            config.batch_size = half


def bench_pipeline(config: ml_collections.ConfigDict, store: Any, batches: int) -> dict[str, float]:
    """Augmented images/s of `input_pipeline.pretrain_dataset` on `store` (no training)."""
    from medssl_jax import input_pipeline, methods

    views = methods.get(config.method).views(config)
    ds, _ = input_pipeline.pretrain_dataset(
        store,
        batch_size=int(config.batch_size) // jax.process_count(),
        views=views,
        aug=config_lib.augment_kwargs(config),
        seed=int(config.seed),
        **pretrain.sampler_options(config),
    )
    it = ds.as_numpy_iterator()
    for _ in range(2):  # tracing, thread pool start-up, autotuning
        next(it)
    t0 = time.perf_counter()
    n = 0
    for _ in range(batches):
        n += next(it)["views"].shape[0] * views.images_per_example
    seconds = time.perf_counter() - t0
    return dict(pipeline_images_per_s=n / seconds, pipeline_batches=batches)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Benchmarks every sweep entry; returns {'environment': ..., 'results': [...]}."""
    configs = sweep_configs(args)
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None  # other work?
    store = None
    if args.pipeline:
        from medssl_jax import input_pipeline

        data = args.config_dict.data
        store = input_pipeline.load_store(
            data,
            data.split,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
    results = []
    for mode, c in itertools.product(args.conv1x1_modes, configs):
        os.environ["MEDSSL_CONV1X1"] = mode  # read when the step is traced
        res = bench_fitting(c, args) if args.fit else bench_step(c, args)
        res["conv1x1"] = mode
        res["conv1x1_as_dot"] = resnet.conv1x1_as_dot()
        res["maxpool_grad"] = "mask" if pooling.mask_max_pool_grad() else "xla"  # models/pooling
        if store is not None:
            res.update(bench_pipeline(c, store, args.pipeline_batches))
            res["pipeline_dataset"] = f"{store.spec.name}/{store.spec.split}"
            res["pipeline_to_train_ratio"] = res["pipeline_images_per_s"] / res["images_per_s"]
        results.append(res)
    environment = dict(
        config=args.config,
        overrides=list(args.set),
        jax_version=jax.__version__,
        backend=jax.default_backend(),
        num_processes=jax.process_count(),
        cpu_count=os.cpu_count(),
        load_average_1m=load_before,
        xla_flags=os.environ.get("XLA_FLAGS", ""),
        compilation_cache_dir=jax.config.jax_compilation_cache_dir,
        machine=platform.machine(),
    )
    return {"environment": environment, "results": results}


def main(argv: list[str] | None = None) -> int:
    """Parses `argv`, benchmarks, prints a table and writes --out; returns the exit code."""
    args = parse_args(argv)
    report = run(args)
    print_table(report["results"])
    if args.out:
        from medssl_jax.loop import write_json

        write_json(os.path.abspath(args.out), report)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
