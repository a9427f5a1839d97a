"""The training benchmark (benchmarks/bench_train.py) and the launchers in launch/."""

import json
import os
import re
import subprocess
import sys

import jax
import pytest

from medssl_jax.models import abstract_variables, count_params, create_model
from tests.utils import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_train  # noqa: E402

LAUNCH = ROOT / "launch"
TINY_ARGS = [
    "--config",
    str(ROOT / "configs/simclr.py") + ":demo",
    "--variant",
    "tiny",
    "--image_size",
    "32",
    "--batch_size",
    "16",
    "--steps",
    "2",
    "--warmup",
    "1",
]


@pytest.fixture(scope="module")
def bench_report(tmp_path_factory, tfds_data_dir):
    out = tmp_path_factory.mktemp("bench") / "result.json"
    argv = TINY_ARGS + [
        "--pipeline",
        "--pipeline_batches",
        "2",
        "--set",
        f"data.data_dir={tfds_data_dir}",
        "--out",
        str(out),
    ]
    assert bench_train.main(argv) == 0
    with open(out) as f:
        return json.load(f)


def test_bench_train_json_has_positive_measurements(bench_report):
    assert len(jax.devices()) == 8
    env = bench_report["environment"]
    assert env["backend"] == "cpu" and env["jax_version"] == jax.__version__
    (r,) = bench_report["results"]
    assert (r["variant"], r["image_size"], r["batch_size"], r["dtype"], r["num_devices"]) == (
        "r18_0.125x_sk0",
        32,
        16,
        "float32",
        8,
    )
    for k in (
        "lower_s",
        "compile_s",
        "step_s_median",
        "images_per_s",
        "images_per_s_per_device",
        "pipeline_images_per_s",
        "pipeline_to_train_ratio",
    ):
        assert r[k] > 0, k
    assert r["peak_memory_bytes"] >= 0 and r["peak_memory_source"]
    assert len(r["step_s_all"]) == 2 and min(r["step_s_all"]) == pytest.approx(r["step_s_min"])
    # Two views per example, over all 8 devices.
    assert r["images_per_s"] == pytest.approx(2 * 16 / r["step_s_median"])
    assert r["images_per_s_per_device"] == pytest.approx(r["images_per_s"] / 8)
    assert r["pipeline_to_train_ratio"] == pytest.approx(
        r["pipeline_images_per_s"] / r["images_per_s"]
    )
    # Parameter count of the trained state = the model's (demo has no probe by default).
    model = create_model("r18_0.125x_sk0", num_proj_layers=2)
    assert r["params"] == count_params(abstract_variables(model, 32)["params"])
    assert 0 < r["backbone_params"] < r["params"]
    assert r["final_loss"] > 0


def test_bench_train_sweep_expands_and_resolves_aliases():
    args = bench_train.parse_args(
        [
            "--config",
            str(ROOT / "configs/micle.py") + ":demo",
            "--variant",
            "tiny,r50_1x",
            "--image_size",
            "32,64",
            "--batch_size",
            "16",
            "--dtype",
            "bfloat16",
        ]
    )
    configs = bench_train.sweep_configs(args)
    got = [(c.model.variant, c.data.image_size, c.batch_size, c.model.dtype) for c in configs]
    assert got == [
        ("r18_0.125x_sk0", 32, 16, "bfloat16"),
        ("r18_0.125x_sk0", 64, 16, "bfloat16"),
        ("r50_1x_sk0", 32, 16, "bfloat16"),
        ("r50_1x_sk0", 64, 16, "bfloat16"),
    ]
    assert all(c.method == "simclr" and c.sampler.multi_instance for c in configs)


