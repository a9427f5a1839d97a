"""2 processes x 4 CPU devices (jax.distributed + gloo) == 1 process x 1 device, every method."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

WORKER = Path(__file__).with_name("mp_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _launch(nproc: int, ndev: int, out: Path) -> None:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(p), str(nproc), str(ndev), str(port), str(out)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for p in range(nproc)
    ]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=900)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log[-3000:]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_match_one_device(tmp_path):
    """Losses, parameter updates, BatchNorm statistics, DINO's teacher and centre and every
    other state leaf after 2 steps agree between 1 device and 2 processes x 4 devices."""
    _launch(1, 1, tmp_path / "single")
    _launch(2, 4, tmp_path / "multi")
    single = json.loads((tmp_path / "single.json").read_text())
    multi = json.loads((tmp_path / "multi.json").read_text())
    # Warm start into FSDP state split over 2 processes restores the saved backbone.
    warm = multi.pop("fsdp_warm_start")
    assert warm["split_leaves"] > 0 and warm["backbone_equal"] and warm["same_sharding"], warm
    assert single.pop("fsdp_warm_start")["backbone_equal"]
    # Both processes loaded the demo set prepared once into a shared fresh data_dir, and
    # between them hold all of its cases (patients split between them).
    outcome = [json.loads((tmp_path / f"multi_outcome{p}.json").read_text()) for p in (0, 1)]
    assert outcome[0] == ["first", "ValueError: disk full"], outcome
    assert outcome[1] == [
        "after",
        "RuntimeError: process 0 could not fail check: ValueError: disk full",
    ]
    assert single.pop("all_processes") == [True, True]
    assert multi.pop("all_processes") == [True, False]  # process 1's False reaches process 0
    (n_all,), halves = single.pop("demo_cases"), multi.pop("demo_cases")
    assert len(halves) == 2 and min(halves) > 0 and sum(halves) == n_all, (halves, n_all)
    assert set(single) == set(multi) == {"simclr", "swav", "dino", "hybrid"}
    for method in single:
        for a, b in zip(single[method], multi[method], strict=True):
            for k in a:
                np.testing.assert_allclose(a[k], b[k], rtol=2e-4, atol=1e-6, err_msg=k)
    s, m = np.load(tmp_path / "single.npz"), np.load(tmp_path / "multi.npz")
    assert set(s.files) == set(m.files)
    moved = {}
    for key in s.files:
        if "/final" not in key:
            continue
        init = key.replace("/final", "/init")
        np.testing.assert_array_equal(s[init], m[init])  # same initial state
        d1 = s[key].astype(np.float64) - s[init]
        d2 = m[key].astype(np.float64) - m[init]
        scale = np.linalg.norm(d1)
        assert np.linalg.norm(d1 - d2) <= 2e-3 * scale + 1e-9 * (1 + np.linalg.norm(s[init])), key
        method = key.split("/")[0]
        moved.setdefault(method, []).append(scale > 0)
    for method, flags in moved.items():  # the comparison is not vacuous
        assert np.mean(flags) > 0.5, method
    assert any(k.startswith("dino/final") and "teacher" in k for k in s.files)
    assert "dino/final['extra']['center']" in s.files


def test_input_pipeline_of_two_processes_splits_patients_and_fills_both_halves(tfds_data_dir):
    """What each of 2 processes feeds (the pipeline is host-local: process_index/count are its
    only inputs): disjoint patient shards covering the data, local batches of B/2 from the own
    shard, and MICLe's global batch (both halves) with no patient twice."""
    from medssl_jax import config_lib, input_pipeline, methods, pretrain
    from tests.utils import tiny_pretrain_config

    config = tiny_pretrain_config("micle")
    data = {"name": "demo", "data_dir": tfds_data_dir}
    whole = input_pipeline.load_store(data, "train")
    stores = [
        input_pipeline.load_store(data, "train", process_index=p, process_count=2) for p in (0, 1)
    ]
    ids = [set(s.case_ids) for s in stores]
    assert not ids[0] & ids[1] and ids[0] | ids[1] == set(whole.case_ids)
    for p, s in enumerate(stores):
        assert s.num_cases > 0 and all(int(k) % 2 == p for k in s.patient_keys)
    views = methods.get("simclr").views(config)
    local = config.batch_size // 2
    halves = []
    for p, s in enumerate(stores):
        ds, _ = input_pipeline.pretrain_dataset(
            s,
            batch_size=local,
            views=views,
            aug=config_lib.augment_kwargs(config),
            seed=0,
            process_index=p,
            **pretrain.sampler_options(config),
        )
        it = ds.as_numpy_iterator()
        halves.append([next(it) for _ in range(4)])
    for step in range(4):
        a, b = halves[0][step], halves[1][step]
        assert a["views"].shape[0] == b["views"].shape[0] == local
        assert all(int(k) % 2 == 0 for k in a["patient_key"])
        assert all(int(k) % 2 == 1 for k in b["patient_key"])
        keys = np.concatenate([a["patient_key"], b["patient_key"]]).tolist()
        assert len(set(keys)) == len(keys)


def test_mesh_puts_each_process_devices_side_by_side():
    """Process p's local batch becomes global rows [p * local, (p + 1) * local) only if its
    devices are contiguous in the mesh (eval_loop and the input pipeline rely on it), even when
    jax lists devices interleaved (stand-ins: 2 processes x 4 devices, ids alternating)."""
    import dataclasses

    from medssl_jax import sharding

    @dataclasses.dataclass(frozen=True)
    class Device:
        id: int
        process_index: int

    listed = [Device(i, i % 2) for i in range(8)]
    mesh = sharding.make_mesh(listed)
    assert [d.process_index for d in mesh.devices] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert [d.id for d in mesh.devices] == [0, 2, 4, 6, 1, 3, 5, 7]  # order kept within one
