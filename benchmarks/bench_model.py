"""Benchmark a SimCLR model: compile time and images/sec of a forward+backward step.

The step is the model part of pretraining: train-mode forward (batch-stat BN, batch_stats
update), a scalar loss on the projections and gradients w.r.t. all parameters; no optimiser.
The batch is sharded over `--devices` devices on a 1-D Mesh('data') (jit + NamedSharding).

  python benchmarks/bench_model.py --variant r50_1x_sk0 --image_size 64 --batch_size 32 \
      --out /tmp/bench_r50.json
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from medssl_jax.models import count_params, create_model, get_variant


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", default="r50_1x_sk0")
    p.add_argument("--image_size", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--num_proj_layers", type=int, default=2)
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps after compilation")
    p.add_argument("--devices", type=int, default=0, help="devices to shard over (0 = all)")
    p.add_argument("--forward_only", action="store_true", help="time an eval forward instead")
    p.add_argument("--out", default="", help="write the results as JSON here")
    args = p.parse_args(argv)
    try:
        get_variant(args.variant)
    except ValueError as e:
        p.error(str(e))
    if args.image_size < 1 or args.batch_size < 1 or args.steps < 1 or args.warmup < 0:
        p.error("image_size, batch_size and steps must be >= 1, warmup >= 0")
    return args


def build_step(model: Any, forward_only: bool):
    """Jittable step: (variables, images) -> (loss, grads, new batch_stats) or eval outputs."""

    def train_step(variables, images):
        def loss_fn(params):
            out, updates = model.apply(
                {"params": params, "batch_stats": variables.get("batch_stats", {})},
                images,
                train=True,
                mutable=["batch_stats"],
            )
            return jnp.mean(jnp.square(out["projection"])), updates.get("batch_stats", {})

        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
        return loss, grads, stats

    def eval_step(variables, images):
        return model.apply(variables, images, train=False)["projection"]

    return eval_step if forward_only else train_step


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Compile and time the step; return a dict of results."""
    devices = jax.devices()[: args.devices or None]
    if args.batch_size % len(devices):
        raise SystemExit(f"batch_size {args.batch_size} not divisible by {len(devices)} devices")
    mesh = Mesh(np.array(devices), ("data",))
    model = create_model(args.variant, dtype=args.dtype, num_proj_layers=args.num_proj_layers)
    x = np.random.default_rng(0).random(
        (args.batch_size, args.image_size, args.image_size, 3), dtype=np.float32
    )
    images = jax.device_put(x, NamedSharding(mesh, PartitionSpec("data")))
    replicated = NamedSharding(mesh, PartitionSpec())
    # RBG keys: threefry-based initialisers compile very slowly on XLA:CPU.
    init = jax.jit(
        lambda x: model.init(jax.random.key(0, impl="rbg"), x, train=False),
        out_shardings=replicated,
    )
    t0 = time.perf_counter()
    variables = jax.block_until_ready(init(images))
    init_s = time.perf_counter() - t0

    step = jax.jit(build_step(model, args.forward_only))
    t0 = time.perf_counter()
    lowered = step.lower(variables, images)
    lower_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    flops = compiled.cost_analysis()
    flops = (flops[0] if isinstance(flops, list | tuple) else flops or {}).get("flops", 0.0)
    flops *= len(devices)  # SPMD executables report the per-device count

    for _ in range(args.warmup):
        jax.block_until_ready(compiled(variables, images))
    times, cpu_times = [], []
    for _ in range(args.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        jax.block_until_ready(compiled(variables, images))
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    median = float(np.median(times))
    cpu_median = float(np.median(cpu_times))
    return dict(
        variant=args.variant,
        mode="forward" if args.forward_only else "forward+backward",
        image_size=args.image_size,
        batch_size=args.batch_size,
        dtype=args.dtype,
        num_devices=len(devices),
        platform=devices[0].platform,
        device_kind=devices[0].device_kind,
        params=count_params(variables["params"]),
        init_s=init_s,
        lower_s=lower_s,
        compile_s=compile_s,
        step_s_median=median,
        step_s_min=float(np.min(times)),
        images_per_s=args.batch_size / median,
        # CPU-seconds per step (all threads): robust to other load on a shared CPU machine.
        cpu_s_median=cpu_median,
        images_per_cpu_s=args.batch_size / cpu_median if cpu_median > 0 else 0.0,
        step_gflop=flops / 1e9,
        achieved_gflop_s=flops / 1e9 / median if median > 0 else 0.0,
        jax_version=jax.__version__,
        cpu_count=os.cpu_count(),
        xla_flags=os.environ.get("XLA_FLAGS", ""),
        machine=platform.machine(),
    )


def print_table(res: dict[str, Any]) -> None:
    """Human-readable summary."""
    rows = [
        ("variant", f"{res['variant']} ({res['params'] / 1e6:.1f}M params)"),
        ("mode", res["mode"]),
        ("input", f"{res['batch_size']} x {res['image_size']}px, {res['dtype']}"),
        ("devices", f"{res['num_devices']} x {res['device_kind']}"),
        (
            "init / lower / compile",
            f"{res['init_s']:.1f} / {res['lower_s']:.1f} / {res['compile_s']:.1f} s",
        ),
        ("step (median, min)", f"{res['step_s_median']:.3f} s, {res['step_s_min']:.3f} s"),
        ("images / s", f"{res['images_per_s']:.1f}"),
        ("images / CPU-s", f"{res['images_per_cpu_s']:.2f} (step {res['cpu_s_median']:.2f} CPU-s)"),
        ("XLA GFLOP / step", f"{res['step_gflop']:.1f} ({res['achieved_gflop_s']:.1f} GFLOP/s)"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    res = run(args)
    print_table(res)
    if args.out:
        from medssl_jax.loop import write_json

        write_json(os.path.abspath(args.out), res)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
