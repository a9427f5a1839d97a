"""Memory measurements of the training benchmark: host RSS high-water marks, device peaks, and
whether a compiled step fits the device (`check_fits`, used by bench_train.py --fit)."""

from __future__ import annotations

import resource
from typing import Any

import jax


def host_rss_bytes(field: str) -> int | None:
    """VmRSS / VmHWM of this process from /proc (Linux), else None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def reset_host_peak() -> bool:
    """Resets this process's RSS high-water mark (Linux >= 4.0) so each sweep entry gets its own."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def host_rss_now() -> int:
    rss = host_rss_bytes("VmRSS")
    return rss if rss is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def host_peak_bytes() -> int:
    hwm = host_rss_bytes("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def device_peak_bytes(devices: list[jax.Device]) -> list[int] | None:
    """peak_bytes_in_use per device where the backend reports it (GPU/TPU), else None (CPU)."""
    peaks = []
    for d in devices:
        stats = d.memory_stats() if hasattr(d, "memory_stats") else None
        if not stats or "peak_bytes_in_use" not in stats:
            return None
        peaks.append(int(stats["peak_bytes_in_use"]))
    return peaks


class DoesNotFit(RuntimeError):
    """The step needs more device memory than the device has."""


def out_of_memory(e: BaseException) -> bool:
    text = str(e)
    return isinstance(e, DoesNotFit) or "RESOURCE_EXHAUSTED" in text or "out of memory" in text


def check_fits(compiled: Any, devices: list[jax.Device]) -> int | None:
    """Bytes the compiled step needs per device (arguments + outputs - donated aliases +
    temporaries); raises DoesNotFit above the device's bytes_limit. None where unknown (CPU)."""
    try:
        m = compiled.memory_analysis()
        need = (
            m.argument_size_in_bytes
            + m.output_size_in_bytes
            - m.alias_size_in_bytes
            + m.temp_size_in_bytes
        )
    except Exception:  # noqa: BLE001 (not every backend reports it)
        return None
    stats = devices[0].memory_stats() if hasattr(devices[0], "memory_stats") else None
    limit = (stats or {}).get("bytes_limit")
    if limit and need > limit:
        raise DoesNotFit(f"needs {need / 2**30:.1f} GiB of {limit / 2**30:.1f} GiB per device")
    return int(need)
