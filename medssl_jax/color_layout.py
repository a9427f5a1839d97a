"""Layout of the colour-parameter vector that the host draws and the device applies.

``augment_color.color_params`` (TensorFlow, host) writes it and ``augment_color.apply_color`` or
``augment_device.apply_color`` (JAX) reads it. The layout lives here, free of TensorFlow, so the
compiled training step imports on machines that have no TensorFlow (accelerator images).
Flags are 0.0 / 1.0; the vector is float32 ``[NUM_COLOR_PARAMS]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

PARAM_JITTER = 0  # colour jitter applied
PARAM_BRIGHTNESS = 1  # brightness factor (multiplicative; 1 = no-op)
PARAM_CONTRAST = 2  # contrast factor (1 = no-op)
PARAM_SATURATION = 3  # saturation factor (1 = no-op)
PARAM_HUE = 4  # hue delta in turns, in [-0.5, 0.5] (0 = no-op)
PARAM_ORDER = 5  # 4 slots [5, 9): jitter op order, a permutation of 0..3
PARAM_GRAY = 9  # grayscale applied
PARAM_BLUR = 10  # Gaussian blur applied
PARAM_SIGMA = 11  # blur sigma (drawn even when blur is off; unused then)
PARAM_SOLARIZE = 12  # solarization applied (after blur; DINO's second global crop)
NUM_COLOR_PARAMS = 13

# Solarization inverts pixels at or above this level (x -> 1 - x). PIL's ImageOps.solarize
# (threshold 128) on uint8 inverts v >= 128; on x = v / 255 that is x >= 127.5 / 255 = 0.5,
# which also makes a float pixel solarize iff it rounds to a uint8 value >= 128.
SOLARIZE_THRESHOLD = 0.5


def blur_kernel_size(image_size: int) -> int:
    """SimCLR kernel size for ``image_size``: ``image_size // 10`` made odd (2*(k//2)+1)."""
    return 2 * ((image_size // 10) // 2) + 1


def check_jitter(jitter: Sequence[float]) -> tuple[float, float, float, float]:
    """Explicit jitter strengths (brightness, contrast, saturation, hue): 4 finite numbers
    >= 0, hue <= 0.5 (a full turn of the hue circle); ValueError otherwise."""
    ok = len(jitter) == 4 and all(
        isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
        for v in jitter
    )
    if not ok or jitter[3] > 0.5:
        raise ValueError(
            "jitter must be () or 4 finite strengths >= 0 (brightness, contrast, saturation, "
            f"hue <= 0.5), got {tuple(jitter)!r}"
        )
    return tuple(float(v) for v in jitter)  # type: ignore[return-value]
