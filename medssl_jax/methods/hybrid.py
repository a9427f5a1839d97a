"""Contrastive learning + online feature clustering, with optional supervision (Ghesu et al. 2022).

L = L_clustering + lambda * L_contrastive + mu * L_supervised, where
- L_clustering is SwAV's swapped prediction of Sinkhorn codes over all crops (`config.swav`);
- L_contrastive is the global NT-Xent between the two global crops' L2-normalised embeddings
  (the same 128-d embeddings that are clustered), temperature `hybrid.temperature`;
- L_supervised is the masked softmax (multi-class) or masked sigmoid (multi-label) loss of
  the supervised head on the backbone features of the global crops, over the labelled rows
  of the batch only: unlabelled images (label -1 / mask 0) contribute to L_clustering and
  L_contrastive alone. Unlike the online probe of the other methods, this head is part of the
  objective: its gradient trains the backbone (the head's own parameters use the probe's Adam).

Our reading of the paper, documented: Ghesu et al. do not publish the loss weights, the
head layout or which embedding the contrastive term uses; we use lambda = 1, mu = 1 (config),
SwAV's embedding for both self-supervised terms, and mu = 0 makes the run self-supervised.
"""

from __future__ import annotations

import ml_collections

from medssl_jax import losses
from medssl_jax.methods import base
from medssl_jax.methods.swav import SwAVCore, validate_swav


def hybrid_loss(
    clustering: float, contrastive: float, supervised: float, *, lam: float, mu: float
) -> float:
    """L = L_clustering + lambda * L_contrastive + mu * L_supervised."""
    return clustering + lam * contrastive + mu * supervised


class Hybrid(base.Method):
    name = "hybrid"

    def defaults(self):
        h = ml_collections.ConfigDict()
        h.contrastive_weight = 1.0  # lambda
        h.supervised_weight = 1.0  # mu; 0 = purely self-supervised
        h.temperature = 0.1  # NT-Xent temperature of the contrastive term
        return h

    def validate(self, config, require) -> None:
        validate_swav(config, require)
        h = config.hybrid
        require(float(h.contrastive_weight) >= 0, "hybrid.contrastive_weight", "must be >= 0")
        require(float(h.supervised_weight) >= 0, "hybrid.supervised_weight", "must be >= 0")
        require(float(h.temperature) > 0, "hybrid.temperature", "must be > 0")

    def views(self, config) -> base.Views:
        return base.crops_from_config(config)

    def build(self, config, *, num_classes, label_kind, total_steps, steps_per_epoch):
        h = config.hybrid
        lam, mu, temperature = (
            float(h.contrastive_weight),
            float(h.supervised_weight),
            float(h.temperature),
        )
        supervised = mu > 0 and label_kind != "none" and num_classes > 0
        # Same-patient cases in the batch are not negatives (the sampler lets them in on 'mask').
        mask = bool(config.sampler.multi_instance) and config.sampler.same_patient == "mask"
        core = SwAVCore(
            config,
            num_classes=num_classes if supervised else 0,
            head_stop_gradient=False,
            steps_per_epoch=steps_per_epoch,
        )

        def loss_fn(params, batch_stats, extra, batch, rng, step):
            outs, batch_stats, scores, z = core.forward(params, batch_stats, batch)
            clustering, metrics = core.loss_and_metrics(params, extra, scores, z, step)
            keys = batch["patient_key"] if mask else None  # [B]
            contrastive, c_metrics = losses.nt_xent(z[:, 0], z[:, 1], temperature, keys)
            metrics.update(c_metrics, contrastive_loss=contrastive)
            sup = 0.0
            if supervised:
                sup, s_metrics = base.supervised_terms(outs[0]["logits"], batch, label_kind, 2)
                metrics.update(s_metrics, supervised_loss=sup)
            loss = hybrid_loss(clustering, contrastive, sup, lam=lam, mu=mu)
            return loss, (metrics, batch_stats, core.next_extra(extra, z, step))

        return core.parts(loss_fn)


base.register(Hybrid())
