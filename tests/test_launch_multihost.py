"""main.py as 2 processes x 4 CPU devices, started the way the launchers start it, with no
coordinator flags: under launch/slurm_gpu.sbatch (a stand-in `srun` sets SLURM's variables as
srun does) and on the TPU-VM path (MEDSSL_MULTIHOST=tpu; jax's cluster detection answers from
a stand-in TPU VM, since a real one needs Google's metadata server). Both train, checkpoint and
resume."""

import json
import os
import re
import socket
import subprocess
import sys
import textwrap

import pytest

from tests.utils import ROOT

pytestmark = pytest.mark.slow

FAKE_SRUN = r"""#!/usr/bin/env bash
# srun stand-in: FAKE_NODES tasks (one per "node") of the command after srun's own options,
# each with the variables srun sets for a task.
echo "$@" >> "$FAKE_LOG/srun_args"
while [[ "$1" == --* ]]; do shift; done
pids=()
for ((i = 0; i < FAKE_NODES; i++)); do
  SLURM_PROCID=$i SLURM_LOCALID=0 SLURM_NODEID=$i SLURM_NTASKS=$FAKE_NODES \
  SLURM_NTASKS_PER_NODE=1 SLURM_STEP_NUM_NODES=$FAKE_NODES SLURM_STEP_NODELIST=localhost \
  SLURM_STEP_TASKS_PER_NODE="1(x$FAKE_NODES)" "$@" > "$FAKE_LOG/task$i.log" 2>&1 &
  pids+=($!)
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=$?; done
exit $status
"""

