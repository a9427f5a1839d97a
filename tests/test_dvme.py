"""The DVME stage end to end on the demo data: two encoders from pretraining checkpoints,
cached features, training, validation-chosen head, attention in results.json, resume, errors."""

import json

import numpy as np
import pytest

from medssl_jax import config_lib, features, predictions, train
from tests.utils import tiny_pretrain_config  # (also puts configs/ on sys.path)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def encoders(tmp_path_factory, tfds_data_dir):
    """Two different tiny pretraining runs as encoders: SimCLR (a 2-layer projection head)
    and DINO (no projection head, an EMA teacher), whose checkpoints' heads differ."""
    out = {}
    for name, cfg in (("simclr", "simclr"), ("dino", "dino")):
        c = tiny_pretrain_config(cfg, num_steps=2, checkpoint_every_steps=2)
        c.data.data_dir = tfds_data_dir
        d = tmp_path_factory.mktemp(name)
        train.train_and_evaluate(c, str(d))
        out[name] = str(d)
    return out


def _config(encoders, tfds_data_dir, cache_dir, **kw):
    import dvme as dvme_config

    c = dvme_config.get_config("demo")
    c.data.data_dir = tfds_data_dir
    c.data.image_size = 32
    c.batch_size = 32
    c.num_steps = 6
    c.eval_every_steps = 3
    c.log_every_steps = 3
    c.checkpoint_every_steps = 3
    c.async_checkpointing = False
    c.eval_splits = ("validation", "test_shifted")
    c.dvme.encoders = ",".join(f"{n}={p}" for n, p in encoders.items())
    c.dvme.token_dim, c.dvme.out_dim, c.dvme.num_heads = 16, 8, 2
    c.dvme.cache_dir = str(cache_dir)
    for k, v in kw.items():
        c[k] = v
    return c


