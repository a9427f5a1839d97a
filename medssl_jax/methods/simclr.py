"""SimCLR (Chen et al. 2020): global NT-Xent between the two views of each example.

With `config.sampler.multi_instance` the two views are two distinct images of one case: that is
MICLe (Azizi et al. 2021); `sampler.same_patient='mask'` then drops same-patient pairs from the
negatives. An online linear probe on stop_gradient features runs when labels exist.
"""

from __future__ import annotations

import ml_collections

from medssl_jax import config_lib, losses
from medssl_jax.methods import base


def add_probe(loss, out: dict, batch: dict, label_kind: str, repeats: int, metrics: dict):
    """Adds the online probe's loss (logits on stop_gradient features) when the model has one."""
    if "logits" not in out:
        return loss
    probe, m = base.supervised_terms(out["logits"], batch, label_kind, repeats)
    metrics.update(m, probe_loss=probe)
    return loss + probe


def probe_classes(config: ml_collections.ConfigDict, num_classes: int, label_kind: str) -> int:
    """Classes of the online probe head (0 = no probe)."""
    on = bool(config.get("linear_probe", True)) and label_kind != "none" and num_classes > 0
    return num_classes if on else 0


class SimCLR(base.Method):
    name = "simclr"

    def validate(self, config, require) -> None:
        require(float(config.loss.temperature) > 0, "loss.temperature", "must be > 0")
        require(
            int(config.crops.num_local) == 0,
            "crops.num_local",
            "SimCLR uses the two global views only; set 0 (multi-crop is for swav/dino/hybrid)",
        )

    def views(self, config) -> base.Views:
        return base.crops_from_config(config)

    def build(self, config, *, num_classes, label_kind, total_steps, steps_per_epoch):
        model = config_lib.model_from_config(
            config,
            num_classes=probe_classes(config, num_classes, label_kind),
            head_stop_gradient=True,
        )
        temperature = float(config.loss.temperature)
        sampler = config.sampler
        mask = bool(sampler.multi_instance) and sampler.same_patient == "mask"

        def loss_fn(params, batch_stats, extra, batch, rng, step):
            views = batch["views"]  # [B, 2, S, S, 3], B sharded on 'data'
            b = views.shape[0]
            out, batch_stats = base.apply_model(
                model, params, batch_stats, base.flatten_views(views)
            )
            z = out["projection"].reshape(b, 2, -1)
            keys = batch["patient_key"] if mask else None
            loss, metrics = losses.nt_xent(z[:, 0], z[:, 1], temperature, keys)
            metrics["contrastive_loss"] = loss
            metrics["embed_spread"] = base.embedding_spread(out["projection"])
            loss = add_probe(loss, out, batch, label_kind, 2, metrics)
            return loss, (metrics, batch_stats, extra)

        return base.Parts(
            model=model,
            loss=loss_fn,
            check_collapse=lambda m: base.collapse_warning(m, num_outputs=0),
        )


base.register(SimCLR())
