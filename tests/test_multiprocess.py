"""2 processes x 4 CPU devices (jax.distributed + gloo) == 1 process x 8 devices."""

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
            logs.append(p.communicate(timeout=600)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log[-3000:]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_match_one_process(tmp_path):
    _launch(1, 8, tmp_path / "single.json")
    _launch(2, 4, tmp_path / "multi.json")
    single = json.loads((tmp_path / "single.json").read_text())
    multi = json.loads((tmp_path / "multi.json").read_text())
    for a, b in zip(single["metrics"], multi["metrics"], strict=True):
        for k in ("loss", "contrastive_loss", "probe_loss", "grad_norm"):
            np.testing.assert_allclose(a[k], b[k], rtol=2e-4, err_msg=k)
    np.testing.assert_allclose(single["checksum"], multi["checksum"], rtol=1e-4)
