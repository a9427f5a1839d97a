"""Where the pretraining step's time goes: a jax.profiler trace of a few steps of the step that
`bench_train.py` builds, summed per XLA op and per op kind, with each op's shape and source.

  python benchmarks/profile_step.py --variant r50_1x_sk0 --image_size 64 --batch_size 32 \
      --dtype float32 --trace_dir /tmp/step_trace [--top 25]

Takes bench_train.py's model options (one setting: the first of each list). Times are thread
time (all threads of all devices, summed), per step: with several devices on one host a
collective's time includes the wait for the slowest device. The trace (Perfetto JSON, also
readable by TensorBoard's profiler) stays in --trace_dir.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import bench_train  # noqa: E402
import jax  # noqa: E402

from medssl_jax import pretrain, sharding  # noqa: E402


def op_times(trace_file: str, steps: int) -> dict[str, float]:
    """Milliseconds of thread time per step for every HLO op named in the trace."""
    with gzip.open(trace_file) as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    per_op: dict[str, float] = collections.defaultdict(float)
    for e in events:
        op = e.get("args", {}).get("hlo_op") if e.get("ph") == "X" else None
        if op:
            per_op[op] += e.get("dur", 0) / 1e3 / steps
    return dict(per_op)


def describe(hlo_text: str, op: str) -> str:
    """'shape <- source op name' of `op` in the compiled module's text ('' if not found)."""
    m = re.search(rf"^\s*%{re.escape(op)} = (\S+) .*$", hlo_text, re.M)
    if not m:
        return ""
    src = re.search(r'op_name="([^"]+)"', m.group(0))
    return f"{m.group(1)} <- {src.group(1)[-80:] if src else '?'}"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trace_dir", default="/tmp/medssl_step_trace")
    p.add_argument("--top", type=int, default=25, help="ops listed")
    own, rest = p.parse_known_args(argv)
    args = bench_train.parse_args(rest)
    config = bench_train.sweep_configs(args)[0]
    built = pretrain.build(
        config,
        sharding.make_mesh(),
        num_classes=args.num_classes,
        label_kind="multiclass" if args.num_classes > 0 else "none",
        total_steps=1000,
        warmup_steps=10,
    )
    compiled = built.step.lower(built.abstract_state, built.abstract_batch).compile()
    state = built.init(jax.random.key(int(config.seed), impl="rbg"))
    batch = bench_train.synthetic_batch(built.abstract_batch, int(config.seed), args.num_classes)
    for _ in range(max(args.warmup, 1)):
        state, _ = jax.block_until_ready(compiled(state, batch))
    with jax.profiler.trace(own.trace_dir, create_perfetto_trace=True):
        for _ in range(args.steps):
            state, _ = jax.block_until_ready(compiled(state, batch))
    files = glob.glob(os.path.join(own.trace_dir, "**", "*.trace.json.gz"), recursive=True)
    if not files:
        raise SystemExit(f"no Perfetto trace under {own.trace_dir}")
    per_op = op_times(max(files, key=os.path.getmtime), args.steps)
    kinds: dict[str, float] = collections.defaultdict(float)
    for op, ms in per_op.items():
        kinds[re.sub(r"[.\d]+$", "", op)] += ms
    total = sum(per_op.values())
    hlo = compiled.as_text()
    print(
        f"{config.model.variant}, {config.data.image_size} px, batch {config.batch_size}, "
        f"{config.model.dtype}, {jax.device_count()} device(s): {total:.0f} thread-ms of ops "
        "per step"
    )
    for kind, ms in sorted(kinds.items(), key=lambda kv: -kv[1])[:10]:
        print(f"  {ms:8.1f} ms  {100 * ms / total:5.1f}%  {kind}")
    print(f"top {own.top} ops:")
    for op, ms in sorted(per_op.items(), key=lambda kv: -kv[1])[: own.top]:
        print(f"  {ms:8.1f} ms  {op:28s} {describe(hlo, op)}")
    return {"total_ms": total, "kinds": dict(kinds), "ops": per_op}


if __name__ == "__main__":
    main()
