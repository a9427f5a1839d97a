"""PyTorch self-supervised ImageNet releases -> this project's SimCLRModel variables.

Formats (read with `torch_pickle`, no torch needed):
  torch_resnet  torchvision-layout ResNet-50 (SwAV `swav_800ep_pretrain.pth.tar`, DINO
                `dino_resnet50_pretrain.pth`, plain torchvision state dicts). Backbone names
                `conv1`, `bn1`, `layer{g}.{b}.conv{1,2,3}` / `bn{1,2,3}`, `downsample.{0,1}`;
                `fc.*` -> our supervised head; SwAV's `projection_head.*` -> our projection
                head and `prototypes.weight` -> the SwAV method head (methods/swav.py); DINO's
                `head.*` (full checkpoints) -> the DINO method head (methods/dino.py).
  dino_vit      DINO ViT-S/16, ViT-B/16 (`cls_token`, `pos_embed`, `patch_embed.proj`,
                `blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}`, `norm`); the ViT's
                classifier `head.{weight,bias}` -> supervised head; DINO's `head.mlp.*` /
                `head.last_layer.*` -> the DINO method head.

Layouts: conv OIHW -> HWIO, Linear [out, in] -> [in, out]. torchvision pads every conv by
(k-1)/2 on each side; SimCLR's fixed padding pads (k-1)//2 before and the rest after, which for
the odd kernels of a ResNet (7, 3, 1) is the same, at every stride and input size; only the
stem max-pool differs (torchvision pads 1 on each side, SimCLR SAME), hence `torch_maxpool`.
The releases expect ImageNet mean/std inputs: the model normalises inside (`input_norm`).

Head mappings that are not one to one (recorded in converted.json `notes`):
  * a Linear bias followed by BatchNorm (SwAV's projection layer 0, DINO heads with BN) is
    folded into the BN running mean (mean - bias): exact in inference and in training;
  * SwAV's last projection Linear has a bias and no BN, our projection head ends in a BN
    without beta: it becomes scale 1, mean -bias, var 1 - eps, exact in inference mode only (in
    training mode that BN normalises with batch statistics, as our SimCLR-style head does).
  * DINO's weight-normalised last layer: weight_v -> `kernel`; weight_g all ones (teacher,
    norm_last_layer) -> no gain, else -> `gain` with norm_last_layer=False.
`drop_heads=True` keeps the backbone (and `fc`) only. ViT head counts are not stored in the
weights: they come from the variant (vit_s16: 6, vit_b16: 12).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from medssl_jax.convert import common, torch_pickle
from medssl_jax.methods.dino import DINOHead
from medssl_jax.methods.swav import Prototypes
from medssl_jax.models import create_model, get_variant
from medssl_jax.models.resnet import BLOCK_SIZES, BOTTLENECK_DEPTHS
from medssl_jax.models.vit import VIT_CONFIGS, VisionTransformer, mlp_hidden_dim

FORMATS = ("torch_resnet", "dino_vit")
BN_EPSILON = 1e-5  # torch BatchNorm default == our models' epsilon
METHOD_HEAD_PREFIXES = ("projection_head.", "prototypes", "head.mlp", "head.last_layer.")


def conv_kernel(w: np.ndarray) -> np.ndarray:
    """torch Conv2d weight [O, I, kh, kw] -> Flax [kh, kw, I, O]."""
    return np.transpose(w, (2, 3, 1, 0))


def dense_kernel(w: np.ndarray) -> np.ndarray:
    """torch Linear weight [out, in] -> Flax [in, out]."""
    return np.transpose(w)


class _Assignment(common.Assignment):
    """common.Assignment plus targets computed from several sources or from none."""

    def put_derived(self, target: str, sources: list[str], fn: Callable[..., np.ndarray]) -> None:
        """`target` = fn(*source arrays); every source counts as used (by `target`)."""
        missing = [s for s in sources if s not in self.source]
        if missing:
            self.errors.append(f"missing in {self.what}: {missing} (for {target})")
            return
        arrays = [np.asarray(self.source[s], np.float32) for s in sources]
        for s in sources[1:]:
            if s in self.used:
                self.errors.append(f"{s!r} used twice ({self.used[s]}, {target})")
            self.used[s] = target
        self.put(target, sources[0], lambda _: fn(*arrays))

    def put_value(self, target: str, value: np.ndarray) -> None:
        """`target` = a constant implied by the source layout (no source array)."""
        if target not in self.targets:
            self.errors.append(f"no model variable {target!r} (constant)")
        elif tuple(np.shape(value)) != tuple(self.targets[target]):
            self.errors.append(
                f"constant for {target}: {np.shape(value)} != {self.targets[target]}"
            )
        else:
            self.filled[target] = np.asarray(value, np.float32)

    def consume(self, source: str, why: str) -> None:
        """Mark `source` used without a target (its value is implied, e.g. weight_g == 1)."""
        self.used[source] = why


def _linear_layers(state: Mapping[str, np.ndarray], prefix: str) -> list[tuple[str, str | None]]:
    """[(Linear name, name of the BatchNorm right after it or None)] of a torch nn.Sequential
    under `prefix` ('head.mlp'), in index order; a bare Linear (`prefix.weight`) too."""
    if f"{prefix}.weight" in state:
        return [(prefix, None)]
    pattern = re.escape(prefix) + r"\.(\d+)\."
    out: list[tuple[str, str | None]] = []
    for i in sorted({int(m[1]) for k in state if (m := re.match(pattern, k))}):
        name = f"{prefix}.{i}"
        if f"{name}.running_mean" in state:
            if not out or out[-1][1] is not None:
                raise common.ConversionError(f"{prefix}: BatchNorm {name} follows no Linear")
            out[-1] = (out[-1][0], name)
        elif np.ndim(state.get(f"{name}.weight")) == 2:
            out.append((name, None))
    return out


def _put_bn(a: _Assignment, target: str, src: str, fold_bias: str | None = None) -> None:
    """torch BN `src` -> our BN `target` ('method_head/bn_0'); optionally fold a Linear bias."""
    a.put(f"params/{target}/scale", f"{src}.weight")
    if f"params/{target}/bias" in a.targets:
        a.put(f"params/{target}/bias", f"{src}.bias")
    if fold_bias:
        a.put_derived(f"batch_stats/{target}/mean", [f"{src}.running_mean", fold_bias], np.subtract)
    else:
        a.put(f"batch_stats/{target}/mean", f"{src}.running_mean")
    a.put(f"batch_stats/{target}/var", f"{src}.running_var")


# --- heads ----------------------------------------------------------------------------------


def swav_heads(state: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Model fields for SwAV's projection head / prototypes present in `state` (or {})."""
    fields: dict[str, Any] = {}
    if any(re.match(r"prototypes\d+\.", k) for k in state):
        raise common.ConversionError(
            "SwAV MultiPrototypes (prototypes0, prototypes1, ...) have no counterpart in our "
            "SwAV head (one prototype set); convert with drop_heads=True"
        )
    linears = _linear_layers(state, "projection_head")
    if linears:
        fields["num_proj_layers"] = len(linears)
        fields["proj_out_dim"] = int(state[f"{linears[-1][0]}.weight"].shape[0])
    if "prototypes.weight" in state:
        k = int(state["prototypes.weight"].shape[0])
        fields.update(method_head=Prototypes(k), method_head_input="projection")
    return fields


