"""Optimiser details a recipe depends on: DINO's cosine weight-decay schedule for ViTs."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from medssl_jax import optim


def test_adamw_weight_decay_follows_dinos_cosine_schedule():
    """With zero gradients AdamW's update is pure decay: p <- p - lr * wd_t * p, where
    wd_t = end + (start - end) * (1 + cos(pi t / T)) / 2 (DINO's cosine_scheduler)."""
    total, lr = 10, 0.1
    tx = optim.make_optimizer(
        {"name": "adamw", "weight_decay": 0.04, "weight_decay_end": 0.4},
        optax.constant_schedule(lr),
        total_steps=total,
    )
    params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}}
    state = tx.init(params)
    ref = 1.0
    for t in range(total):
        updates, state = tx.update(jax.tree.map(jnp.zeros_like, params), state, params)
        params = optax.apply_updates(params, updates)
        ref -= lr * (0.4 + 0.5 * (0.04 - 0.4) * (1 + np.cos(np.pi * t / total))) * ref
    np.testing.assert_allclose(np.asarray(params["dense"]["kernel"]), ref, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(params["dense"]["bias"]), 1.0)  # biases: no decay


def test_weight_decay_end_is_only_for_adamw():
    with pytest.raises(ValueError, match="weight_decay_end is for adamw"):
        optim.make_optimizer(
            {"name": "lars", "weight_decay": 1e-6, "weight_decay_end": 0.4},
            optax.constant_schedule(0.1),
        )


@pytest.mark.parametrize("variant", ["vit_s16", "demo,vit_tiny"])
def test_dino_vit_variants_apply_the_whole_recipe(variant):
    """'vit_s16' is also an architecture name; the DINO config's recipe must still apply."""
    import importlib

    import tests.utils  # noqa: F401 (puts configs/ on the path)
    from medssl_jax import config_lib

    c = importlib.import_module("dino").get_config(variant)
    assert c.model.variant == variant.split(",")[-1]
    assert c.optim.name == "adamw" and c.optim.weight_decay_end == 0.4
    assert c.dino.teacher_temp == 0.07 and not c.dino.norm_last_layer
    assert not c.dino.use_bn_in_head  # the ResNet recipe's head BN is not the ViT's
    config_lib.validate(c)
    c.optim.name = "lars"
    with pytest.raises(config_lib.ConfigError, match="optim.weight_decay_end"):
        config_lib.validate(c)


def test_decay_mask_follows_dinos_rule_on_a_vit():
    """DINO's get_params_groups: no decay for biases and 1-D parameters (norms), decay for the
    rest, the class token, position embeddings and the head's learned last-layer gain included
    (torch's weight_norm keeps weight_g as [out_dim, 1]; ours is [out_dim])."""
    import tests.utils  # noqa: F401 (puts configs/ on the path)
    from medssl_jax import methods
    from medssl_jax.models.stats import abstract_variables

    c = __import__("dino").get_config("demo,vit_tiny")
    c.dino.norm_last_layer = False
    model = (
        methods.get("dino")
        .build(c, num_classes=0, label_kind="none", total_steps=10, steps_per_epoch=1)
        .model
    )
    params = abstract_variables(model, 32)["params"]
    mask = optim.decay_mask(params)
    flat = jax.tree_util.tree_leaves_with_path(params)
    decayed = dict(jax.tree_util.tree_leaves_with_path(mask))
    for path, leaf in flat:
        name = optim.path_names(path)[-1]
        torch_shape = leaf.shape + (1,) if name == "gain" else leaf.shape
        dino = not (name == "bias" or len(torch_shape) == 1)
        assert decayed[path] == dino, (jax.tree_util.keystr(path), leaf.shape)
    names = {optim.path_names(p)[-1] for p, _ in flat}
    assert {"cls_token", "pos_embed", "kernel", "scale", "bias", "gain"} <= names
