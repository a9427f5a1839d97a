"""SimCLR's released TensorFlow checkpoints -> variables of this project's SimCLRModel.

Formats (`fmt`):
  simclr_v2_tf1  SimCLRv2 TF1 name-based checkpoints (`model.ckpt-250228`); `ema=True` takes
                 the `ema_model/` copy (its supervised head when it has one, else the plain one).
  simclr_v1_tf1  SimCLRv1 TF1 checkpoints (R50 1x/2x/4x, no SK, no projection head released);
                 `rescale_v1=True` shrinks the conv kernels to v2's scale (see `rescale_rule`).
  simclr_v2_tf2  tf.train.Checkpoint prefixes or SavedModel folders of SimCLR's tf2/ code.

Backbone convs and BNs are matched in creation order (TF1: numeric suffix; TF2: list indices)
against `layer_call_order` of our model, after the depth, width and SK of the checkpoint are
checked against the requested variant. The head sizes come from the checkpoint: the number
of projection layers, their output size and the number of classes end up in converted.json.
Naming details and their sources: `tf_simclr_layout`.
"""

from __future__ import annotations

import functools

import numpy as np

from medssl_jax.convert import common
from medssl_jax.convert.tf_simclr_layout import Layout, read_tf1, read_tf2
from medssl_jax.models import create_model, get_variant, layer_call_order, variant_name
from medssl_jax.models.resnet import BLOCK_SIZES, BOTTLENECK_DEPTHS

FORMATS = ("simclr_v2_tf1", "simclr_v1_tf1", "simclr_v2_tf2")
BN_EPSILON = 1e-5
_BN_TARGETS = (
    ("gamma", "params", "scale"),
    ("beta", "params", "bias"),
    ("moving_mean", "batch_stats", "mean"),
    ("moving_variance", "batch_stats", "var"),
)
rescale_rule = (
    "each conv kernel K (fan_in = kh*kw*c_in) is multiplied by s = 1/(sqrt(fan_in)*rms(K)), "
    "i.e. brought to the RMS of a fresh VarianceScaling(1, fan_in) init; the BN right after "
    "it gets moving_mean*s and moving_variance s^2*(var+eps)-eps (clipped at 0), which keeps "
    "its inference output exactly unchanged"
)


OPTIONS = ("ema", "rescale_v1")  # the command-line options this reader takes


def convert(
    source: str,
    variant: str,
    *,
    fmt: str,
    ema: bool = False,
    rescale_v1: bool = False,
) -> common.Converted:
    """Read the SimCLR network at `source` (format `fmt`) into the variables of `variant`."""
    if fmt not in FORMATS:
        raise ValueError(f"tf_simclr converts formats {FORMATS}, not {fmt!r}")
    spec = get_variant(variant)
    if "vit" in spec:
        raise ValueError(f"SimCLR checkpoints hold ResNets, not the ViT {variant!r}")
    if rescale_v1 and fmt != "simclr_v1_tf1":
        raise ValueError("rescale_v1 applies to --format=simclr_v1_tf1 only")
    if fmt == "simclr_v1_tf1" and spec["sk_ratio"] > 0:
        raise ValueError("SimCLRv1 networks have no selective kernels: use an sk0 variant")
    reader = read_tf2 if fmt == "simclr_v2_tf2" else read_tf1
    layout = reader(source, ema=ema)
    head_notes = _head_sizes(layout)
    order, targets = _target(
        variant,
        head_notes["num_classes"],
        head_notes["num_proj_layers"],
        head_notes.get("proj_out_dim", 128),
    )
    convs = [p for kind, p in order if kind == "conv2d" and p[0] == "backbone"]
    bns = [p for kind, p in order if kind == "batch_normalization" and p[0] == "backbone"]
    _check_backbone(layout, [targets[_path("params", p, "kernel")] for p in convs], variant)

    arrays = layout.load(list(layout.shapes))
    conv_scale: dict[str, float] = {}
    bn_scale: dict[str, float] = {}
    notes = {**layout.notes, **head_notes}
    if rescale_v1:
        conv_scale, bn_scale = _rescale_factors(layout, arrays, convs, bns)
        inv = [1.0 / s for s in conv_scale.values()]
        notes["rescale_v1"] = rescale_rule
        notes["rescale_v1_mean_factor"] = float(np.exp(np.mean(np.log(inv)))) if inv else 1.0
    a = common.Assignment(arrays, targets, what=layout.what)
    for src, p in zip(layout.convs, convs, strict=False):
        s = conv_scale.get(src, 1.0)
        a.put(_path("params", p, "kernel"), src, lambda k, s=s: k * s)
    for src, p in zip(layout.bns, bns, strict=False):
        _put_bn(a, targets, src, p, bn_scale.get(src, 1.0))
    for j, (kernel, bn) in enumerate(layout.head):
        p = ("projection_head", f"layer_{j}")
        a.put(_path("params", (*p, "dense"), "kernel"), kernel)
        _put_bn(a, targets, bn, (*p, "bn"), 1.0)
    if layout.supervised:
        a.put("params/supervised_head/dense/kernel", layout.supervised[0])
        a.put("params/supervised_head/dense/bias", layout.supervised[1])
    params, batch_stats = a.finish()
    if rescale_v1:
        notes["rescale_v1_clipped_channels"] = _clipped(layout, arrays, bn_scale)
    return common.Converted(
        params,
        batch_stats,
        variant=variant,
        source=source,
        format=fmt,
        input_norm="none",
        notes=notes,
    )


