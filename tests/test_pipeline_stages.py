"""The pipeline's stage plan without training: arms as overridden MICLe configs warm-started
from SimCLR, one pretraining run per seed paired with fine-tuning seed s, config errors naming
the field before any stage runs."""

import json
import sys

import pytest

from medssl_jax import pipeline
from tests.utils import ROOT

sys.path.insert(0, str(ROOT / "configs"))
import pipeline as pipeline_config  # noqa: E402


def _config(variant="nih"):
    c = pipeline_config.get_config(variant)
    c.data.name = "demo"  # validation needs a known dataset, no files
    return c


def test_arms_are_micle_configs_with_their_overrides(tmp_path):
    cfgs = pipeline.stage_configs(_config(), str(tmp_path))
    assert set(cfgs) == {
        "simclr",
        "finetune",
        "linear",
        "simclr_more",
        "micle",
        "micle_mix",
        "micle_images",
    }
    assert cfgs["simclr_more"].sampler.multi_instance is False
    assert cfgs["micle"].sampler.multi_instance is True
    assert (
        cfgs["micle"].sampler.distinct_prob == 1.0 and cfgs["micle"].sampler.epoch_over == "cases"
    )
    assert cfgs["micle_mix"].sampler.distinct_prob == 0.5
    assert cfgs["micle_images"].sampler.epoch_over == "images"
    for arm in ("simclr_more", "micle", "micle_mix", "micle_images"):
        assert cfgs[arm].init_checkpoint == str(tmp_path / "simclr")
        assert cfgs[arm].num_steps == cfgs["micle"].num_steps
    assert all(c.data.name == "demo" for c in cfgs.values())
    assert cfgs["finetune"].eval_splits == () == cfgs["linear"].eval_splits


@pytest.mark.parametrize(
    "spec, match",
    [
        ("sampler.distinct_prob", "not KEY=VALUE"),
        ("sampler.nope=1", "arms.bad: 'sampler.nope': no field 'nope'"),
        ("sampler.distinct_prob=2", "sampler.distinct_prob"),
    ],
)
@pytest.mark.parametrize("from_pretrain", [True, False])
def test_bad_arm_overrides_name_the_arm_and_field(tmp_path, spec, match, from_pretrain):
    c = _config()
    c.arms_from_pretrain = from_pretrain  # up front, even when its warm start comes later
    c.arms.bad = spec
    from medssl_jax.config_lib import ConfigError  # main() prints it as one error: line

    with pytest.raises(ConfigError, match=match):
        pipeline.stage_configs(c, str(tmp_path))


def test_every_stage_keeps_the_first_stages_input_norm_and_stem(tmp_path):
    """A first stage from converted torch weights (ImageNet-normalised input, torchvision's
    max-pool padding): the arms and fine-tuning warm-start from it, so they compute the same."""
    c = _config()
    c.pretrain.model.input_norm, c.pretrain.model.torch_maxpool = "imagenet", True
    cfgs = pipeline.stage_configs(c, str(tmp_path))
    for name, stage in cfgs.items():
        assert stage.model.input_norm == "imagenet" and stage.model.torch_maxpool, name


def test_reserved_arm_name(tmp_path):
    c = _config()
    c.arms.finetune = ""
    with pytest.raises(ValueError, match="reserved"):
        pipeline.stage_configs(c, str(tmp_path))