def test_bench_train_conv1x1_axis_runs_both_paths_to_the_same_loss(tmp_path, monkeypatch):
    """--conv1x1 dot,conv: one entry per path; the step computes the same loss either way."""
    monkeypatch.setenv("MEDSSL_CONV1X1", "auto")  # restored after the test
    out = tmp_path / "conv.json"
    argv = TINY_ARGS[:-4] + ["--steps", "1", "--warmup", "1", "--conv1x1", "dot,conv"]
    assert bench_train.main(argv + ["--out", str(out)]) == 0
    dot, conv = json.loads(out.read_text())["results"]
    assert (dot["conv1x1"], dot["conv1x1_as_dot"]) == ("dot", True)
    assert (conv["conv1x1"], conv["conv1x1_as_dot"]) == ("conv", False)
    assert dot["final_loss"] == pytest.approx(conv["final_loss"], rel=1e-4)
    with pytest.raises(SystemExit):
        bench_train.parse_args(["--conv1x1", "fast"])


def test_fit_halves_the_batch_until_the_step_fits(monkeypatch, tmp_path):
    """--fit: a step that does not fit (here: any batch above 16) is retried at half the
    batch; the result says which batches were too big; MFU is achieved / peak."""
    real = bench_train.bench_memory.check_fits

    def fits_up_to_16(compiled, devices):
        need = real(compiled, devices)
        if compiled.args_info[0][1]["views"].shape[0] > 16:  # (state, batch)
            raise bench_train.bench_memory.DoesNotFit("needs more than the test allows")
        return need

    monkeypatch.setattr(bench_train.bench_memory, "check_fits", fits_up_to_16)
    out = tmp_path / "fit.json"
    argv = TINY_ARGS[:-4] + ["--steps", "1", "--warmup", "0", "--fit", "--batch_size", "64"]
    assert bench_train.main(argv + ["--out", str(out)]) == 0
    (r,) = json.loads(out.read_text())["results"]
    assert r["batch_size"] == 16 and r["batch_tried_and_too_big"] == [64, 32]
    assert r["mfu"] == pytest.approx(r["achieved_gflop_s"] / r["peak_gflop_s"])
    assert 0 < r["mfu"] < 1.5 and "measured" in r["peak_source"]
    # The step's FLOPs are the whole step's whatever the device count: the traced (global)
    # count is near the compiled one (per device, times the devices; each device also repeats
    # the replicated optimiser update, so it is a little higher), not the devices times it.
    assert r["num_devices"] > 1
    assert 0.5 < r["step_gflop"] / r["compiled_step_gflop"] < 1.5