def _path(collection: str, path: tuple[str, ...], leaf: str) -> str:
    return "/".join((collection, *path, leaf))


def _head_sizes(layout: Layout) -> dict[str, int]:
    """num_proj_layers, proj_out_dim (when there is a head) and num_classes held."""
    shapes = layout.shapes
    for name in [k for k, _ in layout.head] + list(layout.supervised or ())[:1]:
        if name not in shapes:
            raise common.ConversionError(f"{layout.what} has no {name!r}")
    notes = {"num_proj_layers": len(layout.head)}
    if layout.head:
        notes["proj_out_dim"] = int(shapes[layout.head[-1][0]][-1])
    notes["num_classes"] = int(shapes[layout.supervised[0]][-1]) if layout.supervised else 0
    return notes


@functools.lru_cache(maxsize=8)
def _target(variant: str, num_classes: int, num_proj: int, out_dim: int):
    """(layer call order, variable shapes) of our model for `variant` with these heads
    (cached: tracing a deep model takes seconds and tests convert the same one often)."""
    model = create_model(
        variant, num_classes=num_classes, num_proj_layers=num_proj, proj_out_dim=out_dim
    )
    return tuple(layer_call_order(model)), common.target_shapes(model)


def _identity(x: np.ndarray) -> np.ndarray:
    return x


def _put_bn(a: common.Assignment, targets, src: str, path, scale: float) -> None:
    """gamma/beta -> params scale/bias, moving stats -> batch_stats (beta only where either
    side has one, so a missing or extra beta is reported by name)."""
    transforms = {
        "moving_mean": lambda m: m * scale,
        "moving_variance": lambda v: np.maximum(scale**2 * (v + BN_EPSILON) - BN_EPSILON, 0),
    }
    if scale == 1.0:
        transforms = {}
    for leaf, collection, ours in _BN_TARGETS:
        target = _path(collection, path, ours)
        if leaf == "beta" and target not in targets and not a.has(f"{src}/beta"):
            continue
        a.put(target, f"{src}/{leaf}", transforms.get(leaf, _identity))


def _describe(conv_shapes: list[tuple[int, ...]]) -> tuple[tuple, str]:
    """(facts compared, readable description) of a ResNet from its conv kernel shapes."""
    n = len(conv_shapes)
    stem = next((i for i, s in enumerate(conv_shapes) if s[0] == 1), n)
    if not n or not stem:
        return (n,), f"{n} conv layers and no ResNet stem"
    sk = sum(1 for s in conv_shapes[stem:] if s[0] == 3 and s[3] == 2 * s[2])
    width = conv_shapes[stem - 1][3] / 64
    features = conv_shapes[-1][3]
    k = conv_shapes[0][0]
    guess = "no released SimCLR depth"
    for depth, blocks in BLOCK_SIZES.items():
        per_block = (5 if sk else 3) if depth in BOTTLENECK_DEPTHS else 2
        if n == stem + 4 + per_block * sum(blocks):
            guess = variant_name(depth, width, 1 if sk or stem == 3 else 0)
            break
    text = (
        f"{n} conv layers of which {sk} selective-kernel (SK) convs, a stem of {stem} {k}x{k} "
        f"conv(s) with {conv_shapes[stem - 1][3]} channels and {features} output channels "
        f"(looks like {guess})"
    )
    return (n, sk, stem, k, conv_shapes[stem - 1][3], features), text


def _check_backbone(layout: Layout, expected: list[tuple[int, ...]], variant: str) -> None:
    """Refuse, with both descriptions, a checkpoint whose depth, width or SK differ from
    `variant` (before any array is mapped)."""
    have = [layout.shapes[n] for n in layout.convs]
    if any(len(s) != 4 for s in have):
        raise common.ConversionError(f"{layout.what}: conv kernels are not 4-D HWIO")
    (facts, text), (want, want_text) = _describe(have), _describe(expected)
    if facts != want:
        raise common.ConversionError(
            f"{layout.what} does not hold a {variant} backbone: it has {text}; "
            f"variant {variant} expects {want_text}"
        )


def _rescale_factors(layout: Layout, arrays, convs, bns) -> tuple[dict, dict]:
    """Per-conv factor s (see `rescale_rule`), keyed by source conv, and by the source BN
    that follows it (k-th conv -> k-th BN in a network without SK)."""
    paired = len(convs) == len(bns) and len(layout.convs) == len(layout.bns)
    if not paired or any(c[:-1] != b[:-1] for c, b in zip(convs, bns, strict=True)):
        raise common.ConversionError("rescale_v1 needs a network where each conv has its BN")
    conv_scale, bn_scale = {}, {}
    for src, bn in zip(layout.convs, layout.bns, strict=True):
        k = np.asarray(arrays[src], np.float64)
        fan_in = int(np.prod(k.shape[:-1]))
        rms = float(np.sqrt(np.mean(k**2)))
        s = 1.0 / (np.sqrt(fan_in) * rms) if rms > 0 else 1.0
        conv_scale[src] = bn_scale[bn] = s
    return conv_scale, bn_scale


def _clipped(layout: Layout, arrays, bn_scale: dict) -> int:
    """Number of BN channels whose rescaled moving variance had to be clipped at 0."""
    count = 0
    for src in layout.bns:
        s = bn_scale.get(src, 1.0)
        v = np.asarray(arrays[f"{src}/moving_variance"], np.float64)
        count += int(np.sum(s**2 * (v + BN_EPSILON) - BN_EPSILON < 0))
    return count