FAKE_TPU_VM = """
import os

if os.environ.get("FAKE_TPU_WORKER") is not None:
    from jax._src import clusters

    class FakeTpuVm(clusters.ClusterEnv):
        # What jax's GceTpuCluster reads from the TPU VM's metadata server, from variables.
        name = "fake_tpu_vm"
        opt_in_only_method = False

        @classmethod
        def is_env_present(cls):
            return True

        @classmethod
        def get_coordinator_address(cls, timeout_secs, override_coordinator_port):
            return os.environ["FAKE_TPU_COORDINATOR"]

        @classmethod
        def get_process_count(cls):
            return int(os.environ["FAKE_TPU_WORKERS"])

        @classmethod
        def get_process_id(cls):
            return int(os.environ["FAKE_TPU_WORKER"])

        @classmethod
        def get_local_process_id(cls):
            return None
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _slurm_job_id() -> int:
    """A job id whose coordinator port (jax: 61440 + id % 4096) is free now."""
    for _ in range(50):
        job = 4096 * 7 + (_free_port() % 4096)
        port = 61440 + job % 4096
        with socket.socket() as s:
            try:
                s.bind(("localhost", port))
                return job
            except OSError:
                continue
    pytest.skip("no free port in jax's SLURM coordinator range")


def _args(data_dir: str, steps: int) -> list[str]:
    return [
        f"--config.data.data_dir={data_dir}",
        "--config.data.image_size=32",
        "--config.batch_size=16",
        f"--config.num_steps={steps}",
        "--config.checkpoint_every_steps=2",
        "--config.log_every_steps=1",
        "--config.async_checkpointing=False",
    ]


def _env(tmp_path) -> dict:
    env = dict(os.environ)
    env.update(
        XLA_FLAGS="--xla_force_host_platform_device_count=4",
        JAX_PLATFORMS="cpu",
        TF_CPP_MIN_LOG_LEVEL="2",
        PYTHONPATH=str(ROOT),
    )
    env.pop("MEDSSL_MULTIHOST", None)
    return env


@pytest.fixture(scope="module")
def demo_data(tfds_data_dir):
    from medssl_jax import input_pipeline

    input_pipeline.load_store({"name": "demo", "data_dir": tfds_data_dir}, "train")  # prepare
    return tfds_data_dir


def _check_run(log_texts: list[str], workdir, steps: int) -> None:
    for i, text in enumerate(log_texts):
        assert re.search(rf"process {i} of 2 \(jax.distributed via \w+\), 4 local of 8", text), (
            text[-3000:]
        )
    results = json.loads((workdir / "results.json").read_text())
    assert results["step"] == steps, results
    assert (workdir / "checkpoints" / str(steps)).is_dir()


def test_slurm_sbatch_two_processes_train_checkpoint_resume(tmp_path, demo_data):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "srun").chmod(0o755)
    logs = tmp_path / "logs"
    logs.mkdir()
    env = _env(tmp_path)
    env.update(
        PATH=f"{bin_dir}:{env['PATH']}",
        FAKE_NODES="2",
        FAKE_LOG=str(logs),
        SLURM_JOB_ID=str(_slurm_job_id()),
        SLURM_SUBMIT_DIR=str(ROOT),
        SLURM_NNODES="2",
        VENV=sys.prefix,
    )
    workdir = tmp_path / "run"
    for steps in (2, 4):  # train and checkpoint, then resume from step 2
        cmd = ["bash", str(ROOT / "launch/slurm_gpu.sbatch"), "configs/simclr.py:demo"]
        proc = subprocess.run(
            cmd + [str(workdir)] + _args(demo_data, steps),
            env=env,
            capture_output=True,
            text=True,
            timeout=1200,
        )
        tasks = [(logs / f"task{i}.log").read_text() for i in range(2)]
        assert proc.returncode == 0, proc.stderr[-2000:] + "\n".join(t[-3000:] for t in tasks)
        _check_run(tasks, workdir, steps)
        assert "via slurm" in tasks[0]
    assert "Resumed from checkpoint at step 2" in tasks[0], tasks[0][-3000:]
    assert "--ntasks-per-node=1" in (logs / "srun_args").read_text()


def test_tpu_vm_path_two_processes_train_checkpoint_resume(tmp_path, demo_data):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(textwrap.dedent(FAKE_TPU_VM))
    env = _env(tmp_path)
    env.update(
        PYTHONPATH=f"{site}:{ROOT}",
        MEDSSL_MULTIHOST="tpu",
        FAKE_TPU_COORDINATOR=f"localhost:{_free_port()}",
        FAKE_TPU_WORKERS="2",
    )
    workdir = tmp_path / "run"
    for steps in (2, 4):
        procs, logs = [], []
        for worker in range(2):
            log = tmp_path / f"worker{worker}_{steps}.log"
            cmd = [sys.executable, str(ROOT / "main.py"), "--config=configs/simclr.py:demo"]
            procs.append(
                subprocess.Popen(
                    cmd + [f"--workdir={workdir}"] + _args(demo_data, steps),
                    env={**env, "FAKE_TPU_WORKER": str(worker)},
                    cwd=ROOT,
                    stdout=log.open("w"),
                    stderr=subprocess.STDOUT,
                )
            )
            logs.append(log)
        codes = [p.wait(timeout=1200) for p in procs]
        texts = [log.read_text() for log in logs]
        assert codes == [0, 0], "\n".join(t[-3000:] for t in texts)
        _check_run(texts, workdir, steps)
        assert "via tpu" in texts[0]
    assert "Resumed from checkpoint at step 2" in texts[0], texts[0][-3000:]
    # Linear evaluation of that run on the same 2 processes: each writes its own prediction
    # rows, process 0 joins them, so results.json names whole-split CSVs (patient CIs).
    evaldir = tmp_path / "linear"
    procs = []
    for worker in range(2):
        cmd = [sys.executable, str(ROOT / "main.py"), "--config=configs/linear_eval.py:demo"]
        cmd += [f"--workdir={evaldir}", f"--config.init_checkpoint={workdir}"]
        cmd += _args(demo_data, 2) + ["--config.data.image_size=32"]
        procs.append(
            subprocess.Popen(
                cmd,
                env={**env, "FAKE_TPU_WORKER": str(worker)},
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outs = [p.communicate(timeout=1200)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outs)
    results = json.loads((evaldir / "results.json").read_text())
    assert set(results["predictions"]) == set(results["splits"]) != set()
    from medssl_jax import predictions

    for split, name in results["predictions"].items():
        pred = predictions.read_predictions_csv(evaldir / name)
        assert len(pred.case_ids) == results["splits"][split]["num_examples"], split
        assert len(set(pred.image_ids)) == len(pred.image_ids)
    assert not list(evaldir.glob("predictions_*.p*.csv"))


def test_multihost_mode_errors_name_the_problem(tmp_path):
    env = _env(tmp_path)
    base = [sys.executable, str(ROOT / "main.py"), "--config=configs/simclr.py:demo"]
    cases = (
        ("pods", [], "MEDSSL_MULTIHOST='pods'"),
        ("slurm", [], "run main.py under srun"),
        ("", ["--num_processes=2", "--process_id=1"], "need --coordinator_address"),
    )
    for mode, extra, want in cases:
        proc = subprocess.run(
            base + [f"--workdir={tmp_path}/w", *extra],
            env={**env, "MEDSSL_MULTIHOST": mode},
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode != 0 and want in proc.stderr, proc.stderr[-2000:]
