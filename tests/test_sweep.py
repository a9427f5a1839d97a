"""The fine-tuning sweep: argument checks, run layout, and skipping finished runs."""

import json

import pytest

from medssl_jax import sweep, train
from tests.utils import ROOT  # noqa: F401  (configs/ on sys.path)


def _fake_run(path) -> None:
    """A run folder holding one (tiny) checkpoint, as parse_inits requires."""
    import numpy as np

    from medssl_jax import checkpoint

    ck = checkpoint.Checkpointer(str(path), every_steps=1, keep=1, async_save=False)
    assert ck.save(2, {"params": {"w": np.ones(3, np.float32)}}, {"step": 2})
    ck.close()


def test_parse_inits_checks_paths(tmp_path):
    run = tmp_path / "run"
    _fake_run(run)
    assert sweep.parse_inits(["scratch", f"micle:{run}"]) == {"scratch": "", "micle": str(run)}
    with pytest.raises(FileNotFoundError, match="missing"):
        sweep.parse_inits([f"simclr:{tmp_path / 'missing'}"])
    (tmp_path / "empty").mkdir()  # e.g. a typo'd run folder: caught before any run starts
    with pytest.raises(FileNotFoundError, match=r"--init 'simclr:.*empty'.*no checkpoint found"):
        sweep.parse_inits([f"simclr:{tmp_path / 'empty'}"])
    with pytest.raises(ValueError, match="only 'scratch'"):
        sweep.parse_inits(["simclr"])


def test_run_sweep_runs_each_missing_combination_once(tmp_path, monkeypatch):
    import finetune

    calls = []

    def fake_run(config, workdir):
        calls.append(
            (
                config.init_name,
                config.init_checkpoint,
                config.data.label_fraction,
                config.seed,
                workdir,
            )
        )
        return {}

    monkeypatch.setattr(train, "train_and_evaluate", fake_run)
    done = sweep.run_dir(str(tmp_path), "scratch", 1.0, 0)
    (tmp_path / "scratch" / "frac1" / "seed0").mkdir(parents=True)
    (tmp_path / "scratch" / "frac1" / "seed0" / "results.json").write_text(json.dumps({}))
    dirs = sweep.run_sweep(
        finetune.get_config("demo"),
        str(tmp_path),
        ["0.1", "1.0"],
        ["0", "1"],
        {"scratch": "", "micle": "/ckpt"},
    )
    assert len(dirs) == 8 and done in dirs
    assert len(calls) == 7  # the finished run is skipped
    assert ("micle", "/ckpt", 0.1, 1, sweep.run_dir(str(tmp_path), "micle", 0.1, 1)) in calls
    with pytest.raises(ValueError, match="fractions"):
        sweep.run_sweep(finetune.get_config("demo"), str(tmp_path), ["1.5"], ["0"], {"s": ""})


def test_dvme_sweep_runs_one_fusion_and_a_probe_per_encoder(tmp_path, monkeypatch):
    import dvme

    calls = []

    def fake_run(config, workdir):
        calls.append((config.init_name, config.dvme.encoders, config.dvme.attention, workdir))
        return {}

    monkeypatch.setattr(train, "train_and_evaluate", fake_run)
    inits = {"simclr": "/a", "swav": "/b"}
    dirs = sweep.run_sweep(dvme.get_config("demo"), str(tmp_path), ["1.0"], ["0", "1"], inits)
    assert len(dirs) == len(calls) == 6
    assert ("dvme(simclr+swav)", "simclr=/a,swav=/b", True) in [c[:3] for c in calls]
    assert ("probe(swav)", "swav=/b", False) in [c[:3] for c in calls]
    assert sweep.run_dir(str(tmp_path), "probe(simclr)", 1.0, 1) in dirs
    with pytest.raises(ValueError, match="needs --init=NAME:CHECKPOINT encoders"):
        sweep.run_sweep(dvme.get_config("demo"), str(tmp_path), ["1"], ["0"], {"scratch": ""})


