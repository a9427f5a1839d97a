"""DINO (Caron et al. 2021): self-distillation with an EMA teacher, centring and sharpening.

The student sees every crop; the teacher (EMA of the student, momentum cosine 0.996 -> 1) sees
the two global crops. Teacher outputs are centred (centre = EMA 0.9 of their GLOBAL batch
mean) and sharpened (temperature warmed up 0.04 -> 0.07); each teacher crop supervises every
student crop except itself (student temperature 0.1). The teacher runs in training mode, so its
BatchNorm uses batch statistics and keeps its own running averages (as DINO's teacher does).
Its parameters and statistics live in `TrainState.extra['teacher']`; the teacher is what
DINO evaluates, so warm starts from a DINO checkpoint take the teacher's backbone.

Our reading, documented: the temperature warm-up and the last-layer freeze are linear / step
functions of the (fractional) epoch rather than of integer epochs. While frozen, the last layer
(and its learned gain) gets no update, weight decay included, and its optimiser state stays as
it was (PyTorch skips a parameter whose grad is None); Adam's step count is optax's single one,
so its bias correction after the freeze is that of the global step.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from medssl_jax import config_lib, losses
from medssl_jax.methods import base
from medssl_jax.methods.simclr import add_probe, probe_classes

trunc_normal = nn.initializers.truncated_normal(stddev=0.02)


class DINOHead(nn.Module):
    """MLP (GELU) -> bottleneck -> L2-normalise -> weight-normalised linear layer to `out_dim`.

    With `norm_last_layer` the last layer's weight columns are unit-normalised (weight_g
    fixed to 1, as DINO's default); otherwise a learned per-output gain multiplies them.
    """

    out_dim: int
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    num_layers: int = 3
    use_bn: bool = False
    norm_last_layer: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = x.astype(jnp.float32)
        for i in range(self.num_layers):
            last = i == self.num_layers - 1
            x = nn.Dense(
                self.bottleneck_dim if last else self.hidden_dim,
                # A bias before BatchNorm only gets round-off gradients, which Adam would
                # amplify into real steps: none there.
                use_bias=last or not self.use_bn,
                kernel_init=trunc_normal,
                dtype=jnp.float32,
                name=f"mlp_{i}",
            )(x)
            if not last:
                if self.use_bn:
                    x = nn.BatchNorm(
                        use_running_average=not train, momentum=0.9, epsilon=1e-5, name=f"bn_{i}"
                    )(x)
                x = nn.gelu(x, approximate=False)
        x = losses.l2_normalize(x)  # [B, bottleneck]
        v = self.param("kernel", trunc_normal, (self.bottleneck_dim, self.out_dim))
        w = v / jnp.linalg.norm(v, axis=0, keepdims=True)
        if not self.norm_last_layer:
            w = w * self.param("gain", nn.initializers.ones, (self.out_dim,))
        return x @ w  # [B, out_dim]


def dino_loss(
    student: list[jax.Array],
    teacher: list[jax.Array],
    center: jax.Array,
    student_temp: float,
    teacher_temp: jax.Array | float,
) -> tuple[jax.Array, jax.Array]:
    """Cross-entropy of every student crop against every OTHER teacher crop.

    student: per crop [B, K] logits (global crops first, in the teacher's order);
    teacher: per global crop [B, K]; center [K]. Returns (loss, teacher probabilities [2, B, K]).
    """
    t = [
        jax.nn.softmax((jax.lax.stop_gradient(x) - center) / teacher_temp, axis=-1) for x in teacher
    ]
    logp = [jax.nn.log_softmax(s.astype(jnp.float32) / student_temp, axis=-1) for s in student]
    total, n = 0.0, 0
    for iq, q in enumerate(t):
        for v, lp in enumerate(logp):
            if v == iq:
                continue
            total = total + jnp.mean(jnp.sum(-q * lp, axis=-1))
            n += 1
    return total / n, jnp.stack(t)


def next_center(center: jax.Array, teacher: list[jax.Array], momentum: float) -> jax.Array:
    """EMA of the teacher outputs' mean over the global batch and both global crops."""
    batch_center = jnp.mean(jnp.concatenate(teacher).astype(jnp.float32), axis=0)
    return center * momentum + jax.lax.stop_gradient(batch_center) * (1 - momentum)


def teacher_momentum(step: jax.Array, total_steps: int, base_momentum: float) -> jax.Array:
    """Cosine from `base_momentum` at step 0 to 1 at the last step."""
    frac = step.astype(jnp.float32) / max(total_steps, 1)
    return 1.0 - (1.0 - base_momentum) * (jnp.cos(math.pi * frac) + 1.0) / 2.0


def teacher_temperature(step: jax.Array, warmup_steps: int, start: float, end: float) -> jax.Array:
    """Linear from `start` to `end` over `warmup_steps`, then `end`."""
    if warmup_steps <= 0:
        return jnp.asarray(end, jnp.float32)
    frac = jnp.minimum(step.astype(jnp.float32) / warmup_steps, 1.0)
    return start + (end - start) * frac


def dino_defaults() -> ml_collections.ConfigDict:
    d = ml_collections.ConfigDict()
    d.out_dim = 65536
    d.hidden_dim = 2048
    d.bottleneck_dim = 256
    d.num_layers = 3
    d.use_bn_in_head = False
    d.norm_last_layer = True
    d.student_temp = 0.1
    d.warmup_teacher_temp = 0.04
    d.teacher_temp = 0.07
    d.warmup_teacher_temp_epochs = 30.0
    d.momentum_teacher = 0.996
    d.center_momentum = 0.9
    d.freeze_last_layer_epochs = 1.0
    return d


class DINO(base.Method):
    name = "dino"

    def defaults(self):
        return dino_defaults()

    def validate(self, config, require) -> None:
        d = config.dino
        for f in ("out_dim", "hidden_dim", "bottleneck_dim"):
            require(int(d[f]) >= 1, f"dino.{f}", "must be >= 1")
        require(int(d.num_layers) >= 1, "dino.num_layers", "must be >= 1")
        for f in ("student_temp", "warmup_teacher_temp", "teacher_temp"):
            require(float(d[f]) > 0, f"dino.{f}", "must be > 0")
        for f in ("momentum_teacher", "center_momentum"):
            require(0.0 <= float(d[f]) <= 1.0, f"dino.{f}", "must be in [0, 1]")
        for f in ("freeze_last_layer_epochs", "warmup_teacher_temp_epochs"):
            require(float(d[f]) >= 0, f"dino.{f}", "must be >= 0")
        require(
            int(config.model.num_proj_layers) == 0,
            "model.num_proj_layers",
            "DINO's head is its own (config.dino); set num_proj_layers=0",
        )
        base.validate_crops(config, require)

    def views(self, config) -> base.Views:
        return base.crops_from_config(config)

    def build(self, config, *, num_classes, label_kind, total_steps, steps_per_epoch):
        d = config.dino
        head = DINOHead(
            out_dim=int(d.out_dim),
            hidden_dim=int(d.hidden_dim),
            bottleneck_dim=int(d.bottleneck_dim),
            num_layers=int(d.num_layers),
            use_bn=bool(d.use_bn_in_head),
            norm_last_layer=bool(d.norm_last_layer),
        )
        kw = dict(method_head=head, method_head_input="features", head_stop_gradient=True)
        model = config_lib.model_from_config(
            config, num_classes=probe_classes(config, num_classes, label_kind), **kw
        )
        teacher_model = config_lib.model_from_config(config, num_classes=0, **kw)
        k = int(d.out_dim)
        temp_warmup = int(round(float(d.warmup_teacher_temp_epochs) * steps_per_epoch))
        freeze_steps = int(round(float(d.freeze_last_layer_epochs) * steps_per_epoch))

        def student_part(tree):
            return {n: v for n, v in tree.items() if n != "supervised_head"}

        def init_extra(params, batch_stats):
            teacher = {"params": student_part(params), "batch_stats": student_part(batch_stats)}
            return {"teacher": teacher, "center": jnp.zeros((k,), jnp.float32)}

        def loss_fn(params, batch_stats, extra, batch, rng, step):
            views = batch["views"]  # [B, 2, S, S, 3]
            b = views.shape[0]
            x_global = base.flatten_views(views)
            g, batch_stats = base.apply_model(model, params, batch_stats, x_global)
            student = [g["head"].reshape(b, 2, k)[:, i] for i in range(2)]
            if "local_views" in batch:
                n_local = batch["local_views"].shape[1]
                loc, batch_stats = base.apply_model(
                    model, params, batch_stats, base.flatten_views(batch["local_views"])
                )
                student += [loc["head"].reshape(b, n_local, k)[:, v] for v in range(n_local)]
            t_vars = extra["teacher"]
            t_out, t_stats = base.apply_model(
                teacher_model, t_vars["params"], t_vars["batch_stats"], x_global
            )
            t_head = jax.lax.stop_gradient(t_out["head"]).reshape(b, 2, k)
            teacher = [t_head[:, 0], t_head[:, 1]]
            temp = teacher_temperature(
                step, temp_warmup, float(d.warmup_teacher_temp), float(d.teacher_temp)
            )
            loss, t_probs = dino_loss(
                student, teacher, extra["center"], float(d.student_temp), temp
            )
            t_flat = t_probs.reshape(-1, k)
            metrics = {
                "dino_loss": loss,
                "teacher_temp": temp,
                "assign_entropy": base.mean_assignment_entropy(t_flat),
                "sample_entropy": base.mean_sample_entropy(t_flat),  # teacher outputs
                "embed_spread": base.embedding_spread(g["features"]),
            }
            loss = add_probe(loss, g, batch, label_kind, 2, metrics)
            new_extra = {
                "teacher": {"params": t_vars["params"], "batch_stats": t_stats},
                "center": next_center(extra["center"], teacher, float(d.center_momentum)),
            }
            return loss, (metrics, batch_stats, new_extra)

        def post_update(params, extra, step):
            m = teacher_momentum(step, total_steps, float(d.momentum_teacher))
            t = extra["teacher"]
            new_t = jax.tree.map(
                lambda tp, sp: m * tp + (1 - m) * sp, t["params"], student_part(params)
            )
            return params, {**extra, "teacher": {**t, "params": new_t}}

        return base.Parts(
            model=model,
            loss=loss_fn,
            init_extra=init_extra,
            frozen=base.Frozen((("method_head", "kernel"), ("method_head", "gain")), freeze_steps),
            post_update=post_update,
            check_collapse=lambda m: base.collapse_warning(m, num_outputs=k),
        )


base.register(DINO())
