"""python -m medssl_jax.pipeline: every stage in its own folder; SIGKILL in the middle, then
the same command resumes at the interrupted stage and finishes with the report."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.utils import ROOT

pytestmark = pytest.mark.slow

TINY = [
    "--config=configs/pipeline.py:demo",
    "--config.data.image_size=32",
    "--config.pretrain.batch_size=16",
    "--config.micle.batch_size=16",
    "--config.finetune.batch_size=16",
    "--config.pretrain.num_steps=4",
    "--config.micle.num_steps=6",
    "--config.finetune.num_steps=4",
    "--config.pretrain.checkpoint_every_steps=2",
    "--config.micle.checkpoint_every_steps=1",
    "--config.micle.async_checkpointing=False",
    "--config.finetune.eval_every_steps=2",
    "--config.fractions=(1.0,)",
    "--config.finetune.eval_splits=validation,test",
    "--config.bootstrap=20",
]


def _cmd(workdir, data_dir):
    return [
        sys.executable,
        "-m",
        "medssl_jax.pipeline",
        *TINY,
        f"--workdir={workdir}",
        f"--config.data.data_dir={data_dir}",
    ]


def test_kill_in_micle_stage_then_resume_to_the_report(tmp_path, tfds_data_dir):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    work = tmp_path / "paper"
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(_cmd(work, tfds_data_dir), cwd=ROOT, env=env, stdout=log, stderr=log)
    deadline = time.time() + 600

    # Kill once MICLe has saved a checkpoint (SimCLR is complete by then).
    def saved() -> bool:  # a finished checkpoint folder is named by its step alone
        ckpts = work / "micle" / "checkpoints"
        return ckpts.is_dir() and any(p.name.isdigit() for p in ckpts.iterdir())

    while not saved() and time.time() < deadline:
        assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (work / "simclr" / "results.json").exists()
    assert not (work / "micle" / "results.json").exists()
    simclr_mtime = (work / "simclr" / "results.json").stat().st_mtime_ns
    second = subprocess.run(
        _cmd(work, tfds_data_dir), cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-3000:]
    assert "simclr: done already" in out
    assert (work / "simclr" / "results.json").stat().st_mtime_ns == simclr_mtime
    micle = json.loads((work / "micle" / "results.json").read_text())
    assert micle["resumed_from_step"] > 0  # resumed, not restarted
    for init in ("scratch", "simclr", "micle"):
        res = json.loads(
            (work / "finetune" / init / "frac1" / "seed0" / "results.json").read_text()
        )
        assert res["init"] == init
    assert f"Report: {work / 'report' / 'report.md'}" in out
    md = (work / "report" / "report.md").read_text()
    assert all(f"| {i} | 1 |" in md for i in ("scratch", "simclr", "micle"))
