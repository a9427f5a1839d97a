"""An independent TensorFlow forward pass of SimCLR's ResNet and heads (REFERENCE.md), with
random weights and non-trivial BN statistics, and writers that save it under the variable
naming of SimCLR's releases: TF1 name-based checkpoints (v1, v2 with `/Momentum` slots and an
`ema_model/` copy), TF2 tf.train.Checkpoint and SavedModel (object paths of tf2/resnet.py and
tf2/model.py, mirrored with tf.Modules: Keras 2 tracks layers by attribute name, lists by
index, exactly as tf.Module does; Keras 3 here has no such layers).
"""

from __future__ import annotations

import collections
import dataclasses
import os

import numpy as np
import tensorflow as tf

EPS = 1e-5
BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
NON_TRAINABLE = ("moving_mean", "moving_variance")


@dataclasses.dataclass
class Layer:
    kind: str  # conv | bn | dense
    scope: str  # TF1 scope: base_model, head_contrastive/nl_0, head_supervised/linear_layer
    tf2: str  # object path under the TF2 Keras model
    values: dict[str, np.ndarray]


class SimCLRNet:
    """SimCLR ResNet (bottleneck) + projection head + linear head in TF ops, inference BN.

    The first forward pass creates the layers (in TF creation order) from `seed`; later
    passes reuse them. `kernel_scale` multiplies conv kernels (and BN statistics to match),
    as SimCLRv1's ~16.8x larger kernels.
    """

    def __init__(
        self,
        depth: int,
        width: float,
        sk: bool,
        *,
        num_proj_layers: int = 3,
        proj_out_dim: int = 16,
        num_classes: int = 5,
        seed: int = 0,
        kernel_scale: float = 1.0,
        image_size: int = 48,
    ):
        self.depth, self.width, self.sk = depth, width, sk
        self.num_proj_layers, self.proj_out_dim, self.num_classes = (
            num_proj_layers,
            proj_out_dim,
            num_classes,
        )
        self.rng = np.random.default_rng(seed)
        self.kernel_scale = kernel_scale
        self.layers: list[Layer] = []
        self._next = 0
        self(np.zeros((1, image_size, image_size, 3), np.float32))

    # ---- parameters -----------------------------------------------------------------------
    def _layer(self, kind: str, scope: str, tf2: str, make) -> dict[str, np.ndarray]:
        if self._next == len(self.layers):
            self.layers.append(Layer(kind, scope, tf2, make()))
        layer = self.layers[self._next]
        assert (layer.kind, layer.tf2) == (kind, tf2), (layer.tf2, tf2)
        self._next += 1
        return layer.values

    def conv(self, x, filters: int, k: int, stride: int, tf2: str):
        """Bias-free conv: fixed padding + VALID when strided, else SAME."""
        cin = int(x.shape[-1])
        w = self._layer(
            "conv",
            "base_model",
            tf2,
            lambda: {
                "kernel": (
                    self.rng.normal(size=(k, k, cin, filters)) / np.sqrt(k * k * cin)
                ).astype(np.float32)
                * np.float32(self.kernel_scale)
            },
        )["kernel"]
        if stride > 1:
            x = tf.pad(x, [[0, 0], [(k - 1) // 2, k // 2], [(k - 1) // 2, k // 2], [0, 0]])
        return tf.nn.conv2d(x, w, stride, "VALID" if stride > 1 else "SAME")

    def bn(self, x, tf2: str, *, relu=True, center=True, last=False, scope="base_model"):
        c = int(x.shape[-1])
        s = self.kernel_scale if scope == "base_model" else 1.0

        def make():
            r = self.rng
            v = {"gamma": r.uniform(0.1, 0.4, c) if last else r.uniform(0.6, 1.4, c)}
            if center:
                v["beta"] = r.normal(0, 0.2, c)
            v["moving_mean"] = r.normal(0, 0.3, c) * s
            v["moving_variance"] = r.uniform(0.4, 1.6, c) * s * s
            return {n: a.astype(np.float32) for n, a in v.items()}

        v = self._layer("bn", scope, tf2, make)
        x = tf.nn.batch_normalization(
            x, v["moving_mean"], v["moving_variance"], v.get("beta"), v["gamma"], EPS
        )
        return tf.nn.relu(x) if relu else x

    def dense(self, x, units: int, tf2: str, scope: str, bias: bool):
        cin = int(x.shape[-1])

        def make():
            v = {"kernel": self.rng.normal(size=(cin, units)) / np.sqrt(cin)}
            if bias:
                v["bias"] = self.rng.normal(0, 0.2, units)
            return {n: a.astype(np.float32) for n, a in v.items()}

        v = self._layer("dense", scope, tf2, make)
        y = tf.matmul(x, v["kernel"])
        return y + v["bias"] if bias else y

    # ---- network ---------------------------------------------------------------------------
    def sk_conv(self, x, f: int, stride: int, p: str):
        x = self.conv(x, 2 * f, 3, stride, f"{p}/conv2d_fixed_padding/conv2d")
        x = self.bn(x, f"{p}/batch_norm_relu/bn")
        a, b = tf.split(x, 2, axis=-1)
        g = tf.reduce_mean(a + b, [1, 2], keepdims=True)
        g = self.conv(g, max(int(f * 0.0625), 32), 1, 1, f"{p}/conv2d_0")
        g = self.bn(g, f"{p}/batch_norm_relu_1/bn")
        m = tf.nn.softmax(tf.stack(tf.split(self.conv(g, 2 * f, 1, 1, f"{p}/conv2d_1"), 2, -1)), 0)
        return a * m[0] + b * m[1]

    def block(self, x, f: int, stride: int, projection: bool, p: str):
        shortcut = x
        if projection:
            q = f"{p}/projection_layers"
            if self.sk:  # ResNet-D: [FixedPadding,] AveragePooling2D, conv 1x1, BN
                if stride > 1:
                    pooled = tf.nn.avg_pool2d(
                        tf.pad(x, [[0, 0], [0, 1], [0, 1], [0, 0]]), 2, 2, "VALID"
                    )
                else:
                    pooled = tf.nn.avg_pool2d(x, 2, 1, "SAME")
                i = 2 if stride > 1 else 1
                shortcut = self.conv(pooled, 4 * f, 1, 1, f"{q}/{i}/conv2d")
                shortcut = self.bn(shortcut, f"{q}/{i + 1}/bn", relu=False)
            else:
                shortcut = self.conv(x, 4 * f, 1, stride, f"{q}/0/conv2d")
                shortcut = self.bn(shortcut, f"{q}/1/bn", relu=False)
        q = f"{p}/conv_relu_dropblock_layers"
        y = self.bn(self.conv(x, f, 1, 1, f"{q}/0/conv2d"), f"{q}/1/bn")
        if self.sk:  # [2 DropBlock, 3 SK_Conv2D, 4 DropBlock, 5 conv, 6 BN]
            y, i = self.sk_conv(y, f, stride, f"{q}/3"), 5
        else:  # [2 DropBlock, 3 conv, 4 BN, 5 DropBlock, 6 conv, 7 BN]
            y, i = self.bn(self.conv(y, f, 3, stride, f"{q}/3/conv2d"), f"{q}/4/bn"), 6
        y = self.conv(y, 4 * f, 1, 1, f"{q}/{i}/conv2d")
        y = self.bn(y, f"{q}/{i + 1}/bn", relu=False, last=True)
        return tf.nn.relu(y + shortcut)

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        self._next = 0
        x = tf.constant(images, tf.float32)
        w = self.width
        s = "resnet_model/initial_conv_relu_max_pool"
        if self.sk:  # [0 conv, 1 BN, 2 conv, 3 BN, 4 conv, 5 Identity, 6 BN, 7 MaxPool]
            x = self.bn(self.conv(x, int(32 * w), 3, 2, f"{s}/0/conv2d"), f"{s}/1/bn")
            x = self.bn(self.conv(x, int(32 * w), 3, 1, f"{s}/2/conv2d"), f"{s}/3/bn")
            x = self.bn(self.conv(x, int(64 * w), 3, 1, f"{s}/4/conv2d"), f"{s}/6/bn")
        else:  # [0 conv, 1 Identity, 2 BN, 3 MaxPool, 4 Identity]
            x = self.bn(self.conv(x, int(64 * w), 7, 2, f"{s}/0/conv2d"), f"{s}/2/bn")
        x = tf.nn.max_pool2d(x, 3, 2, "SAME")
        for g, n in enumerate(BLOCKS[self.depth]):
            for b in range(n):
                stride = 1 if g == 0 or b > 0 else 2
                p = f"resnet_model/block_groups/{g}/layers/{b}"
                x = self.block(x, int(64 * 2**g * w), stride, b == 0, p)
        features = tf.reduce_mean(x, [1, 2])
        h = features
        for j in range(self.num_proj_layers):
            last = j == self.num_proj_layers - 1
            scope, p = f"head_contrastive/nl_{j}", f"_projection_head/linear_layers/{j}"
            dim = self.proj_out_dim if last else int(h.shape[-1])
            h = self.dense(h, dim, f"{p}/dense", scope, bias=False)
            h = self.bn(h, f"{p}/bn_relu/bn", relu=not last, center=not last, scope=scope)
        out = {"features": features.numpy(), "projection": h.numpy()}
        if self.num_classes:
            scope = "head_supervised/linear_layer"
            logits = self.dense(
                features, self.num_classes, "supervised_head/linear_layer/dense", scope, True
            )
            out["logits"] = logits.numpy()
        return out


# ---- writers ---------------------------------------------------------------------------------
def tf1_names(net: SimCLRNet, prefix: str = "") -> dict[str, np.ndarray]:
    """name -> array under SimCLR TF1 naming (tf.layers auto-numbering in base_model)."""
    counts: collections.Counter = collections.Counter()
    out = {}
    for layer in net.layers:
        base = {"conv": "conv2d", "bn": "batch_normalization", "dense": "dense"}[layer.kind]
        name = base
        if layer.scope == "base_model":
            name = base if counts[base] == 0 else f"{base}_{counts[base]}"
            counts[base] += 1
        for leaf, a in layer.values.items():
            out[f"{prefix}{layer.scope}/{name}/{leaf}"] = a
    return out


def save_tf1(
    prefix: str, arrays: dict[str, np.ndarray], *, momentum: bool, saver: bool = False
) -> str:
    """Write `arrays` (plus global_step and, when `momentum`, random `/Momentum` slots of
    the trainable ones outside ema_model/) as a name-based TF1 checkpoint.

    `saver`: build the variables in a tf.compat.v1 graph and save with
    tf.compat.v1.train.Saver, as SimCLR's Estimator did; otherwise run SaveV2, the op that
    Saver runs, directly (same files, seconds faster for a thousand variables).
    """
    rng = np.random.default_rng(1)
    arrays = dict(arrays)
    for name, a in list(arrays.items()):
        if momentum and not name.endswith(NON_TRAINABLE) and not name.startswith("ema_model/"):
            arrays[f"{name}/Momentum"] = rng.normal(size=a.shape).astype(np.float32)
    arrays["global_step"] = np.int64(250228)
    if not saver:
        names = sorted(arrays)
        tf.io.gfile.makedirs(os.path.dirname(prefix))
        tf.raw_ops.SaveV2(
            prefix=prefix,
            tensor_names=names,
            shape_and_slices=[""] * len(names),
            tensors=[arrays[n] for n in names],
        )
        tf.compat.v1.train.update_checkpoint_state(os.path.dirname(prefix), prefix)
        return prefix
    with tf.Graph().as_default():
        var_list = {
            n: tf.compat.v1.Variable(a, name=f"v{i}") for i, (n, a) in enumerate(arrays.items())
        }
        with tf.compat.v1.Session() as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            return tf.compat.v1.train.Saver(var_list=var_list).save(sess, prefix)


def _module(tree):
    """Nested dict -> tf.Module attributes (dicts keyed 0..n -> lists, gaps as empty layers)."""
    if tree and all(k.isdigit() for k in tree):
        return [_module(tree.get(str(i), {})) for i in range(max(map(int, tree)) + 1)]
    m = tf.Module()
    for k, v in tree.items():
        if isinstance(v, np.ndarray):
            setattr(m, k, tf.Variable(v, trainable=k not in NON_TRAINABLE))
        else:
            setattr(m, k, _module(v))
    return m


def tf2_model(net: SimCLRNet) -> tf.Module:
    """The Keras model's trackable tree (resnet_model, _projection_head, supervised_head)."""
    tree: dict = {}
    for layer in net.layers:
        node = tree
        for part in layer.tf2.split("/"):
            node = node.setdefault(part, {})
        node.update(layer.values)
    return _module(tree)


def save_tf2_checkpoint(prefix: str, net: SimCLRNet) -> str:
    """tf.train.Checkpoint(model=..., global_step=..., optimizer=...) as tf2/run.py writes."""
    optimizer = tf.Module()
    optimizer.iter = tf.Variable(np.int64(10))
    ckpt = tf.train.Checkpoint(
        model=tf2_model(net), global_step=tf.Variable(np.int64(10)), optimizer=optimizer
    )
    return ckpt.write(prefix)


def save_tf2_saved_model(path: str, net: SimCLRNet) -> str:
    """SavedModel of tf2/run.py's `SimCLRModel(tf.Module)`: `model` plus the
    `trainable_variables_list` (so trainable variables get the shorter list keys)."""
    root = tf.Module()
    root.model = tf2_model(net)
    root.trainable_variables_list = list(root.model.trainable_variables)
    tf.saved_model.save(root, path)
    return path
