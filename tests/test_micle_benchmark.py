"""benchmarks/micle_vs_simclr.py end to end at toy size: every stage runs, rows and JSON add up."""

import json
import sys

import pytest

from tests.utils import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))

TINY = ["num_steps=2", "batch_size=16", "data.image_size=32", "optim.warmup_steps=1"]
TINY += ["log_every_steps=1", "checkpoint_every_steps=2"]
TINY_EVAL = ["num_steps=2", "batch_size=16", "data.image_size=32", "optim.warmup_steps=1"]
TINY_EVAL += ["eval_every_steps=2", "log_every_steps=1", "checkpoint_every_steps=2"]


@pytest.mark.slow
def test_micle_vs_simclr_runs_every_stage_and_resumes(tmp_path, tfds_data_dir):
    import micle_vs_simclr

    out = tmp_path / "result.json"
    argv = ["--seeds", "0", "--workdir", str(tmp_path / "runs"), "--out", str(out)]
    argv += ["--stage1_steps", "2", "--data_dir", tfds_data_dir]
    argv += ["--override", *TINY, "--eval_override", *TINY_EVAL]
    res = micle_vs_simclr.main(argv)

    assert [r["method"] for r in res["rows"]] == ["random", "stage1", "simclr", "micle"]
    for r in res["rows"]:
        assert 0.0 <= r["test/top1"] <= 1.0 and 0.0 <= r["test_shifted/auc_mean"] <= 1.0
    arms = {r["method"]: r for r in res["rows"] if r["method"] in ("simclr", "micle")}
    assert all(r["steps"] == 2 and r["stage1_steps"] == 2 for r in arms.values())
    # Both arms warm-started from the shared SimCLR stage, each with a fresh step counter.
    for m in arms:
        cfg = json.loads((tmp_path / "runs" / f"{m}_seed0" / "results.json").read_text())
        assert cfg["step"] == 2
    assert res["micle_wins"] == int(arms["micle"]["test/top1"] > arms["simclr"]["test/top1"])
    assert set(res["summary"]) == {"random", "stage1", "simclr", "micle"}
    assert json.loads(out.read_text())["rows"] == res["rows"]
    # A second call reuses every finished run (no training) and reproduces the table.
    again = micle_vs_simclr.main(argv)
    assert again["rows"] == res["rows"] and again["table"] == res["table"]
