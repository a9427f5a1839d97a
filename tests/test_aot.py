"""The ahead-of-time planner: the real pretraining step compiled by libtpu for a TPU topology
that is not attached (a CPU host). Skips where libtpu (extra 'tpu-aot') is not installed."""

import importlib
import json
import os
import sys

import pytest

from medssl_jax import aot, aot_table

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "configs"))


def tiny_config(batch_size: int = 16, image_size: int = 32):
    c = importlib.import_module("simclr").get_config("demo")
    c.data.image_size = image_size
    c.batch_size = batch_size
    return c


def test_topology_names():
    t = aot.parse_topology("v4-32")
    assert (t.name, t.slice_name, t.num_chips, t.chip.name) == ("v4:2x2x4", "v4-32", 16, "v4")
    assert aot.parse_topology("v5:2x2x4").chip.name == "v5p"
    assert aot.parse_topology("v5e:8x8").slice_name == "v5e-64"
    assert aot.parse_topology("v5p-32").num_chips == 16
    with pytest.raises(ValueError, match="expected GEN"):
        aot.parse_topology("v4-33")
    with pytest.raises(ValueError, match="generation"):
        aot.parse_topology("v9:2x2")


def test_out_of_hbm_compile_error_is_does_not_fit():
    msg = (
        "RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space "
        "hbm. Used 25.13G of 15.48G hbm. Exceeded hbm capacity by 9.65G."
    )
    oom = aot.parse_oom(msg)
    assert oom["used"] == pytest.approx(25.13 * 2**30)
    assert oom["usable"] == pytest.approx(15.48 * 2**30)
    assert aot.parse_oom("INVALID_ARGUMENT: bad sharding") is None
    row = {
        "config": "c",
        "slice": "v5e-4",
        "topology": "v5e:2x2",
        "chips": 4,
        "method": "simclr",
        "variant": "r",
        "params": 1e6,
        "dtype": "float32",
        "batch_size": 8,
        "batch_per_chip": 2,
        "images_per_example": 2,
        "image_size": 32,
        "hbm_capacity_bytes": aot.CHIPS["v5e"].hbm_bytes,
        "lower_seconds": 1.0,
        "compile_seconds": 2.0,
    }
    row = aot._oom_row(row, oom, lowered=None, topo=aot.parse_topology("v5e:2x2"), message=msg)
    assert row["fits"] is False and row["hbm_used_bytes"] > row["hbm_capacity_bytes"]
    assert "DOES NOT FIT" in aot_table.format_report(row)
    assert "**no**" in aot_table.markdown_table([row])


def test_out_of_hbm_for_temporaries_reports_what_was_needed():
    """libtpu's other refusal names only the temporaries; rows stored before it was parsed
    (hbm_used_bytes None) get their figure from the stored message in the table."""
    msg = (
        "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
        "temporaries (34.98G) exceeds available HBM (30.75G)."
    )
    oom = aot.parse_oom(msg)
    assert oom == {
        "used": pytest.approx(34.98 * 2**30),
        "usable": pytest.approx(30.75 * 2**30),
        "what": "temporaries",
    }
    row = {
        "config": "configs/micle.py:r",
        "slice": "v4-32",
        "chips": 16,
        "batch_per_chip": 32,
        "hbm_capacity_bytes": aot.CHIPS["v4"].hbm_bytes,
        "compile_seconds": 9.0,
        "compile_error": msg,
        "hbm_used_bytes": None,
        "fits": False,
    }
    assert "| 35.0 GiB of temporaries needed (compiler: out of HBM, 32 GiB chip) |" in (
        aot_table.markdown_table([row])
    )


@pytest.fixture(scope="module")
def tiny_plan():
    pytest.importorskip("libtpu", reason="libtpu not installed (pip install -e '.[tpu-aot]')")
    if not aot.libtpu_available():
        pytest.skip("libtpu installed but cannot create a compile-only TPU topology here")
    return aot.plan(tiny_config(), "v5e:2x2")


# A persistent-cache entry written by an earlier version (aot.plan no longer writes one) cannot
# be loaded by the compile-only client; jax warns and compiles.
@pytest.mark.filterwarnings("ignore:Error reading persistent compilation cache entry")
def test_tiny_model_compiles_for_a_tpu_topology(tiny_plan):
    row = tiny_plan
    assert (row["topology"], row["chips"], row["batch_per_chip"]) == ("v5e:2x2", 4, 4)
    assert row["flops_per_chip"] > 0 and row["flops_per_step"] == 4 * row["flops_per_chip"]
    assert 0 < row["hbm_used_bytes"] < row["hbm_capacity_bytes"] and row["fits"] is True
    assert row["hbm_temp_bytes"] > 0 and row["params"] > 0
    assert row["roofline_seconds"] > 0 and 0 < row["roofline_mfu"] <= 1
    report = aot_table.format_report({**row, "config": "configs/simclr.py:demo"})
    assert "-> FITS" in report and "FLOPs per step" in report
    table = aot_table.markdown_table([{**row, "config": "configs/simclr.py:demo"}])
    assert "| simclr.py:demo | v5e-4 (4) | 4 |" in table
    json.dumps(row)  # the --json output


def test_plan_with_other_libtpu_flags_needs_its_own_process(tiny_plan, monkeypatch):
    """libtpu reads its flags once per process: a plan asking for sharding.low_memory_schedule
    after libtpu started without it is refused (the --all rows each run in their own)."""
    from medssl_jax import tpu_schedule

    assert tiny_plan["libtpu_flags"] == []
    monkeypatch.setenv(tpu_schedule.ENV, os.environ.get(tpu_schedule.ENV, ""))  # restored after
    config = tiny_config()
    config.sharding.low_memory_schedule = True
    with pytest.raises(ValueError, match="run it in its own process"):
        aot.plan(config, "v5e:2x2")


def test_batch_that_does_not_split_over_the_chips_is_an_error():
    from medssl_jax.config_lib import ConfigError

    with pytest.raises(ConfigError, match="not a multiple of the 16 chips"):
        aot.plan(tiny_config(batch_size=24), "v4-32")


def test_run_all_on_a_subset_keeps_the_other_rows(tmp_path, monkeypatch):
    """`--all --configs=X --slices=Y` recomputes only (X, Y): rows of other pairs already in the
    JSON stay, rows of (X, Y) with an error are recomputed, finished ones are kept (resume)."""
    calls = []

    def fake_row(cfg, sl, tmp, timeout_s, extra_args):
        calls.append((cfg, sl))
        return {"config": cfg, "slice": sl, "fits": True}

    monkeypatch.setattr(aot_table, "_run_row", fake_row)
    monkeypatch.setattr(aot_table, "format_report", str)  # the fake rows lack a report's fields
    out = tmp_path / "plan.json"
    before = [
        {"config": "a", "slice": "v4-32", "fits": False},
        {"config": "b", "slice": "v4-32", "error": "timed out"},
        {"config": "b", "slice": "v5e-64", "fits": True},
    ]
    out.write_text(json.dumps({"rows": before}))
    rows = aot_table.run_all(["b"], ["v4-32", "v5e-64"], str(out), timeout_s=1.0)
    assert calls == [("b", "v4-32")]
    stored = json.loads(out.read_text())["rows"]
    assert stored == rows
    assert {(r["config"], r["slice"]): r.get("fits") for r in stored} == {
        ("a", "v4-32"): False,
        ("b", "v4-32"): True,
        ("b", "v5e-64"): True,
    }