def test_per_seed_pretraining_feeds_fine_tuning_seed_s(tmp_path, monkeypatch):
    """Seeds 0 and 1: SimCLR and each arm once per seed, each arm warm-started from ITS seed's
    SimCLR; the sweeps get '{seed}' paths (sweep pairs them); finished stages are skipped."""
    from medssl_jax import report, sweep, train

    trained, sweeps = [], []

    def fake_train(c, folder):
        trained.append((folder, int(c.seed), c.get("init_checkpoint", "")))
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
        (tmp_path / folder / "results.json").write_text('{"stop_reason": "completed"}')
        return {"stop_reason": "completed"}

    monkeypatch.setattr(train, "train_and_evaluate", fake_train)
    monkeypatch.setattr(
        sweep,
        "run_sweep",
        lambda c, root, fr, seeds, inits: sweeps.append((root, fr, seeds, inits)),
    )
    monkeypatch.setattr(report, "build_report", lambda dirs, out, bootstrap: [str(out / "r.md")])
    c = _config()
    c.seeds = (0, 1)
    c.arms = {"micle": "", "micle_mix": "sampler.distinct_prob=0.5"}
    root = tmp_path / "run"
    assert pipeline.run_pipeline(c, str(root)) == str(root / "report" / "r.md")
    expect = []
    for s in (0, 1):
        expect.append((str(root / "simclr" / f"seed{s}"), s, ""))
        for arm in ("micle", "micle_mix"):
            expect.append((str(root / arm / f"seed{s}"), s, str(root / "simclr" / f"seed{s}")))
    assert trained == expect
    inits = {
        "scratch": "",
        **{n: str(root / n / "seed{seed}") for n in ("simclr", "micle", "micle_mix")},
    }
    assert sweeps == [
        (str(root / "finetune"), ["0.1"], ["0", "1"], inits),
        (str(root / "linear"), ["1.0"], ["0", "1"], inits),
    ]
    trained.clear()
    pipeline.run_pipeline(c, str(root))  # everything done: no pretraining again
    assert trained == []


@pytest.mark.parametrize("method", ["swav", "dino", "hybrid"])
def test_method_variants_pretrain_and_pair_with_that_method(tmp_path, method):
    """configs/pipeline.py:demo,<method>: the first stage is the method (folder named by it),
    the arm is MICLe-<method> warm-started from it."""
    c = pipeline_config.get_config(f"demo,{method}")
    cfgs = pipeline.stage_configs(c, str(tmp_path))
    assert pipeline.first_stage(c) == method
    assert set(cfgs) == {method, f"micle_{method}", "finetune"}
    assert cfgs[method].method == cfgs[f"micle_{method}"].method == method
    assert not cfgs[method].sampler.multi_instance
    assert cfgs[f"micle_{method}"].sampler.multi_instance
    assert cfgs[f"micle_{method}"].init_checkpoint == str(tmp_path / method)


def test_unknown_variant_lists_the_valid_ones():
    with pytest.raises(ValueError, match="RECIPE\\[,METHOD\\]"):
        pipeline_config.get_config("demo,byol")


def test_a_preempted_stage_stops_the_pipeline_and_is_rerun(tmp_path, monkeypatch):
    """SIGTERM in a stage: its results.json says 'preempted'; the pipeline must not start the
    next stage from that half-trained model, and the next invocation reruns (resumes) it."""
    from medssl_jax import results, train

    calls = []

    def fake_train(c, folder, reason="preempted"):
        calls.append(folder)
        out = {"kind": "pretrain", "step": 7, "stop_reason": reason}
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
        (tmp_path / folder / "results.json").write_text(json.dumps(out))
        return out

    monkeypatch.setattr(train, "train_and_evaluate", fake_train)
    c = _config("demo")
    root = tmp_path / "run"
    with pytest.raises(results.StageStopped, match=r"stopped \(preempted\) at step 7"):
        pipeline.run_pipeline(c, str(root))
    assert calls == [str(root / "simclr")]  # no MICLe from the interrupted SimCLR
    assert not results.finished(root / "simclr")
    with pytest.raises(results.StageStopped):
        pipeline.run_pipeline(c, str(root))
    assert calls == [str(root / "simclr")] * 2  # rerun, not skipped


