"""Every file a run writes goes through epath, so a non-local workdir (gs:// on a pod) works.

Offline stand-in for gs://: TensorFlow's in-memory `ram://` filesystem, which epath speaks
once `medssl_jax.paths` has registered it (tf.io.gfile serves it, as it serves gs://). Orbax
checkpoints cannot go there: Orbax writes array bytes through TensorStore, whose drivers are
local files and GCS only (`checkpoint.orbax_path` says so), and neither TensorFlow's nor
TensorStore's GCS client can be pointed at an offline emulator together. The end-to-end test
therefore maps the checkpoint folders of a ram:// workdir to a local folder outside the working
directory, and checks that everything else (results.json, prediction CSVs, metric summaries,
sweep state, report.md and its PNGs) is written to ram:// and nothing to the cwd.
"""

from __future__ import annotations

import json
import os
import uuid

import pytest
import tensorflow as tf
from etils import epath

from medssl_jax import checkpoint, paths, report, sweep, train
from tests.utils import ROOT, tiny_pretrain_config


def _ram_root() -> str:
    return f"ram://medssl_test_{uuid.uuid4().hex[:8]}"


def test_epath_speaks_ram_through_tf_gfile():
    root = _ram_root()
    p = epath.Path(root) / "run"
    assert isinstance(p, paths.TfPath) and str(p) == f"{root}/run"
    assert str(p / "a" / "b.json") == f"{root}/run/a/b.json"
    assert str((p / "x.json").with_suffix(".json.tmp")) == f"{root}/run/x.json.tmp"
    assert (p / "x.json").parent == p and (p / "x.json").name == "x.json"
    assert isinstance(epath.Path(str(p)), paths.TfPath) and paths.is_remote(p)
    tmp = p / "results.json.tmp"
    p.mkdir(parents=True, exist_ok=True)
    tmp.write_text("{}")
    tmp.replace(p / "results.json")
    assert tf.io.gfile.exists(f"{root}/run/results.json")
    assert not tmp.exists() and [q.name for q in p.iterdir()] == ["results.json"]
    assert [str(r) for r, _, _ in epath.Path(root).walk()] == [root, f"{root}/run"]
    epath.Path(root).rmtree()
    assert not os.path.exists("ram:") and not paths.is_remote("/tmp/x")


def test_orbax_paths_and_workdir_checks(tmp_path):
    assert str(checkpoint.orbax_path("gs://bucket/run")) == "gs://bucket/run"
    assert str(checkpoint.orbax_path(str(tmp_path))) == str(tmp_path)
    with pytest.raises(checkpoint.CheckpointError, match="TensorStore"):
        checkpoint.orbax_path("ram://x/run")
    with pytest.raises(checkpoint.CheckpointError, match="local folder or"):
        train.check_workdir("ram://x/run")  # before any training starts


def _linear_eval_config(data_dir: str):
    import common

    c = common.supervised_config("linear_eval")
    common.finetune_demo(c)
    c.data.data_dir = data_dir
    c.data.image_size = 32
    c.batch_size = 32
    c.num_steps = 2
    c.eval_every_steps = 2
    c.log_every_steps = 1
    c.checkpoint_every_steps = 2
    c.async_checkpointing = False
    c.eval_splits = ("validation", "test_shifted")
    return c


def _ram_files(root: str) -> set[str]:
    return {
        os.path.join(d, f)[len(root) + 1 :] for d, _, files in tf.io.gfile.walk(root) for f in files
    }


@pytest.mark.slow
def test_pretrain_sweep_report_write_only_to_the_remote_workdir(
    tmp_path, tfds_data_dir, monkeypatch
):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    ckpt_root = tmp_path / "orbax"  # where Orbax's folders of the ram:// workdirs go
    real_orbax_path = checkpoint.orbax_path

    def orbax_path(path):
        text = os.fspath(path)
        if text.startswith("ram://"):
            return epath.Path(ckpt_root / text[len("ram://") :])
        return real_orbax_path(path)

    monkeypatch.setattr(checkpoint, "orbax_path", orbax_path)
    root = _ram_root()
    name = root[len("ram://") :]

    pre = f"{root}/pretrain"
    c = tiny_pretrain_config(num_steps=2, checkpoint_every_steps=2, log_every_steps=1)
    c.data.data_dir = tfds_data_dir
    res = train.train_and_evaluate(c, pre)
    assert res["step"] == 2

    sweep_root = f"{root}/sweep"
    inits = sweep.parse_inits([f"simclr:{pre}"])  # checks the ram:// path exists
    config = _linear_eval_config(tfds_data_dir)
    (run,) = sweep.run_sweep(config, sweep_root, ["1.0"], ["0"], inits)
    assert run == f"{sweep_root}/simclr/frac1/seed0"
    written = report.build_report([sweep_root], sweep_root)

    files = _ram_files(root)
    assert "pretrain/results.json" in files
    assert any(f.startswith("pretrain/events.out.tfevents") for f in files)
    run_rel = "sweep/simclr/frac1/seed0"
    saved = json.loads(tf.io.gfile.GFile(f"{root}/{run_rel}/results.json").read())
    assert saved["init"] == "simclr" and saved["name"] == "simclr_frac1_seed0"
    for split in ("validation", "test_shifted"):
        assert saved["predictions"][split] == f"predictions_{split}.csv"
        assert f"{run_rel}/predictions_{split}.csv" in files
    assert any(f.startswith(f"{run_rel}/events.out.tfevents") for f in files)
    assert "sweep/report.md" in files
    pngs = {f for f in files if f.endswith(".png")}
    assert any(f.startswith("sweep/roc_") for f in pngs), files
    assert any(f.startswith("sweep/label_efficiency_") for f in pngs), files
    assert {str(p) for p in written} == {f"{root}/{f}" for f in pngs | {"sweep/report.md"}}
    assert "simclr" in tf.io.gfile.GFile(f"{root}/sweep/report.md").read()
    assert not any(f.endswith(".tmp") for f in files)

    # Orbax: pretraining and linear-eval steps, and the best validation step.
    assert (ckpt_root / name / "pretrain" / "checkpoints" / "2").is_dir()
    assert (ckpt_root / name / run_rel / "checkpoints" / "2").is_dir()
    assert any((ckpt_root / name / run_rel / "best").iterdir())

    # A rerun finds the finished run on ram:// and skips it.
    monkeypatch.setattr(train, "train_and_evaluate", lambda *a: pytest.fail("rerun"))
    assert sweep.run_sweep(config, sweep_root, ["1.0"], ["0"], inits) == [run]

    # Nothing in the working directory, no local folder named after the scheme.
    assert list(cwd.iterdir()) == []
    assert not (ROOT / "ram:").exists()
    assert not any("ram:" in d or "ram:" in "".join(f) for d, _, f in os.walk(tmp_path))
    tf.io.gfile.rmtree(root)
