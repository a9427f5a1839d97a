"""SwAV (Caron et al. 2020): swapped prediction of online Sinkhorn cluster codes, multi-crop.

Embeddings z = L2-normalised projections (128-d); scores = z @ prototypes (K columns,
re-normalised after every update). Codes come from the two global crops by Sinkhorn-Knopp
(float32, sums over the GLOBAL batch: under jit the [B, K] scores are the whole batch), and each
code is predicted from every other crop at temperature 0.1. Prototypes stay frozen (no update,
no weight decay, optimiser state held) for the first `freeze_prototypes_epochs`; an optional
queue of past global-crop embeddings enlarges Sinkhorn's batch for small batches.

Our reading, where the reference differs: the projection head is SimCLR's (dense-BN-ReLU-dense-
BN without beta) rather than SwAV's (dense-BN-ReLU-dense with bias); L2 normalisation follows
either way.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from medssl_jax import config_lib, losses
from medssl_jax.methods import base
from medssl_jax.methods.simclr import add_probe, probe_classes

PROTOTYPES = ("method_head", "prototypes", "kernel")


def sinkhorn(scores: jax.Array, epsilon: float, iterations: int) -> jax.Array:
    """Soft equipartitioned codes Q [N, K] (rows sum to 1) from scores [N, K].

    Float32 throughout; the global maximum is subtracted before exp (it cancels in the first
    normalisation) so small epsilons cannot overflow.
    """
    s = scores.astype(jnp.float32) / epsilon
    q = jnp.exp(s - jnp.max(s)).T  # [K, N]
    k, n = q.shape
    q = q / jnp.sum(q)
    for _ in range(iterations):
        q = q / jnp.sum(q, axis=1, keepdims=True) / k  # each prototype gets mass 1/K
        q = q / jnp.sum(q, axis=0, keepdims=True) / n  # each sample gets mass 1/N
    return (q * n).T


def swapped_prediction_loss(
    scores: list[jax.Array], codes: list[jax.Array], temperature: float
) -> jax.Array:
    """SwAV loss: codes[i] (of global crop i) predicted by every crop v != i.

    scores: per crop [B, K] (global crops first); codes: one [B, K] per global crop.
    """
    total = 0.0
    for i, q in enumerate(codes):
        sub = 0.0
        for v, s in enumerate(scores):
            if v == i:
                continue
            logp = jax.nn.log_softmax(s.astype(jnp.float32) / temperature, axis=-1)
            sub = sub - jnp.mean(jnp.sum(q * logp, axis=-1))
        total = total + sub / (len(scores) - 1)
    return total / len(codes)


class Prototypes(nn.Module):
    """L2-normalises its input and scores it against `num_prototypes` prototype columns."""

    num_prototypes: int

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        z = losses.l2_normalize(x.astype(jnp.float32))
        return nn.Dense(
            self.num_prototypes,
            use_bias=False,
            dtype=jnp.float32,
            param_dtype=jnp.float32,
            name="prototypes",
        )(z)  # [B, K]


def normalize_prototypes(params: dict) -> dict:
    """Prototype columns (kernel [D, K]) re-normalised to unit length."""
    kernel = params["method_head"]["prototypes"]["kernel"]
    kernel = kernel / jnp.linalg.norm(kernel, axis=0, keepdims=True)
    head = {**params["method_head"], "prototypes": {"kernel": kernel}}
    return {**params, "method_head": head}


def swav_defaults() -> ml_collections.ConfigDict:
    s = ml_collections.ConfigDict()
    s.num_prototypes = 3000
    s.epsilon = 0.05
    s.sinkhorn_iterations = 3
    s.temperature = 0.1
    s.freeze_prototypes_epochs = 1.0  # SwAV: ~313 iterations at batch 4096 = 1 epoch
    s.queue_length = 0  # 3840 for batch 256 in SwAV; 0 = no queue
    s.queue_start_epoch = 15.0
    return s


def validate_swav(config, require) -> None:
    require("swav" in config, "swav", "missing: SwAV's config section (swav.swav_defaults())")
    s = config.swav
    require(int(s.num_prototypes) >= 2, "swav.num_prototypes", "must be >= 2")
    require(float(s.epsilon) > 0, "swav.epsilon", "must be > 0")
    require(int(s.sinkhorn_iterations) >= 1, "swav.sinkhorn_iterations", "must be >= 1")
    require(float(s.temperature) > 0, "swav.temperature", "must be > 0")
    require(float(s.freeze_prototypes_epochs) >= 0, "swav.freeze_prototypes_epochs", "must be >= 0")
    q, b = int(s.queue_length), int(config.batch_size)
    require(
        q == 0 or (q > 0 and q % b == 0),
        "swav.queue_length",
        f"must be 0 or a positive multiple of batch_size={b}, got {q}",
    )
    require(int(config.model.num_proj_layers) >= 1, "model.num_proj_layers", "SwAV needs >= 1")
    base.validate_crops(config, require)


class SwAVCore:
    """The clustering part shared by SwAV and the hybrid method: model, codes, loss, queue."""

    def __init__(self, config, *, num_classes: int, head_stop_gradient: bool, steps_per_epoch):
        s = config.swav
        self.k = int(s.num_prototypes)
        self.epsilon = float(s.epsilon)
        self.iterations = int(s.sinkhorn_iterations)
        self.temperature = float(s.temperature)
        self.queue_length = int(s.queue_length)
        self.queue_start = int(round(float(s.queue_start_epoch) * steps_per_epoch))
        self.freeze_steps = int(round(float(s.freeze_prototypes_epochs) * steps_per_epoch))
        self.dim = int(config.model.proj_out_dim)
        self.model = config_lib.model_from_config(
            config,
            num_classes=num_classes,
            head_stop_gradient=head_stop_gradient,
            method_head=Prototypes(self.k),
            method_head_input="projection",
        )

    def init_extra(self, params, batch_stats) -> dict:
        if self.queue_length == 0:
            return {}
        return {
            "queue": jnp.zeros((2, self.queue_length, self.dim), jnp.float32),
            "queue_count": jnp.zeros((), jnp.int32),
        }

    def forward(self, params, batch_stats, batch):
        """Global and local crops through the network: (outs, batch_stats, scores, z_global)."""
        views = batch["views"]  # [B, 2, S, S, 3]
        b = views.shape[0]
        g, batch_stats = base.apply_model(
            self.model, params, batch_stats, base.flatten_views(views)
        )
        scores_g = g["head"].reshape(b, 2, -1)
        scores = [scores_g[:, 0], scores_g[:, 1]]
        outs = [g]
        if "local_views" in batch:
            loc, batch_stats = base.apply_model(
                self.model, params, batch_stats, base.flatten_views(batch["local_views"])
            )
            scores_l = loc["head"].reshape(b, batch["local_views"].shape[1], -1)
            scores += [scores_l[:, v] for v in range(scores_l.shape[1])]
            outs.append(loc)
        z = losses.l2_normalize(g["projection"].astype(jnp.float32)).reshape(b, 2, -1)
        return outs, batch_stats, scores, z

    def codes(self, params, extra, scores, step):
        """Sinkhorn codes of the two global crops (queue-extended once it is full)."""
        codes = []
        for i in range(2):
            s = jax.lax.stop_gradient(scores[i])
            if self.queue_length:
                protos = jax.lax.stop_gradient(params["method_head"]["prototypes"]["kernel"])
                past = extra["queue"][i] @ protos  # [L, K]
                use = (step >= self.queue_start) & (extra["queue_count"] >= self.queue_length)
                q = jax.lax.cond(
                    use,
                    lambda s=s, past=past: sinkhorn(
                        jnp.concatenate([past, s]), self.epsilon, self.iterations
                    )[self.queue_length :],
                    lambda s=s: sinkhorn(s, self.epsilon, self.iterations),
                )
            else:
                q = sinkhorn(s, self.epsilon, self.iterations)
            codes.append(jax.lax.stop_gradient(q))
        return codes

    def next_extra(self, extra, z, step) -> dict:
        """The queue after pushing this batch's global-crop embeddings (newest first)."""
        if not self.queue_length:
            return extra
        z = jax.lax.stop_gradient(z)  # [B, 2, D]
        new = jnp.stack(
            [jnp.concatenate([z[:, i], extra["queue"][i]])[: self.queue_length] for i in range(2)]
        )
        on = step >= self.queue_start
        count = jnp.minimum(extra["queue_count"] + z.shape[0], self.queue_length)
        return {
            "queue": jnp.where(on, new, extra["queue"]),
            "queue_count": jnp.where(on, count, extra["queue_count"]).astype(jnp.int32),
        }

    def loss_and_metrics(self, params, extra, scores, z, step):
        codes = self.codes(params, extra, scores, step)
        loss = swapped_prediction_loss(scores, codes, self.temperature)
        probs = jax.nn.softmax(scores[0].astype(jnp.float32) / self.temperature, axis=-1)
        metrics = {
            "swav_loss": loss,
            "assign_entropy": base.mean_assignment_entropy(probs),
            "sample_entropy": base.mean_sample_entropy(probs),
            "embed_spread": base.embedding_spread(z.reshape(-1, z.shape[-1])),
        }
        return loss, metrics

    def check_collapse(self, metrics):
        return base.collapse_warning(metrics, num_outputs=self.k)

    def parts(self, loss_fn) -> base.Parts:
        """The method's Parts around `loss_fn`: queue, prototype normalisation and freeze."""
        return base.Parts(
            model=self.model,
            loss=loss_fn,
            init_extra=self.init_extra,
            init_params=normalize_prototypes,
            frozen=base.Frozen((PROTOTYPES,), self.freeze_steps),  # no update for freeze_steps
            post_update=lambda p, e, s: (normalize_prototypes(p), e),
            check_collapse=self.check_collapse,
        )


class SwAV(base.Method):
    name = "swav"

    def defaults(self):
        return swav_defaults()

    def validate(self, config, require) -> None:
        validate_swav(config, require)

    def views(self, config) -> base.Views:
        return base.crops_from_config(config)

    def build(self, config, *, num_classes, label_kind, total_steps, steps_per_epoch):
        core = SwAVCore(
            config,
            num_classes=probe_classes(config, num_classes, label_kind),
            head_stop_gradient=True,
            steps_per_epoch=steps_per_epoch,
        )

        def loss_fn(params, batch_stats, extra, batch, rng, step):
            outs, batch_stats, scores, z = core.forward(params, batch_stats, batch)
            loss, metrics = core.loss_and_metrics(params, extra, scores, z, step)
            loss = add_probe(loss, outs[0], batch, label_kind, 2, metrics)
            return loss, (metrics, batch_stats, core.next_extra(extra, z, step))

        return core.parts(loss_fn)


base.register(SwAV())
