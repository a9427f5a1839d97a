"""Peak FLOP/s of a device, for model-FLOPs utilisation (MFU = achieved / peak).

Accelerators: the datasheet's dense bfloat16 peak per chip (TPUs from `aot.CHIPS`). CPU has no
datasheet figure that a JAX step could reach, so its peak is measured: the best rate of a
jitted square matmul in the step's dtype on this host (all cores; fake CPU devices share them).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

# Dense bf16 tensor-core peaks per chip (NVIDIA datasheets, SXM parts; sparsity excluded).
GPU_BF16_PEAK = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L4": 121e12,
}


def datasheet_peak(device_kind: str) -> tuple[float, str] | None:
    """(FLOP/s, source) of one accelerator chip from its `device_kind`, or None if unknown."""
    from medssl_jax.aot import CHIPS

    kind = device_kind.upper()
    for name, flops in GPU_BF16_PEAK.items():
        if name in kind:
            return flops, f"datasheet dense bf16 peak of {name}"
    # Checked in order: 'TPU v5 lite' (v5e) before 'TPU v5' (v5p's device_kind).
    tpu = {"TPU V4": "v4", "TPU V5 LITE": "v5e", "TPU V5E": "v5e", "TPU V5": "v5p"}
    for prefix, chip in tpu.items():
        if kind.startswith(prefix):
            return CHIPS[chip].peak_flops, f"datasheet bf16 peak of TPU {chip}"
    return None


def measured_matmul_peak(dtype: str = "float32", n: int = 1024, repeats: int = 5) -> float:
    """Best FLOP/s of an n x n x n matmul in `dtype` on the default device (2 n^3 per call)."""
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    jax.block_until_ready(f(a))  # compile
    best = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(f(a))
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


def step_peak(device: jax.Device, num_devices: int, dtype: str) -> tuple[float, str]:
    """(peak FLOP/s of the devices running a step, source): the datasheet figure x devices on
    an accelerator; on CPU the measured host matmul rate (fake devices share the host)."""
    if device.platform != "cpu":
        found = datasheet_peak(device.device_kind)
        if found is not None:
            return found[0] * num_devices, found[1] + f" x {num_devices}"
    rate = measured_matmul_peak(dtype)
    return rate, f"measured {dtype} 1024^3 matmul on this host ({device.platform})"
