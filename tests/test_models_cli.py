"""`python -m medssl_jax.models` and `model_stats`: sizes and FLOPs without allocating weights."""

import json
import subprocess
import sys

import pytest

from medssl_jax.models import model_stats


def _run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "medssl_jax.models", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_json_matches_model_stats():
    res = _run_cli("tiny_sk", "--image_size", "64", "--num_classes", "3", "--json")
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    want = model_stats("tiny_sk", image_size=64, num_classes=3)
    for key in ("backbone_params", "head_params", "feature_dim"):
        assert got[key] == want[key], key
    assert got["gflops"] == pytest.approx(want["gflops"], rel=1e-9)
    assert want["feature_dim"] == 256
    # head = 256*256 + 2*256 (hidden) + 256*128 + 128 (last BN, no beta) + 256*3 + 3
    assert want["head_params"] == 256 * 256 + 512 + 256 * 128 + 128 + 256 * 3 + 3
    bad = _run_cli("r50_3y_sk0")
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and "r50_3y_sk0" in bad.stderr


def test_model_stats_flops_scale_with_resolution():
    s224 = model_stats("r50_1x_sk0")
    s448 = model_stats("r50_1x_sk0", image_size=448)
    assert s224["backbone_params"] == 23_508_032 == s448["backbone_params"]
    assert 7.5 < s224["gflops"] < 8.5  # ~4.1 GMACs
    assert s448["gflops"] / s224["gflops"] == pytest.approx(4.0, rel=0.03)
