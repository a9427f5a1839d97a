"""Where the variables of a SimCLR network sit in TensorFlow checkpoints, per release format.

Readers return a `Layout`: the backbone's conv kernels and BatchNorms in TF creation order
(the call order of our Flax model), the projection-head layers, the supervised head and the
shapes of every source array that must be used (optimiser slots, step counters and the copy
not asked for are left out). Names follow google-research/simclr:

* TF1 (`resnet.py`, `model_util.py`, `model.py`): `tf.layers` auto-numbering inside the
  `base_model` scope: `base_model/conv2d[_N]/kernel`, `base_model/batch_normalization[_N]/
  {gamma,beta,moving_mean,moving_variance}`; `head_contrastive/nl_{j}/dense/kernel` and
  `head_contrastive/nl_{j}/batch_normalization/...` (the last layer's BN has no beta; the
  'linear' head mode is one layer `l_0`); `head_supervised/linear_layer/dense/{kernel,bias}`;
  `<var>/Momentum` slots, `global_step`; released v2 checkpoints add an `ema_model/` copy.
* TF2 (`tf2/resnet.py`, `tf2/model.py`, `tf2/run.py`): object-based checkpoints of Keras
  layers, tracked by attribute name (lists by index) under `model/`: `resnet_model/
  initial_conv_relu_max_pool/{i}`, `resnet_model/block_groups/{g}/layers/{b}/
  {projection_layers,conv_relu_dropblock_layers}/{i}` (basic blocks: `shortcut_layers`,
  `conv2d_bn_layers`), Conv2dFixedPadding -> `conv2d/kernel`, BatchNormRelu -> `bn/...`,
  SK_Conv2D -> `conv2d_fixed_padding/conv2d`, `batch_norm_relu/bn`, `conv2d_0`,
  `batch_norm_relu_1/bn`, `conv2d_1`; `_projection_head/linear_layers/{j}/{dense,bn_relu/bn}`,
  `supervised_head/linear_layer/dense`. Exported SavedModels (`SimCLRModel(tf.Module)` with
  `model` and `trainable_variables_list`) store trainable variables under the shorter
  `trainable_variables_list/N` keys, so paths are recovered from the checkpoint's object graph.
"""

from __future__ import annotations

import collections
import dataclasses
import re
from collections.abc import Callable

import numpy as np

from medssl_jax.convert.common import ConversionError

BN_LEAVES = ("gamma", "beta", "moving_mean", "moving_variance")
OBJECT_GRAPH = "_CHECKPOINTABLE_OBJECT_GRAPH"


@dataclasses.dataclass
class Layout:
    """Names of one SimCLR network's arrays in a checkpoint (BNs as prefixes of BN_LEAVES)."""

    shapes: dict[str, tuple[int, ...]]  # every source array the conversion must use
    convs: list[str]  # backbone conv kernels, creation order
    bns: list[str]  # backbone BN prefixes, creation order
    head: list[tuple[str, str]]  # projection head: (dense kernel, BN prefix) per layer
    supervised: tuple[str, str] | None  # (kernel, bias) of the linear classifier
    load: Callable[[list[str]], dict[str, np.ndarray]]
    what: str
    notes: dict = dataclasses.field(default_factory=dict)


def checkpoint_prefix(source: str) -> str:
    """Checkpoint prefix of `source`: a prefix, a folder with a `checkpoint` file, or a
    SavedModel folder (its variables are the checkpoint `DIR/variables/variables`)."""
    import tensorflow as tf

    if tf.io.gfile.isdir(source):
        if tf.io.gfile.exists(f"{source}/saved_model.pb"):
            return f"{source.rstrip('/')}/variables/variables"
        latest = tf.train.latest_checkpoint(source)
        if latest:
            return latest
        raise FileNotFoundError(f"{source!r} holds neither saved_model.pb nor a TF checkpoint")
    if not tf.io.gfile.exists(source + ".index"):
        raise FileNotFoundError(f"no TF checkpoint at {source!r} ({source}.index not found)")
    return source


def _reader(prefix: str):
    import tensorflow as tf

    reader = tf.train.load_checkpoint(prefix)
    shapes = {n: tuple(s) for n, s in reader.get_variable_to_shape_map().items()}
    return reader, shapes