@pytest.mark.slow
def test_gpu_script_runs_the_paper_suite_at_a_small_batch(tmp_path):
    """benchmarks/gpu.sh in smoke mode (32 px, batch 8, one step, on CPU): SimCLR and MICLe
    steps of R50-1x, R50-4x and R152-2x in bfloat16 (what an accelerator runs at 224 px), and
    the input pipeline on the real X-rays when ../shared has them. Run in two calls, as a device
    session cut short would: the second keeps the first's rows and runs only the others."""
    env = dict(
        os.environ,
        GPU_SH_SMOKE="1",
        NIH=str(ROOT.parent / "shared/data/nih_cxr_1000"),
        # One CPU device: 8 fake devices would hold 8 replicas of R50-4x's state (> 24 GiB).
        XLA_FLAGS="--xla_force_host_platform_device_count=1",
        STAMP="20261205",
    )

    def gpu_sh(**extra):
        proc = subprocess.run(
            ["bash", str(ROOT / "benchmarks/gpu.sh"), str(tmp_path)],
            env={**env, **extra},
            capture_output=True,
            text=True,
            timeout=1200,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    gpu_sh(ROWS="micle:r50_1x simclr:r50_1x")
    (suite,) = tmp_path.glob("gpu_*_paper_suite_20261205.json")
    first = json.loads(suite.read_text())["results"]
    assert [(r["label"], r["variant"]) for r in first] == [
        ("simclr", "r50_1x_sk0"),
        ("micle", "r50_1x_sk0"),
    ]
    proc = gpu_sh()
    assert "== simclr r50_1x: in" in proc.stderr and "== micle r50_1x: in" in proc.stderr
    assert "== simclr r152_2x\n" in proc.stderr
    rs = json.loads(suite.read_text())["results"]
    assert rs[0] == first[0] and rs[3] == first[1]  # kept as they were, not rerun
    got = [(r["label"], r["variant"], r["image_size"], r["dtype"]) for r in rs]
    models = ("r50_1x_sk0", "r50_4x_sk0", "r152_2x_sk0")
    assert got == [(m, v, 32, "bfloat16") for m in ("simclr", "micle") for v in models]
    backbone = {r["variant"]: r["backbone_params"] / 1e6 for r in rs}
    assert backbone == pytest.approx(  # REFERENCE.md's counts
        {"r50_1x_sk0": 23.5, "r50_4x_sk0": 375.4, "r152_2x_sk0": 232.3}, abs=0.06
    )
    assert all(r["mfu"] > 0 and r["images_per_s"] > 0 for r in rs)
    pipeline = list(tmp_path.glob("gpu_*_pipeline_*.json"))
    if (ROOT.parent / "shared/data/nih_cxr_1000").is_dir():
        (p,) = pipeline
        r50 = max(r["images_per_s_per_device"] for r in rs if r["variant"] == "r50_1x_sk0")
        assert json.loads(p.read_text())["demand_images_per_s"] == pytest.approx(r50)
    else:
        assert not pipeline and "not measured" in proc.stderr


def test_step_and_its_benchmark_import_without_tensorflow():
    """Accelerator images often lack TensorFlow (and it is too big to carry there): the step
    (`pretrain.build`), device augmentation and bench_train must not need it; only the host
    pipeline and clu's summary writers do, and they are imported where a run uses them."""
    code = (
        "import sys\n"
        "for m in ('tensorflow', 'tensorflow_datasets'): sys.modules[m] = None\n"
        f"sys.path.insert(0, {str(ROOT / 'benchmarks')!r})\n"
        "import bench_train\n"
        "from medssl_jax import augment_device, loop, pretrain, state\n"
        "bench_train.parse_args(['--suite', 'paper'])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_bench_train_rejects_batch_not_divisible_by_devices(capsys):
    with pytest.raises(SystemExit, match=r"--batch_size 12 must be a multiple .*devices \(8"):
        bench_train.main(TINY_ARGS[:-6] + ["--batch_size", "12"])
    with pytest.raises(SystemExit):
        bench_train.parse_args(["--variant", "r51_1x_sk0"])
    assert "--variant" in capsys.readouterr().err


def test_colab_notebook_is_valid_nbformat4():
    with open(LAUNCH / "colab.ipynb") as f:
        nb = json.load(f)
    assert nb["nbformat"] == 4 and nb["nbformat_minor"] >= 4
    assert nb["metadata"]["kernelspec"]["language"] == "python"
    ids = set()
    for cell in nb["cells"]:
        assert cell["cell_type"] in ("markdown", "code")
        assert isinstance(cell["metadata"], dict) and isinstance(cell["source"], list)
        ids.add(cell["id"])
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None
            compile("".join(cell["source"]), "cell", "exec")  # valid Python
    assert len(ids) == len(nb["cells"])
    code = "".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
    for needle in (
        "configs/micle.py:demo",
        "configs/finetune.py:demo",
        "stop_after_steps",
        "medssl_jax.report",
        "pip",
    ):
        assert needle in code, needle


@pytest.mark.parametrize("script", ["tpu_vm.sh", "slurm_gpu.sbatch"])
def test_shell_scripts_parse(script):
    subprocess.run(["bash", "-n", str(LAUNCH / script)], check=True)


# launch/tpu_vm.sh: tests/test_launch_tpu.py


@pytest.mark.parametrize("reason,requeued", [("preempted", True), ("completed", False)])
def test_slurm_script_requeues_only_after_preemption(tmp_path, reason, requeued):
    """Fake srun/scontrol: srun writes results.json with `reason`; requeue iff preempted."""
    bin_dir, submit = tmp_path / "bin", tmp_path / "repo"
    bin_dir.mkdir()
    (submit / "configs").mkdir(parents=True)
    (submit / "main.py").write_text("")
    (submit / "configs/micle.py").write_text("")
    os.symlink(sys.executable, bin_dir / "python")
    (bin_dir / "srun").write_text(
        '#!/bin/bash\necho "$@" > "$FAKE_LOG/srun_args"\n'
        'for a in "$@"; do case $a in --workdir=*) w=${a#--workdir=};; esac; done\n'
        'echo \'{"stop_reason": "\'$FAKE_REASON\'"}\' > "$w/results.json"\n'
    )
    (bin_dir / "scontrol").write_text('#!/bin/bash\necho "$@" > "$FAKE_LOG/scontrol"\n')
    for f in ("srun", "scontrol"):
        (bin_dir / f).chmod(0o755)
    env = dict(
        os.environ,
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        SLURM_SUBMIT_DIR=str(submit),
        SLURM_JOB_ID="4242",
        VENV=str(tmp_path / "no_venv"),
        FAKE_LOG=str(tmp_path),
        FAKE_REASON=reason,
    )
    workdir = tmp_path / "run"
    p = subprocess.run(
        [
            "bash",
            str(LAUNCH / "slurm_gpu.sbatch"),
            "configs/micle.py:demo",
            str(workdir),
            "--config.batch_size=64",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert p.returncode == 0, p.stderr
    srun = (tmp_path / "srun_args").read_text()
    assert re.search(
        rf"python main.py --config=configs/micle.py:demo --workdir={workdir} "
        r"--config.batch_size=64",
        srun,
    )
    assert (tmp_path / "scontrol").exists() == requeued
    if requeued:
        assert (tmp_path / "scontrol").read_text().split() == ["requeue", "4242"]


def test_hbm_peak_sums_the_live_buffers_by_pass_and_stage():
    """benchmarks/hbm_peak.py on the shape of XLA's live-range dump: top-level buffers of the
    peak's stack-trace breakdown summed by forward / backward / other and ResNet stage."""
    import hbm_peak

    op = "jit(step)/transpose(jvp(SimCLRModel))/backbone/checkpoint"
    text = "\n".join(
        [
            "  Live ranges at 7 (peak):",
            "  Stack trace breakdown for peak usage: 3 500 bytes",
            "    main_spmd (100.0%, total: 3 500 bytes, current: 0 bytes, remaining: 3 500 bytes)",
            f"      ├── {op}/group2_block0/bn3/add_any (40.0%, total: 1 000 bytes, current: 1 000"
            " bytes, remaining: 2 500 bytes)",
            f"      ├── {op}/group2_block5/bn3/add_any (40.0%, total: 1 500 bytes, current: 1 500"
            " bytes, remaining: 1 000 bytes)",
            "      ├── jit(step)/jvp(SimCLRModel)/backbone/stem_bn0/jit(relu)/max (1.0%, total: 600"
            " bytes, current: 600 bytes, remaining: 400 bytes)",
            "      │   └── jit(step)/jvp(SimCLRModel)/backbone/group1_block0/x (nested, not a"
            " buffer of its own, total: 99 bytes)",
            "      └── copy-start.12{0} (1.0%, total: 400 bytes, current: 400 bytes, remaining: 0"
            " bytes)",
        ]
    )
    peak, sums = hbm_peak.peak_breakdown(text)
    assert peak == 3500
    assert sums == {
        ("backward", "group2"): (2500, 2),
        ("forward", "stem"): (600, 1),
        ("other", "copy-start{}"): (400, 1),
    }
    with pytest.raises(ValueError, match="peak usage"):
        hbm_peak.peak_breakdown("no such section")
