"""Synthetic dermatology-like lesion images for the `demo` dataset (pure numpy, deterministic).

Design (so multi-instance learning has something real to exploit):
- The CLASS is carried by the lesion's internal pattern (network, dots, rings, radial streaks,
  eccentric blotch, homogeneous), drawn in the lesion's own coordinate frame, coarse enough
  (periods of 5-10 px on large lesions, little blur) that a 0.125x ResNet-18 can see it at 64 px.
- A CASE (lesion) has its identity: pigment colours, size, elongation, orientation, border
  irregularity, pattern frequency/phase/contrast. All images of a case share it.
- Each IMAGE adds strong nuisance that SimCLR's augmentations do not remove: viewpoint (rotation,
  scale, perspective tilt, translation), lighting gradient and vignetting, illumination colour,
  background skin tone, skin texture and hairs, blur and sensor noise. Two images of one case
  therefore differ far more than two augmentations of one image.
- `shifted=True` keeps the lesion generator and changes acquisition (lower contrast, gamma,
  yellow cast, defocus blur, stronger noise, JPEG compression) for distribution-shift tests.
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np
from PIL import Image
from scipy import ndimage, special

CLASS_NAMES = ("homogeneous", "reticular", "globular", "target", "streaks", "blotch")
# Class frequencies (imbalanced, like real dermatology data).
CLASS_PROBS = (0.26, 0.2, 0.16, 0.14, 0.12, 0.12)
IMAGES_PER_CASE_PROBS = (0.3, 0.25, 0.2, 0.15, 0.1)  # 1..5 images

# Pigment colours (RGB in [0, 1]); every class draws from the same palette.
_PIGMENTS = np.array(
    [
        [0.55, 0.35, 0.22],
        [0.42, 0.25, 0.16],
        [0.68, 0.42, 0.36],
        [0.35, 0.22, 0.2],
        [0.6, 0.3, 0.28],
        [0.48, 0.36, 0.3],
    ],
    dtype=np.float32,
)
_SKIN = np.array(
    [
        [0.93, 0.8, 0.7],
        [0.86, 0.68, 0.56],
        [0.76, 0.56, 0.42],
        [0.62, 0.44, 0.32],
        [0.96, 0.85, 0.78],
    ],
    dtype=np.float32,
)


@dataclasses.dataclass(frozen=True)
class Lesion:
    """Identity of one lesion (case): shared by all its images."""

    label: int
    radius: float  # semi-major axis, in image half-widths
    elongation: float  # minor / major axis
    angle: float  # orientation, radians
    border: np.ndarray  # [4, 2] amplitude/phase of angular harmonics 2..5
    softness: float  # edge width
    pigment: np.ndarray  # [3] base colour
    dark: np.ndarray  # [3] pattern colour
    contrast: float  # pattern strength
    freq: float  # pattern frequency (class specific meaning)
    phase: float
    dots: np.ndarray  # [D, 3] globule positions (u, v) and sizes


def sample_lesion(rng: np.random.Generator, label: int | None = None) -> Lesion:
    """Draws a lesion identity; the class is drawn from CLASS_PROBS unless given."""
    if label is None:
        label = int(rng.choice(len(CLASS_NAMES), p=CLASS_PROBS))
    pigment = _PIGMENTS[rng.integers(len(_PIGMENTS))] * rng.uniform(0.85, 1.15, 3)
    dark = pigment * rng.uniform(0.35, 0.6) + rng.normal(0, 0.03, 3)
    n_dots = int(rng.integers(5, 9))
    rr = np.sqrt(rng.uniform(0.02, 0.55, n_dots))
    th = rng.uniform(0, 2 * np.pi, n_dots)
    dots = np.stack([rr * np.cos(th), rr * np.sin(th), rng.uniform(0.1, 0.15, n_dots)], 1)
    freq_range = {
        0: (1.0, 2.0),
        1: (2.6, 3.4),
        2: (1.0, 1.0),
        3: (1.6, 2.2),
        4: (5.0, 8.0),
        5: (0.3, 0.45),
    }[label]
    return Lesion(
        label=label,
        radius=float(rng.uniform(0.45, 0.65)),
        elongation=float(rng.uniform(0.65, 1.0)),
        angle=float(rng.uniform(0, 2 * np.pi)),
        border=np.stack([rng.uniform(0, 0.07, 4), rng.uniform(0, 2 * np.pi, 4)], 1),
        softness=float(rng.uniform(0.03, 0.1)),
        pigment=np.clip(pigment, 0, 1).astype(np.float32),
        dark=np.clip(dark, 0, 1).astype(np.float32),
        contrast=float(rng.uniform(0.6, 0.95)),  # pattern salient at 64 px (class signal)
        freq=float(rng.uniform(*freq_range)),
        phase=float(rng.uniform(0, 2 * np.pi)),
        dots=dots.astype(np.float32),
    )


def _pattern(
    les: Lesion, u: np.ndarray, v: np.ndarray, rho: np.ndarray, phi: np.ndarray
) -> np.ndarray:
    """Class pattern intensity in [0, 1] in lesion coordinates (u, v), normalised radius rho."""
    f, ph = les.freq, les.phase
    if les.label == 0:  # homogeneous: smooth, almost flat pigment
        return 0.45 + 0.15 * np.cos(f * u + ph) * np.cos(f * v - ph)
    if les.label == 1:  # reticular: pigment network (grid of lines)
        w = 0.3
        a = np.exp(-((np.sin(np.pi * f * u + ph) / w) ** 2))
        b = np.exp(-((np.sin(np.pi * f * v - ph) / w) ** 2))
        return np.maximum(a, b)
    if les.label == 2:  # globular: scattered dots
        d2 = (u[..., None] - les.dots[:, 0]) ** 2 + (v[..., None] - les.dots[:, 1]) ** 2
        return np.clip(np.exp(-d2 / (2 * les.dots[:, 2] ** 2)).sum(-1), 0, 1)
    if les.label == 3:  # target: concentric rings
        return 0.5 + 0.5 * np.cos(2 * np.pi * f * rho + ph)
    if les.label == 4:  # streaks: radial lines, stronger towards the border
        n = np.round(f)
        return (0.5 + 0.5 * np.cos(n * phi + ph + 1.5 * rho)) * np.clip(rho * 1.6 - 0.3, 0, 1)
    # blotch: eccentric dark area inside a lighter lesion
    cu, cv = 0.45 * np.cos(ph), 0.45 * np.sin(ph)
    return np.exp(-((u - cu) ** 2 + (v - cv) ** 2) / (2 * (f + 0.05) ** 2))


def _smooth_field(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Random smooth field [size, size], zero mean, unit-ish std."""
    grid = rng.normal(size=(cells, cells)).astype(np.float32)
    return ndimage.zoom(grid, size / cells, order=3, mode="reflect", grid_mode=True)[:size, :size]


