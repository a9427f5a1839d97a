"""Converted releases as init checkpoints: the parts they hold are restored, the others keep
their init; a model that would not compute what the source network did is refused by name."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medssl_jax import checkpoint, config_lib, finetune, sharding
from medssl_jax.convert import common
from medssl_jax.convert.__main__ import main as convert_main
from medssl_jax.models import create_model
from medssl_jax.models.model import IMAGENET_MEAN, IMAGENET_STD
from tests.utils import ROOT  # noqa: F401  (puts configs/ on sys.path)

VARIANT = "r18_0.125x_sk0"


def _converted(tmp_path, **info) -> tuple[str, dict, dict]:
    """A 'converted release' of VARIANT with random weights and BN statistics: backbone only."""
    model = create_model(VARIANT, num_proj_layers=0, dtype=jnp.float32)
    v = model.init(jax.random.key(7), jnp.zeros((1, 32, 32, 3)), train=False)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda x: np.asarray(x) + rng.normal(0, 0.1, x.shape), v["params"])
    stats = jax.tree.map(lambda x: np.asarray(x) + rng.uniform(0.1, 1, x.shape), v["batch_stats"])
    params = jax.tree.map(lambda x: x.astype(np.float32), params)
    stats = jax.tree.map(lambda x: x.astype(np.float32), stats)
    conv = common.Converted(
        params=dict(params),
        batch_stats=dict(stats),
        variant=VARIANT,
        source="release.ckpt",
        format="test",
        **info,
    )
    out = common.write(conv, str(tmp_path / "converted"))
    return out, params, stats


def _finetune_config(path: str, **model):
    import common as cfg

    c = cfg.supervised_config("finetune")
    cfg.finetune_demo(c)
    c.data.image_size = 32
    c.init_checkpoint = path
    for k, v in model.items():
        c.model[k] = v
    return c


def test_warm_start_restores_held_parts_and_keeps_the_rest(tmp_path):
    path, params, stats = _converted(tmp_path)
    c = _finetune_config(path)
    c.model.num_proj_layers = 2
    built, _ = finetune.build(
        c,
        sharding.make_mesh(),
        num_classes=3,
        label_kind="multiclass",
        total_steps=2,
        warmup_steps=0,
    )
    state = built.init(jax.random.key(0))
    before = jax.device_get(state)
    # The projection head is asked for but not held: it keeps its init, the backbone is loaded.
    state = checkpoint.warm_start(state, path, ("backbone", "projection_head"), proj_layers=1)
    after = jax.device_get(state)
    jax.tree.map(np.testing.assert_array_equal, after.params["backbone"], params["backbone"])
    jax.tree.map(np.testing.assert_array_equal, after.batch_stats["backbone"], stats["backbone"])
    jax.tree.map(
        np.testing.assert_array_equal,
        after.params["projection_head"],
        before.params["projection_head"],
    )


def test_config_must_match_what_the_release_computes(tmp_path):
    path, _, _ = _converted(tmp_path, input_norm="imagenet", torch_maxpool=True)
    with pytest.raises(config_lib.ConfigError, match=r"model\.input_norm.*imagenet"):
        config_lib.validate(_finetune_config(path))
    with pytest.raises(config_lib.ConfigError, match=r"model\.torch_maxpool"):
        config_lib.validate(_finetune_config(path, input_norm="imagenet"))
    with pytest.raises(config_lib.ConfigError, match=r"model\.variant.*r18_0\.125x_sk0"):
        config_lib.validate(
            _finetune_config(path, input_norm="imagenet", torch_maxpool=True, variant="tiny_sk")
        )
    config_lib.validate(_finetune_config(path, input_norm="imagenet", torch_maxpool=True))


def test_projection_head_shape_is_checked_when_restored(tmp_path):
    path, _, _ = _converted(tmp_path)
    info_file = tmp_path / "converted" / common.INFO_FILE
    import json

    info = json.loads(info_file.read_text())
    info.update(parts=["backbone", "projection_head"], num_proj_layers=3, proj_out_dim=128)
    info_file.write_text(json.dumps(info))
    c = _finetune_config(path, ft_proj_selector=1, num_proj_layers=2)
    with pytest.raises(config_lib.ConfigError, match=r"model\.num_proj_layers.*=3"):
        config_lib.validate(c)


def test_imagenet_input_norm_is_applied_inside_the_model():
    x = np.random.default_rng(1).uniform(size=(2, 32, 32, 3)).astype(np.float32)
    raw = create_model(VARIANT, num_proj_layers=0, dtype=jnp.float32)
    normed = create_model(VARIANT, num_proj_layers=0, dtype=jnp.float32, input_norm="imagenet")
    v = raw.init(jax.random.key(0), x, train=False)
    want = raw.apply(v, (x - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD), train=False)
    got = normed.apply(v, x, train=False)
    np.testing.assert_allclose(got["features"], want["features"], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="input_norm"):
        create_model(VARIANT, input_norm="caffe")


def test_write_refuses_a_folder_that_holds_checkpoints(tmp_path):
    path, _, _ = _converted(tmp_path)
    conv = common.Converted(params={}, batch_stats={}, variant=VARIANT, source="x", format="t")
    with pytest.raises(FileExistsError, match="already holds checkpoints"):
        common.write(conv, path)


def test_assignment_lists_every_mismatch_at_once():
    targets = {"params/a/kernel": (2, 3), "params/b/kernel": (3,), "batch_stats/b/mean": (3,)}
    src = {"A": np.zeros((3, 2)), "B": np.zeros(4), "extra1": np.zeros(1), "slot/Momentum": 0}
    a = common.Assignment(src, targets, ignore=lambda n: n.endswith("/Momentum"), what="ckpt")
    a.put("params/a/kernel", "A", lambda w: w.T)
    a.put("params/b/kernel", "B")
    a.put("params/b/kernel", "A")
    with pytest.raises(common.ConversionError) as e:
        a.finish()
    msg = str(e.value)
    assert "'B' (4,) -> params/b/kernel expects (3,)" in msg
    assert "'A' used twice" in msg
    assert "not used: extra1" in msg and "Momentum" not in msg
    assert "not filled: batch_stats/b/mean, params/b/kernel" in msg


def test_cli_rejects_an_unknown_format(capsys):
    with pytest.raises(SystemExit):
        convert_main(["--source=x", "--format=caffe", "--variant=tiny", "--out=y"])
    assert "invalid choice" in capsys.readouterr().err
