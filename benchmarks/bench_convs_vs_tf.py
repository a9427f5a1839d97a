"""ResNet-50's convolutions, forward + backward, as this project runs them on XLA:CPU and as
TensorFlow runs them (oneDNN), alternated on the same host: which layers make the CPU step slower
than TensorFlow's official SimCLR step.

  python benchmarks/bench_convs_vs_tf.py --out benchmarks/results/convs_vs_tf_r50_64px.json

Shapes of a 64 px, batch 32 x 2 views SimCLR step, float32. 1x1 convolutions take the project's
dot path (`im2col_conv`, as `MEDSSL_CONV1X1=auto` does on CPU), 3x3 and 7x7 XLA's convolution.
Each time is the best of 2 x 7 calls of a jitted / tf.function gradient of sum(y^2) with
respect to input and kernel. `count` is how often the shape occurs in ResNet-50 (approximate:
stage 4's 2x2 maps and the strided shortcuts are left out).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from jax import lax  # noqa: E402

from medssl_jax.loop import write_json  # noqa: E402
from medssl_jax.models.resnet import fixed_padding, im2col_conv  # noqa: E402

DN = ("NHWC", "HWIO", "NHWC")
BATCH = 64  # 32 examples x 2 views
LAYERS = [  # name, input H = W, Cin, Cout, kernel, stride, count in ResNet-50
    ("stem 7x7/2, 64 px", 64, 3, 64, 7, 2, 1),
    ("3x3/1, 16x16, 64", 16, 64, 64, 3, 1, 3),
    ("3x3/2, 16 -> 8, 128", 16, 128, 128, 3, 2, 1),
    ("3x3/1, 8x8, 128", 8, 128, 128, 3, 1, 3),
    ("3x3/1, 4x4, 256", 4, 256, 256, 3, 1, 5),
    ("1x1, 16x16, 64 -> 256", 16, 64, 256, 1, 1, 4),
    ("1x1, 16x16, 256 -> 64", 16, 256, 64, 1, 1, 2),
    ("1x1, 8x8, 128 -> 512", 8, 128, 512, 1, 1, 5),
    ("1x1, 8x8, 512 -> 128", 8, 512, 128, 1, 1, 3),
    ("1x1, 4x4, 1024 -> 256", 4, 1024, 256, 1, 1, 5),
]


def jax_grad(k: int, s: int) -> Callable:
    """Jitted (dx, dw) of sum(conv(x, w)^2) on the project's CPU path."""

    def conv(x: jax.Array, w: jax.Array) -> jax.Array:
        if k == 1:
            return im2col_conv(x[:, ::s, ::s, :], w, (1, 1), "VALID")
        if s == 1:
            return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=DN)
        return lax.conv_general_dilated(
            fixed_padding(x, k), w, (s, s), "VALID", dimension_numbers=DN
        )

    return jax.jit(jax.grad(lambda x, w: jnp.sum(conv(x, w) ** 2), (0, 1)))


def tf_grad(k: int, s: int) -> Callable:
    """tf.function (dx, dw) of sum(conv2d(x, w)^2), TF SimCLR's padding."""

    @tf.function
    def g(x: tf.Tensor, w: tf.Tensor) -> list[tf.Tensor]:
        with tf.GradientTape() as tape:
            tape.watch([x, w])
            if s == 1:
                y = tf.nn.conv2d(x, w, 1, "SAME")
            else:
                p = k - 1
                pad = [[0, 0], [p // 2, p - p // 2], [p // 2, p - p // 2], [0, 0]]
                y = tf.nn.conv2d(tf.pad(x, pad), w, s, "VALID")
            loss = tf.reduce_sum(y * y)
        return tape.gradient(loss, [x, w])

    return g


def best_seconds(f: Callable, *args, calls: int = 7) -> float:
    """Fastest of `calls` timed calls after one warm-up (results pulled to the host)."""

    def run() -> None:
        for v in f(*args):
            np.asarray(v)

    run()
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="", help="write the rows here as JSON")
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    rows = []
    for name, h, cin, cout, k, s, count in LAYERS:
        x = rng.standard_normal((BATCH, h, h, cin), np.float32)
        w = rng.standard_normal((k, k, cin, cout), np.float32) * 0.05
        jf, tfn = jax_grad(k, s), tf_grad(k, s)
        xj, wj, xt, wt = jnp.asarray(x), jnp.asarray(w), tf.constant(x), tf.constant(w)
        tj, tt = [], []
        for _ in range(2):  # alternate the frameworks
            tj.append(best_seconds(jf, xj, wj))
            tt.append(best_seconds(tfn, xt, wt))
        row = dict(layer=name, count=count, xla_ms=min(tj) * 1e3, tf_ms=min(tt) * 1e3)
        row["xla_over_tf"] = row["xla_ms"] / row["tf_ms"]
        rows.append(row)
        print(
            f"{name:24s} x{count}  XLA {row['xla_ms']:7.2f} ms  TF {row['tf_ms']:7.2f} ms  "
            f"{row['xla_over_tf']:.2f}x",
            flush=True,
        )
    xla = sum(r["xla_ms"] * r["count"] for r in rows)
    tfs = sum(r["tf_ms"] * r["count"] for r in rows)
    print(f"weighted by count: XLA {xla:.0f} ms, TF {tfs:.0f} ms ({xla / tfs:.2f}x)")
    report = dict(
        rows=rows,
        weighted_xla_ms=xla,
        weighted_tf_ms=tfs,
        jax_version=jax.__version__,
        tf_version=tf.__version__,
        batch=BATCH,
        cpu_count=os.cpu_count(),
        load_average_1m=os.getloadavg()[0],
    )
    if args.out:
        write_json(os.path.abspath(args.out), report)
        print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