def test_sweep_reruns_interrupted_runs_and_stops_at_a_preempted_one(tmp_path, monkeypatch):
    from medssl_jax import results, sweep, train

    calls = []

    def fake_train(c, d):
        calls.append(d)
        reason = "preempted" if c.init_name == "simclr" else "completed"
        out = {"kind": "finetune", "train": {"stop_reason": reason, "step": 3}}
        (tmp_path / d).mkdir(parents=True, exist_ok=True)
        (tmp_path / d / "results.json").write_text(json.dumps(out))
        return out

    monkeypatch.setattr(train, "train_and_evaluate", fake_train)
    c = pipeline_config.get_config("demo").finetune
    inits = {"scratch": "", "simclr": str(tmp_path)}
    with pytest.raises(results.StageStopped, match=r"simclr/frac1/seed0: stopped \(preempted\)"):
        sweep.run_sweep(c, str(tmp_path / "sw"), ["1.0"], ["0"], inits)
    assert [d.split("/sw/")[1] for d in calls] == ["scratch/frac1/seed0", "simclr/frac1/seed0"]
    calls.clear()
    with pytest.raises(results.StageStopped):
        sweep.run_sweep(c, str(tmp_path / "sw"), ["1.0"], ["0"], inits)
    assert [d.split("/sw/")[1] for d in calls] == ["simclr/frac1/seed0"]  # scratch was done


def test_finished_reads_both_result_layouts(tmp_path):
    from medssl_jax import results

    assert not results.finished(tmp_path)  # no results.json
    for layout, done in [
        ({"stop_reason": "completed"}, True),
        ({"stop_reason": "stop_after_steps"}, False),
        ({"train": {"stop_reason": "preempted"}}, False),
        ({"train": {"stop_reason": "completed"}}, True),
        ({"kind": "finetune"}, True),  # older runs: no stop reason recorded
    ]:
        (tmp_path / "results.json").write_text(json.dumps(layout))
        assert results.finished(tmp_path) == done, layout
    (tmp_path / "results.json").write_text("{half a fi")
    assert not results.finished(tmp_path)


def test_weights_stage_converts_once_and_the_first_stage_starts_from_it(tmp_path, monkeypatch):
    """config.weights: a released checkpoint (here the torchvision-layout ResNet fixture)
    converted for the first stage's variant into WORKDIR/weights, then SimCLR starts from it;
    a second invocation does not convert again; a missing source is named before any stage."""
    from medssl_jax import report, sweep, train

    trained = []

    def fake_train(c, folder):
        trained.append((folder, c.get("init_checkpoint", "")))
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
        (tmp_path / folder / "results.json").write_text('{"stop_reason": "completed"}')
        return {"stop_reason": "completed"}

    monkeypatch.setattr(train, "train_and_evaluate", fake_train)
    monkeypatch.setattr(sweep, "run_sweep", lambda *a: None)
    monkeypatch.setattr(report, "build_report", lambda dirs, out, bootstrap: [str(out / "r.md")])
    c = _config("demo")
    c.pretrain.model.variant = "r50_0.0625x_sk0"  # the fixture's network
    c.weights.source = str(ROOT / "tests/fixtures/torch/resnet_tv_legacy.pth")
    c.weights.format = "torch_resnet"
    root = tmp_path / "run"
    pipeline.run_pipeline(c, str(root))
    info = json.loads((root / "weights" / "converted.json").read_text())
    assert info["variant"] == "r50_0.0625x_sk0" and info["format"] == "torch_resnet"
    assert trained[0] == (str(root / "simclr"), str(root / "weights"))
    assert trained[1] == (str(root / "micle"), str(root / "simclr"))
    stamp = (root / "weights" / "converted.json").stat().st_mtime_ns
    pipeline.run_pipeline(c, str(root))
    assert (root / "weights" / "converted.json").stat().st_mtime_ns == stamp
    c.weights.source = str(tmp_path / "nope.pth")
    with pytest.raises(ValueError, match="config.weights.source: .*nope.pth' does not exist"):
        pipeline.run_pipeline(c, str(tmp_path / "other"))
    assert not (tmp_path / "other").exists()


def test_pipeline_cli_reports_a_bad_arm_in_one_line(tmp_path):
    import subprocess

    out = subprocess.run(
        [sys.executable, "-m", "medssl_jax.pipeline", "--config=configs/pipeline.py:demo",
         f"--workdir={tmp_path}", "--config.arms.micle=sampler.bogus=1"],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert "error: config.arms.micle: 'sampler.bogus': no field 'bogus'" in out.stderr
    assert not list(tmp_path.iterdir())  # before any stage