def _number(name: str, pattern: re.Pattern) -> int:
    m = pattern.fullmatch(name)
    return int(m[1] or 0)


_TF1_CONV = re.compile(r"conv2d(?:_(\d+))?")
_TF1_BN = re.compile(r"batch_normalization(?:_(\d+))?")
_TF1_SLOT = re.compile(r"^global_step$|/Momentum(?:_\d+)?$")


def read_tf1(source: str, *, ema: bool) -> Layout:
    """Layout of a SimCLR TF1 name-based checkpoint (v1 or v2); `ema` selects `ema_model/`."""
    prefix = checkpoint_prefix(source)
    reader, all_shapes = _reader(prefix)
    if OBJECT_GRAPH in all_shapes:
        raise ConversionError(
            f"{source!r} is an object-based (TF2) checkpoint: use --format=simclr_v2_tf2"
        )
    has_ema = any(n.startswith("ema_model/") for n in all_shapes)
    if ema and not has_ema:
        raise ConversionError(f"{source!r} has no ema_model/ copy: convert without ema")
    pre = "ema_model/" if ema else ""
    sup = "head_supervised/linear_layer/dense/"
    sup_pre = pre if f"{pre}{sup}kernel" in all_shapes else ""

    def ignored(n: str) -> bool:
        if _TF1_SLOT.search(n):
            return True
        if n.startswith(f"{sup_pre}head_supervised/"):
            return False
        return n.startswith("ema_model/") != ema

    shapes = {n: s for n, s in all_shapes.items() if not ignored(n)}
    base = f"{pre}base_model/"
    layers = {n[len(base) :].split("/")[0] for n in shapes if n.startswith(base)}
    convs = sorted(
        (x for x in layers if _TF1_CONV.fullmatch(x)), key=lambda x: _number(x, _TF1_CONV)
    )
    bns = sorted((x for x in layers if _TF1_BN.fullmatch(x)), key=lambda x: _number(x, _TF1_BN))
    hc = f"{pre}head_contrastive/"
    nl = sorted({int(m[1]) for n in shapes if (m := re.match(rf"{hc}nl_(\d+)/", n))})
    if nl != list(range(len(nl))):
        raise ConversionError(f"projection head layers of {source!r} are not nl_0..: {nl}")
    names = [f"nl_{j}" for j in nl] or (["l_0"] if f"{hc}l_0/dense/kernel" in shapes else [])
    return Layout(
        shapes=shapes,
        convs=[f"{base}{c}/kernel" for c in convs],
        bns=[f"{base}{b}" for b in bns],
        head=[(f"{hc}{j}/dense/kernel", f"{hc}{j}/batch_normalization") for j in names],
        supervised=(
            (f"{sup_pre}{sup}kernel", f"{sup_pre}{sup}bias")
            if f"{sup_pre}{sup}kernel" in shapes
            else None
        ),
        load=lambda ns: {n: reader.get_tensor(n) for n in ns},
        what=f"TF1 checkpoint {prefix!r}" + (" (ema_model/)" if ema else ""),
        notes={"ema": ema, "supervised_head_from_ema": bool(ema and sup_pre)},
    )


_SKIP_CHILD = re.compile(
    r"^(keras_api|optimizer|signatures|_default_save_signature)$|variables|weights|^layer(_with_weights)?-"
)
_TF2_IGNORED = re.compile(
    rf"^({OBJECT_GRAPH}|global_step/|save_counter/|optimizer/)|\.OPTIMIZER_SLOT/"
)


def _model_paths(graph) -> dict[int, str]:
    """node id -> 'model/...' attribute path (breadth first from the root's `model` child,
    through attribute/list-index edges only, never Keras' aliases or variable lists)."""
    root = graph.nodes[0]
    start = [c.node_id for c in root.children if c.local_name == "model"]
    if not start:
        children = sorted(c.local_name for c in root.children)
        raise ConversionError(f"no 'model' object in the checkpoint (root holds {children})")
    paths = {start[0]: "model"}
    queue = collections.deque(start)
    while queue:
        n = queue.popleft()
        for c in graph.nodes[n].children:
            if c.node_id not in paths and not _SKIP_CHILD.search(c.local_name):
                paths[c.node_id] = f"{paths[n]}/{c.local_name}"
                queue.append(c.node_id)
    return paths