def map_swav_heads(a: _Assignment, state: Mapping[str, np.ndarray]) -> dict:
    """Projection head and prototypes; returns notes."""
    notes: dict[str, Any] = {}
    linears = _linear_layers(state, "projection_head")
    for j, (lin, bn) in enumerate(linears):
        t = f"projection_head/layer_{j}"
        a.put(f"params/{t}/dense/kernel", f"{lin}.weight", dense_kernel)
        if bn is not None:
            _put_bn(a, f"{t}/bn", bn, fold_bias=f"{lin}.bias")
        elif j == len(linears) - 1:  # SwAV's last Linear: bias, no BN
            out = state[f"{lin}.weight"].shape[0]
            a.put_value(f"params/{t}/bn/scale", np.ones(out))
            a.put(f"batch_stats/{t}/bn/mean", f"{lin}.bias", np.negative)
            a.put_value(f"batch_stats/{t}/bn/var", np.full(out, 1.0 - BN_EPSILON))
            notes["projection_head"] = (
                f"layer_{j}: the source Linear's bias is a fixed BN (scale 1, mean -bias, var "
                "1-eps): equal to SwAV in inference mode only"
            )
        else:
            raise common.ConversionError(
                f"projection head layer {lin} has no BatchNorm: our projection head needs one"
            )
    if "prototypes.weight" in state:
        a.put("params/method_head/prototypes/kernel", "prototypes.weight", dense_kernel)
        k = int(state["prototypes.weight"].shape[0])
        notes["method_head"] = {"method": "swav", "num_prototypes": k}
    return notes


