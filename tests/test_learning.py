"""SimCLR on the built-in demo data really learns: a few hundred steps of a tiny ResNet."""

import pytest

from medssl_jax import train
from tests.utils import tiny_pretrain_config

STEPS = 200


@pytest.mark.slow
def test_simclr_demo_loss_goes_down_and_probe_beats_chance(tmp_path, tfds_data_dir):
    c = tiny_pretrain_config(
        num_steps=STEPS, batch_size=64, log_every_steps=25, checkpoint_every_steps=STEPS
    )
    c.data.data_dir = tfds_data_dir
    c.data.image_size = 64  # the demo's class patterns need its native resolution
    res = train.train_and_evaluate(c, str(tmp_path))
    first, last = res["first_metrics"], res["final_metrics"]
    num_classes, two_b = 6, 2 * c.batch_size
    print(
        f"\nSimCLR demo, {STEPS} steps x {c.batch_size} images ({c.data.image_size} px, "
        f"{c.model.variant}): contrastive loss {first['contrastive_loss']:.3f} (steps 1-25) -> "
        f"{last['contrastive_loss']:.3f} (last 25); contrastive acc "
        f"{first['contrastive_acc']:.3f} -> {last['contrastive_acc']:.3f} "
        f"(chance {1 / (two_b - 1):.3f}); probe acc {last['probe_acc']:.3f} "
        f"(chance {1 / num_classes:.3f})"
    )
    assert last["contrastive_loss"] < 0.95 * first["contrastive_loss"]
    assert last["contrastive_acc"] > 4 / (two_b - 1)
    assert last["probe_acc"] > 1 / num_classes + 0.02