_RN = "model/resnet_model/"
_STEM = re.compile(rf"{_RN}initial_conv_relu_max_pool/(\d+)/(.+)")
_BLOCK = re.compile(
    rf"{_RN}block_groups/(\d+)/layers/(\d+)/"
    r"(projection_layers|shortcut_layers|conv_relu_dropblock_layers|conv2d_bn_layers)/(\d+)/(.+)"
)
# Variables inside one list entry, in creation order (SK_Conv2D has five; others one).
_CONV_UNIT = {
    "conv2d/kernel": 0,
    "conv2d_fixed_padding/conv2d/kernel": 0,
    "conv2d_0/kernel": 2,
    "conv2d_1/kernel": 4,
}
_BN_UNIT = {"bn": 0, "batch_norm_relu/bn": 1, "batch_norm_relu_1/bn": 3}
_PH = "model/_projection_head/linear_layers/"


def _unit(name: str) -> tuple[str, str, tuple[int, ...]] | None:
    """('conv' or 'bn', kernel name or BN prefix, creation-order key) of a backbone
    variable, else None."""
    if m := _STEM.fullmatch(name):
        key, rest = (0, 0, 0, 0, int(m[1])), m[2]
    elif m := _BLOCK.fullmatch(name):
        main = m[3] in ("conv_relu_dropblock_layers", "conv2d_bn_layers")
        key, rest = (1, int(m[1]), int(m[2]), int(main), int(m[4])), m[5]
    else:
        return None
    if rest in _CONV_UNIT:
        return "conv", name, (*key, _CONV_UNIT[rest])
    layer, _, leaf = rest.rpartition("/")
    if leaf in BN_LEAVES and layer in _BN_UNIT:
        return "bn", name.rpartition("/")[0], (*key, _BN_UNIT[layer])
    return None


def read_tf2(source: str, *, ema: bool) -> Layout:
    """Layout of a tf.train.Checkpoint or SavedModel written by SimCLR's tf2/ code."""
    from tensorflow.core.protobuf import trackable_object_graph_pb2

    if ema:
        raise ConversionError("simclr_v2_tf2 checkpoints hold no EMA copy: convert without ema")
    prefix = checkpoint_prefix(source)
    reader, all_shapes = _reader(prefix)
    if OBJECT_GRAPH not in all_shapes:
        raise ConversionError(
            f"{source!r} is a name-based (TF1) checkpoint: use --format=simclr_v2_tf1"
        )
    graph = trackable_object_graph_pb2.TrackableObjectGraph()
    graph.ParseFromString(reader.get_tensor(OBJECT_GRAPH))
    paths = _model_paths(graph)
    key_of: dict[str, str] = {}  # our name (model path or raw key) -> checkpoint key
    for node_id, node in enumerate(graph.nodes):
        for attr in node.attributes:
            if attr.name == "VARIABLE_VALUE" and node_id in paths:
                key_of[paths[node_id]] = attr.checkpoint_key
    mapped = set(key_of.values())
    for key in all_shapes:
        if key not in mapped and not _TF2_IGNORED.search(key):
            key_of[key] = key
    shapes = {n: all_shapes[k] for n, k in key_of.items()}
    units: dict[str, dict[str, tuple]] = {"conv": {}, "bn": {}}
    for n in shapes:
        if (u := _unit(n)) is not None:
            units[u[0]][u[1]] = u[2]
    convs, bns = units["conv"], units["bn"]
    nl = sorted({int(m[1]) for n in shapes if (m := re.match(rf"{_PH}(\d+)/", n))})
    if nl != list(range(len(nl))):
        raise ConversionError(f"projection head layers of {source!r} are not 0..: {nl}")
    sup = "model/supervised_head/linear_layer/dense/"
    return Layout(
        shapes=shapes,
        convs=sorted(convs, key=convs.get),
        bns=sorted(bns, key=bns.get),
        head=[(f"{_PH}{j}/dense/kernel", f"{_PH}{j}/bn_relu/bn") for j in nl],
        supervised=(f"{sup}kernel", f"{sup}bias") if f"{sup}kernel" in shapes else None,
        load=lambda ns: {n: reader.get_tensor(key_of[n]) for n in ns},
        what=f"TF2 checkpoint {prefix!r}",
        notes={"ema": False},
    )