@pytest.fixture(scope="module")
def run(encoders, tfds_data_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("dvme")
    cache = tmp_path_factory.mktemp("features")
    res = train.train_and_evaluate(_config(encoders, tfds_data_dir, cache), str(work))
    return work, cache, res


def test_results_attention_and_predictions(run):
    work, _, res = run
    saved = json.loads((work / "results.json").read_text())
    assert saved["kind"] == "linear_eval" and saved["init"] == "dvme(simclr+dino)"
    assert saved["selected_on"] == "validation" and saved["step"] in (3, 6)
    dv = saved["dvme"]
    assert [e["name"] for e in dv["encoders"]] == ["simclr", "dino"]
    assert all(e["variant"] == "r18_0.125x_sk0" and e["feature_dim"] == 64 for e in dv["encoders"])
    for split in ("validation", "test_shifted"):
        w = dv["mean_encoder_weights"][split]
        assert set(w) == {"simclr", "dino"} and sum(w.values()) == pytest.approx(1.0, abs=1e-5)
        assert all(0 < v < 1 for v in w.values())
        pred = predictions.read_predictions_csv(work / saved["predictions"][split])
        assert len(pred.case_ids) == saved["splits"][split]["num_examples"]
        assert not pred.patients_from_cases
        assert 0 <= saved["splits"][split]["balanced_accuracy"] <= 1


def test_features_are_cached_once_per_encoder_and_split(run, encoders, tfds_data_dir, tmp_path):
    _, cache, _ = run
    files = sorted(p.name for p in cache.iterdir())
    assert len(files) == 2 * 3  # (simclr, dino) x (train, validation, test_shifted)
    assert not [f for f in files if f.endswith(".tmp")]
    before = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    # A second run (another seed) reads them: nothing is rewritten.
    c = _config(encoders, tfds_data_dir, cache, seed=1)
    train.train_and_evaluate(c, str(tmp_path / "seed1"))
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == before
    # The two encoders' features differ (different networks), and are finite.
    simclr = [np.load(cache / f) for f in files if f.startswith("simclr_validation")][0]
    dino = [np.load(cache / f) for f in files if f.startswith("dino_validation")][0]
    assert simclr.shape == dino.shape and np.isfinite(simclr).all() and np.isfinite(dino).all()
    assert not np.allclose(simclr, dino)


def test_rerun_resumes_to_the_same_results(run, encoders, tfds_data_dir):
    work, cache, res = run
    again = train.train_and_evaluate(_config(encoders, tfds_data_dir, cache), str(work))
    assert again["train"]["resumed_from_step"] == 6
    assert again["splits"] == res["splits"]


def test_bad_encoder_specs_name_the_field(encoders, tfds_data_dir, tmp_path):
    c = _config(encoders, tfds_data_dir, tmp_path / "cache")
    c.dvme.encoders = "simclr"
    with pytest.raises(config_lib.ConfigError, match="config.dvme.encoders: 'simclr' is not name="):
        train.train_and_evaluate(c, str(tmp_path / "a"))
    c.dvme.encoders = f"a={tmp_path}/nope"
    with pytest.raises(config_lib.ConfigError, match="encoder 'a': .*nope' does not exist"):
        train.train_and_evaluate(c, str(tmp_path / "b"))
    c.dvme.encoders = f"a={encoders['simclr']},a={encoders['dino']}"
    with pytest.raises(config_lib.ConfigError, match="names must be unique"):
        train.train_and_evaluate(c, str(tmp_path / "c"))
    c.dvme.encoders = f"a={encoders['simclr']}"
    c.dvme.num_heads = 3
    with pytest.raises(config_lib.ConfigError, match="config.dvme.num_heads: 3 does not divide"):
        train.train_and_evaluate(c, str(tmp_path / "d"))
    assert not (tmp_path / "cache").exists()  # nothing computed before the errors
    assert features.parse_encoders(" a = /x , b=/y ") == [("a", "/x"), ("b", "/y")]


def test_report_shows_the_attention(run, tmp_path):
    from medssl_jax import report

    work, _, res = run
    written = report.build_report([work], tmp_path, bootstrap=20)
    md = (tmp_path / "report.md").read_text()
    assert "### DVME: attention each encoder receives" in md
    w = res["dvme"]["mean_encoder_weights"]["test_shifted"]
    row = f"| dvme(simclr+dino) | 1 | test_shifted | dino {w['dino']:.3f}, simclr {w['simclr']:.3f}"
    assert row in md  # encoders in name order
    assert tmp_path / "dvme_attention_demo_linear_eval.png" in written


def test_end_to_end_finetunes_encoders_from_their_checkpoints(encoders, tfds_data_dir, tmp_path):
    import jax

    from medssl_jax import checkpoint

    c = _config(encoders, tfds_data_dir, tmp_path / "cache", num_steps=4)
    c.dvme.finetune_encoders = True
    c.eval_every_steps = 2
    res = train.train_and_evaluate(c, str(tmp_path / "e2e"))
    assert res["kind"] == "finetune" and res["dvme"]["frozen"] is False
    w = res["dvme"]["mean_encoder_weights"]["validation"]
    assert sum(w.values()) == pytest.approx(1.0, abs=1e-5)
    assert not (tmp_path / "cache").exists()  # images, not cached features
    got, stats, _ = checkpoint.load_variables(str(tmp_path / "e2e"))
    for i, name in enumerate(("simclr", "dino")):
        src, src_stats, _ = checkpoint.load_variables(encoders[name])
        trained = got[f"encoders_{i}"]["backbone"]
        # Started from the checkpoint, then trained 4 steps: changed, but still close to it (a
        # fresh initialisation is as far from it as the weights are large).
        a = np.concatenate([np.ravel(x) for x in jax.tree.leaves(trained)])
        b = np.concatenate([np.ravel(x) for x in jax.tree.leaves(src["backbone"])])
        assert a.shape == b.shape and not np.array_equal(a, b)
        assert np.linalg.norm(a - b) / np.linalg.norm(b) < 0.1
        assert set(stats[f"encoders_{i}"]) >= {"backbone"}