def test_study_runs_every_protocol_with_random_baseline(tmp_path, monkeypatch):
    from medssl_jax import config_lib, study

    calls = []

    def fake_run(config, workdir):
        calls.append((config.method, config.init_name, config.data.image_size, workdir))
        return {}

    monkeypatch.setattr(train, "train_and_evaluate", fake_run)
    inits = {"simclr": "/a", "swav": "/b"}
    study.run_study(
        "demo",
        str(tmp_path),
        protocols=["linear_eval", "finetune", "dvme"],
        fractions=["0.1", "1.0"],
        seeds=["0"],
        inits=inits,
        overrides=["data.image_size=48"],
    )
    by = {}
    for method, init, size, workdir in calls:
        by.setdefault(method, set()).add(init)
        assert size == 48 and workdir.startswith(str(tmp_path))
    assert by["linear_eval"] == by["finetune"] == {"scratch", "simclr", "swav"}
    assert by["dvme"] == {"dvme(simclr+swav)", "probe(simclr)", "probe(swav)"}
    assert len(calls) == 2 * (3 + 3 + 3)
    with pytest.raises(config_lib.ConfigError, match="config.data.nope does not exist"):
        study.run_study(
            "demo",
            str(tmp_path),
            protocols=["finetune"],
            fractions=["1"],
            seeds=["0"],
            inits=inits,
            overrides=["data.nope=1"],
        )
    with pytest.raises(ValueError, match="--protocols"):
        study.run_study(
            "demo",
            str(tmp_path),
            protocols=["knn"],
            fractions=["1"],
            seeds=["0"],
            inits=inits,
            overrides=[],
        )


def test_seed_placeholder_pairs_pretraining_and_finetuning_runs(tmp_path, monkeypatch):
    import finetune

    for s in (0, 1):
        _fake_run(tmp_path / f"micle_s{s}")
    spec = f"micle:{tmp_path}/micle_s{{seed}}"
    inits = sweep.parse_inits([spec], ["0", "1"])
    with pytest.raises(FileNotFoundError, match="micle_s2' does not exist"):
        sweep.parse_inits([spec], ["0", "1", "2"])
    calls = []

    def fake_train(c, d):
        calls.append((c.seed, c.init_checkpoint))
        return {"train": {"stop_reason": "completed"}}

    monkeypatch.setattr(train, "train_and_evaluate", fake_train)
    sweep.run_sweep(finetune.get_config("demo"), str(tmp_path / "sw"), ["1"], ["0", "1"], inits)
    assert sorted(calls) == [(0, f"{tmp_path}/micle_s0"), (1, f"{tmp_path}/micle_s1")]


@pytest.mark.parametrize("protocol", ["linear_eval", "finetune", "dvme"])
@pytest.mark.parametrize("task", ["demo", "chexpert", "derm", "pcam", "dr"])
def test_study_tasks_exist_for_every_protocol(protocol, task):
    """The study's --task must be a variant of all three protocol configs, and valid."""
    from medssl_jax import config_lib, study

    c = study.protocol_config(protocol, task, ["dvme.encoders=a=/x"] if protocol == "dvme" else [])
    config_lib.validate(c)
    if task == "dr":
        assert c.graded and c.selection_metric == "kappa_quadratic"


@pytest.mark.parametrize("module", ["sweep", "study"])
def test_cli_reports_a_user_mistake_in_one_line(tmp_path, module):
    import subprocess
    import sys

    config = ["--config=configs/finetune.py:demo"] if module == "sweep" else ["--task=demo"]
    cmd = [sys.executable, "-m", f"medssl_jax.{module}", *config, f"--workdir={tmp_path}"]
    out = subprocess.run(
        [*cmd, "--init=micle:/nonexistent_run"], cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert "error: --init 'micle:/nonexistent_run': " in out.stderr