def render(
    les: Lesion, rng: np.random.Generator, size: int = 64, shifted: bool = False
) -> np.ndarray:
    """One photograph of `les` with fresh per-image nuisance from `rng`: uint8 [size, size, 3]."""
    lin = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1
    y, x = np.meshgrid(lin, lin, indexing="ij")

    # Viewpoint: perspective tilt, translation, rotation, scale.
    kx, ky = rng.normal(0, 0.18, 2)
    w = 1.0 + kx * x + ky * y
    px, py = x / w, y / w
    tx, ty = rng.uniform(-0.22, 0.22, 2)
    theta = les.angle + rng.uniform(-np.pi, np.pi)
    scale = les.radius * rng.uniform(0.75, 1.3)
    c, s = np.cos(theta), np.sin(theta)
    qx, qy = px - tx, py - ty
    u = (c * qx + s * qy) / scale
    v = (-s * qx + c * qy) / (scale * les.elongation)
    phi = np.arctan2(v, u)
    r_border = 1.0 + sum(a * np.cos((k + 2) * phi + p) for k, (a, p) in enumerate(les.border))
    rho = np.sqrt(u**2 + v**2) / r_border
    mask = special.expit((1.0 - rho) / les.softness)

    pat = _pattern(les, u, v, rho, phi)
    inner = 1.0 - les.contrast * pat
    lesion = les.pigment * inner[..., None] + les.dark * (1.0 - inner[..., None])
    # The lesion's colour as this camera/light renders it: varies per image, so that within a
    # case only its pattern (the class) and shape stay fixed; colour is no identity shortcut.
    lesion = np.clip(lesion * rng.uniform(0.65, 1.35, 3), 0, 1)

    # Skin: tone, low-frequency mottling, pores, hairs.
    tone = _SKIN[rng.integers(len(_SKIN))] * rng.uniform(0.9, 1.08, 3)
    mottle = _smooth_field(rng, size, 5) * rng.uniform(0.02, 0.07)
    pores = rng.normal(0, rng.uniform(0.005, 0.03), (size, size))
    skin = tone * (1.0 + mottle + pores)[..., None]
    img = skin * (1 - mask[..., None]) + lesion * mask[..., None]
    for _ in range(int(rng.integers(0, 4))):
        ang, off, curv = rng.uniform(0, np.pi), rng.uniform(-0.9, 0.9), rng.normal(0, 0.25)
        nx, ny = np.cos(ang), np.sin(ang)
        along = -ny * x + nx * y
        dist = np.abs(nx * x + ny * y - off - curv * along**2)
        hair = np.exp(-((dist / rng.uniform(0.012, 0.025)) ** 2))
        img = img * (1 - 0.75 * hair[..., None]) + 0.1 * hair[..., None]

    # Illumination: directional gradient, vignetting, colour of the light.
    g_dir = rng.uniform(0, 2 * np.pi)
    light = 1 + rng.uniform(0, 0.45) * (np.cos(g_dir) * x + np.sin(g_dir) * y)
    light = light - rng.uniform(0, 0.3) * (x**2 + y**2) / 2
    cast = rng.normal(1.0, 0.07, 3)
    img = img * light[..., None] * cast * rng.uniform(0.8, 1.15)

    blur = rng.uniform(0, 0.35)
    noise = rng.uniform(0.005, 0.03)
    if shifted:  # different camera: low contrast, gamma, yellow cast, defocus, noise
        img = 0.5 + (img - 0.5) * rng.uniform(0.55, 0.75)
        img = np.clip(img, 0, 1) ** rng.uniform(1.2, 1.5)
        img = img * np.array([1.08, 1.0, 0.8]) + 0.04
        blur = rng.uniform(0.9, 1.5)
        noise = rng.uniform(0.035, 0.06)
    if blur > 0.1:
        img = ndimage.gaussian_filter(img, sigma=(blur, blur, 0), mode="nearest")
    img = img + rng.normal(0, noise, img.shape)
    out = (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)
    if shifted:  # JPEG compression artefacts, decoded back to pixels
        buf = io.BytesIO()
        Image.fromarray(out).save(buf, format="JPEG", quality=int(rng.integers(25, 50)))
        out = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    return out