def dino_head_fields(state: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Model fields for DINO's head (`head.mlp`, `head.last_layer`) present in `state`, or {}."""
    linears = _linear_layers(state, "head.mlp")
    if not linears:
        return {}
    g_name, v_name = _dino_last_layer_names(state)
    head = DINOHead(
        out_dim=int(state[v_name].shape[0]),
        hidden_dim=int(state[f"{linears[0][0]}.weight"].shape[0]) if len(linears) > 1 else 2048,
        bottleneck_dim=int(state[f"{linears[-1][0]}.weight"].shape[0]),
        num_layers=len(linears),
        use_bn=any(bn is not None for _, bn in linears),
        norm_last_layer=bool(np.all(state[g_name] == 1)),
    )
    return {"method_head": head, "method_head_input": "features", "num_proj_layers": 0}


def _dino_last_layer_names(state: Mapping[str, np.ndarray]) -> tuple[str, str]:
    """(g, v) of the weight-normalised last layer (old weight_norm or parametrizations)."""
    for g, v in (("weight_g", "weight_v"), ("weight.original0", "weight.original1")):
        p = "head.last_layer." + ("parametrizations." if g.startswith("weight.") else "")
        if p + g in state and p + v in state:
            return p + g, p + v
    raise common.ConversionError("DINO head without a weight-normalised head.last_layer")


def map_dino_head(a: _Assignment, state: Mapping[str, np.ndarray], head: DINOHead) -> dict:
    """DINO head -> our DINOHead (methods/dino.py); returns notes."""
    linears = _linear_layers(state, "head.mlp")
    for j, (lin, bn) in enumerate(linears):
        a.put(f"params/method_head/mlp_{j}/kernel", f"{lin}.weight", dense_kernel)
        if bn is not None and j < len(linears) - 1:
            _put_bn(a, f"method_head/bn_{j}", bn, fold_bias=f"{lin}.bias")
        elif bn is None:
            a.put(f"params/method_head/mlp_{j}/bias", f"{lin}.bias")
        else:
            raise common.ConversionError(f"DINO head: BatchNorm {bn} after the last Linear")
    g_name, v_name = _dino_last_layer_names(state)
    a.put("params/method_head/kernel", v_name, dense_kernel)
    if head.norm_last_layer:
        a.consume(g_name, "weight_g == 1 (norm_last_layer)")
    else:
        a.put("params/method_head/gain", g_name, lambda g: np.reshape(g, -1))
    names = ("out_dim", "hidden_dim", "bottleneck_dim", "num_layers", "use_bn", "norm_last_layer")
    return {"method_head": {"method": "dino", **{f: getattr(head, f) for f in names}}}


def _supervised(state: Mapping[str, np.ndarray], name: str) -> int:
    """Classes of a Linear classifier `name` ('fc', 'head'), 0 when absent."""
    w = state.get(f"{name}.weight")
    return int(w.shape[0]) if w is not None and np.ndim(w) == 2 else 0


# --- backbones ------------------------------------------------------------------------------


def describe_resnet(state: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Depth, width and block type of a torchvision-layout ResNet state dict."""
    if "conv1.weight" not in state:
        raise common.ConversionError(
            f"not a torchvision ResNet: no conv1.weight (keys start {sorted(state)[:5]})"
        )
    blocks = tuple(
        len({m[1] for k in state if (m := re.match(rf"layer{g}\.(\d+)\.", k))}) for g in range(1, 5)
    )
    bottleneck = "layer1.0.conv3.weight" in state
    kind = BOTTLENECK_DEPTHS if bottleneck else set(BLOCK_SIZES) - BOTTLENECK_DEPTHS
    depth = next((d for d in kind if BLOCK_SIZES[d] == blocks), None)
    width = state["conv1.weight"].shape[0] / 64
    return {"depth": depth, "blocks": blocks, "bottleneck": bottleneck, "width": width}


def check_resnet_variant(state: Mapping[str, np.ndarray], variant: str) -> dict[str, Any]:
    """The variant's fields, after refusing a source of another depth / width / kind."""
    v = get_variant(variant)
    if "vit" in v:
        raise common.ConversionError(
            f"variant {variant!r} is a ViT; a torchvision ResNet needs r{{depth}}_{{w}}x_sk0"
        )
    src = describe_resnet(state)
    name = f"ResNet-{src['depth']}" if src["depth"] else f"ResNet with {src['blocks']} blocks"
    if v["sk_ratio"] > 0:
        raise common.ConversionError(
            f"variant {variant!r} has selective kernels; torchvision ResNets have none: use sk0"
        )
    if not src["bottleneck"] or v["depth"] not in BOTTLENECK_DEPTHS:
        raise common.ConversionError(
            "only bottleneck ResNets (50/101/152/200) convert: torchvision's ResNet-18/34 have "
            "no projection shortcut in layer1 where SimCLR's ResNet has one"
        )
    if src["depth"] != v["depth"]:
        raise common.ConversionError(
            f"the source is a {name} (blocks per stage {src['blocks']}) but variant {variant!r} "
            f"is a ResNet-{v['depth']} {BLOCK_SIZES[v['depth']]}"
        )
    if abs(src["width"] - v["width_multiplier"]) > 1e-9:
        raise common.ConversionError(
            f"the source {name} has width {src['width']:g}x (stem {64 * src['width']:g} "
            f"channels) but variant {variant!r} has {v['width_multiplier']}x"
        )
    return v


def map_resnet(a: _Assignment, v: dict[str, Any]) -> None:
    """torchvision ResNet backbone (bottleneck) -> params/backbone, batch_stats/backbone."""
    a.put("params/backbone/stem_conv0/kernel", "conv1.weight", conv_kernel)
    _put_bn(a, "backbone/stem_bn0", "bn1")
    for g, n in enumerate(BLOCK_SIZES[v["depth"]], start=1):
        for b in range(n):
            src, tgt = f"layer{g}.{b}", f"backbone/group{g}_block{b}"
            for i in (1, 2, 3):
                a.put(f"params/{tgt}/conv{i}/kernel", f"{src}.conv{i}.weight", conv_kernel)
                _put_bn(a, f"{tgt}/bn{i}", f"{src}.bn{i}")
            if b == 0:
                a.put(
                    f"params/{tgt}/shortcut_conv/kernel", f"{src}.downsample.0.weight", conv_kernel
                )
                _put_bn(a, f"{tgt}/shortcut_bn", f"{src}.downsample.1")


def check_vit_variant(state: Mapping[str, np.ndarray], variant: str) -> dict[str, Any]:
    """The ViT config of `variant`, after refusing a source of another size."""
    if variant not in VIT_CONFIGS:
        raise common.ConversionError(
            f"format dino_vit needs a ViT variant {sorted(VIT_CONFIGS)}, got {variant!r}"
        )
    cfg = VIT_CONFIGS[variant]
    for k in ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight"):
        if k not in state:
            raise common.ConversionError(f"not a DINO ViT state dict: no {k!r}")
    grid = VisionTransformer.ref_grid  # pos_embed stored for 224 px at patch 16
    depth = len({m[1] for k in state if (m := re.match(r"blocks\.(\d+)\.", k))})
    hidden = mlp_hidden_dim(cfg["dim"], cfg["mlp_ratio"])
    pairs = {  # name: (source, variant)
        "dim": (state["cls_token"].shape[-1], cfg["dim"]),
        "depth": (depth, cfg["depth"]),
        "patch_size": (state["patch_embed.proj.weight"].shape[-1], cfg["patch_size"]),
        "mlp_hidden": (state["blocks.0.mlp.fc1.weight"].shape[0], hidden),
        "pos_tokens": (state["pos_embed"].shape[1], 1 + grid * grid),
    }
    diff = {k: (int(s), w) for k, (s, w) in pairs.items() if int(s) != w}
    if diff:
        raise common.ConversionError(
            f"the source ViT does not match variant {variant!r}: "
            + ", ".join(f"{k} {s} (variant {w})" for k, (s, w) in diff.items())
        )
    return cfg


def map_vit(a: _Assignment, depth: int) -> None:
    """DINO ViT backbone -> params/backbone."""
    a.put("params/backbone/cls_token", "cls_token")
    a.put("params/backbone/pos_embed", "pos_embed")
    a.put("params/backbone/patch_embed/kernel", "patch_embed.proj.weight", conv_kernel)
    a.put("params/backbone/patch_embed/bias", "patch_embed.proj.bias")
    norms = [f"block_{i}/{n}" for i in range(depth) for n in ("norm1", "norm2")] + ["norm"]
    for tgt in norms:  # LayerNorm weight -> scale
        src = tgt.replace("block_", "blocks.").replace("/", ".")
        a.put(f"params/backbone/{tgt}/scale", f"{src}.weight")
        a.put(f"params/backbone/{tgt}/bias", f"{src}.bias")
    for i in range(depth):
        for lin in ("attn/qkv", "attn/proj", "mlp/fc1", "mlp/fc2"):
            src = f"blocks.{i}.{lin.replace('/', '.')}"
            a.put(f"params/backbone/block_{i}/{lin}/kernel", f"{src}.weight", dense_kernel)
            a.put(f"params/backbone/block_{i}/{lin}/bias", f"{src}.bias")


# --- entry points ---------------------------------------------------------------------------


def convert_state_dict(
    state: Mapping[str, np.ndarray],
    variant: str,
    *,
    fmt: str,
    source: str = "<state dict>",
    drop_heads: bool = False,
    notes: dict | None = None,
) -> common.Converted:
    """Map a flat torch state dict (prefixes already removed) onto `variant`; every source
    array must be used exactly once (num_batches_tracked excepted), else ConversionError."""
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    notes = dict(notes or {})
    state = {k: np.asarray(v) for k, v in state.items()}
    if drop_heads:
        dropped = sorted(k for k in state if k.startswith(METHOD_HEAD_PREFIXES))
        state = {k: v for k, v in state.items() if k not in dropped}
        if dropped:
            notes["dropped"] = dropped
    resnet = fmt == "torch_resnet"
    v = check_resnet_variant(state, variant) if resnet else check_vit_variant(state, variant)
    fields: dict[str, Any] = {"num_proj_layers": 0}
    fields.update(swav_heads(state) if resnet else {})
    dino = dino_head_fields(state)
    if dino and "method_head" in fields:
        raise common.ConversionError("both SwAV prototypes and a DINO head: not one method")
    fields.update(dino)
    classifier = "fc" if resnet else "head"
    num_classes = _supervised(state, classifier)
    # config_lib checks a restored projection head against these (as tf_simclr records them).
    notes.update(num_classes=num_classes, num_proj_layers=fields["num_proj_layers"])
    if fields["num_proj_layers"]:
        notes["proj_out_dim"] = fields["proj_out_dim"]
    model = create_model(
        variant,
        num_classes=num_classes,
        torch_maxpool=resnet,
        input_norm="imagenet",
        dtype=jnp.float32,
        **fields,
    )
    a = _Assignment(
        state,
        common.target_shapes(model),
        ignore=lambda n: n.endswith("num_batches_tracked"),
        what=f"{fmt} checkpoint",
    )
    if resnet:
        map_resnet(a, v)
        notes.update(map_swav_heads(a, state))
    else:
        map_vit(a, v["depth"])
        notes["num_heads"] = v["num_heads"]
    if dino:
        notes.update(map_dino_head(a, state, fields["method_head"]))
    if num_classes:
        a.put("params/supervised_head/dense/kernel", f"{classifier}.weight", dense_kernel)
        a.put("params/supervised_head/dense/bias", f"{classifier}.bias")
    params, batch_stats = a.finish()
    return common.Converted(
        params=params,
        batch_stats=batch_stats,
        variant=variant,
        source=source,
        format=fmt,
        input_norm="imagenet",
        torch_maxpool=resnet,
        notes=notes,
    )


OPTIONS = ("checkpoint_key", "drop_heads")  # the command-line options this reader takes


def convert(
    source: str,
    variant: str,
    *,
    fmt: str,
    checkpoint_key: str | None = None,
    drop_heads: bool = False,
) -> common.Converted:
    """Read the `.pth` file `source` (DINO full checkpoints: the teacher unless
    `checkpoint_key='student'`) and convert it to `variant` (see module docstring)."""
    state, info = torch_pickle.extract_state_dict(torch_pickle.load(source), checkpoint_key)
    return convert_state_dict(
        state, variant, fmt=fmt, source=source, drop_heads=drop_heads, notes=info
    )
