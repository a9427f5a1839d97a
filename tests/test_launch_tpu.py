"""launch/tpu_vm.sh (dry run, and its TPU VM state logic against a fake gcloud) and the TPU path
of launch/colab.ipynb. Needs bash; no gcloud, no network."""

import json
import os
import shlex
import subprocess
import sys
import time

import pytest

from tests.utils import ROOT

SCRIPT = ROOT / "launch" / "tpu_vm.sh"
CONFIG, WORKDIR = "configs/micle.py:r50_1x,chexpert", "gs://bucket/runs/micle_cxr"
# An extra main.py argument that needs quoting twice (local shell, then the worker's shell).
TRICKY = '--config.note=it\'s a $HOME `x` "run"'
APT = "sudo DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600"
REPO = ["--repo", "https://example.com/medssl_jax.git"]  # no tar of this checkout

# A fake gcloud: logs each call's argv (one NUL-separated file per call), answers `describe`
# from $FAKE_DIR/states (one state a line, the first line used and dropped while more than
# one is left; NOT_FOUND and DENIED are errors as gcloud prints them), and notes whether the
# archive that `scp` copies exists at that moment. create/delete/ssh/scp only log.
FAKE_GCLOUD = r"""#!/usr/bin/env bash
n=$(cat "$FAKE_DIR/n" 2>/dev/null || echo 0)
printf '%s\0' "$@" > "$FAKE_DIR/call_$(printf %03d "$n")"
echo $((n + 1)) > "$FAKE_DIR/n"
case "$4" in
  describe)
    s="$FAKE_DIR/states"
    state=$(head -n 1 "$s")
    if [[ $(wc -l < "$s") -gt 1 ]]; then tail -n +2 "$s" > "$s.next" && mv "$s.next" "$s"; fi
    err="ERROR: (gcloud.compute.tpus.tpu-vm.describe)"
    case "$state" in
      NOT_FOUND) echo "$err NOT_FOUND: Resource 'nodes/$5' was not found" >&2; exit 1 ;;
      DENIED) echo "$err PERMISSION_DENIED: no" >&2; exit 1 ;;
    esac
    echo "$state" ;;
  scp) [[ -f "$5" ]] && echo "$5" > "$FAKE_DIR/scp_saw_archive" ;;
esac
exit 0
"""


def _env(tmp_path, **extra):
    """PATH with a fake gcloud first (logging to tmp_path/fake), TMPDIR in tmp_path."""
    bin_dir, fake, tmp = tmp_path / "bin", tmp_path / "fake", tmp_path / "tmp"
    for d in (bin_dir, fake, tmp):
        d.mkdir(exist_ok=True)
    (bin_dir / "gcloud").write_text(FAKE_GCLOUD)
    (bin_dir / "gcloud").chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_DIR=str(fake))
    env.update(TMPDIR=str(tmp), MEDSSL_TPU_POLL_S="0", **extra)
    return env


def _tpu(*args, env=None):
    return subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=60, env=env
    )


def _calls(tmp_path):
    """The fake gcloud's calls, in order, each as its argv without 'compute tpus tpu-vm'."""
    out = []
    for f in sorted((tmp_path / "fake").glob("call_*")):
        argv = f.read_text().split("\0")[:-1]
        assert argv[:3] == ["compute", "tpus", "tpu-vm"], argv
        out.append(argv[3:])
    return out


def _commands(stdout):
    """The dry run's commands (comment lines dropped), each split as the shell would."""
    return [shlex.split(ln) for ln in stdout.splitlines() if ln and not ln.startswith("#")]


def _remote(argv):
    """The remote shell command of a `gcloud ... ssh ... --command=CMD` argv."""
    (cmd,) = [a[len("--command=") :] for a in argv if a.startswith("--command=")]
    return cmd


def _dry_run(tmp_path, *options, extra=("--config.batch_size=1024", TRICKY)):
    p = _tpu(
        "--dry-run",
        *options,
        "my-tpu",
        "us-central2-b",
        "v4-32",
        CONFIG,
        WORKDIR,
        "--",
        *extra,
        env=_env(tmp_path),
    )
    assert p.returncode == 0, p.stderr
    return p


def test_dry_run_prints_exactly_the_commands_and_runs_nothing(tmp_path):
    p = _dry_run(tmp_path)
    assert _calls(tmp_path) == []  # gcloud never called
    assert list((tmp_path / "tmp").iterdir()) == []  # no archive (nor anything else) written
    cmds = _commands(p.stdout)
    g = ["gcloud", "compute", "tpus", "tpu-vm"]
    loc = ["my-tpu", "--zone=us-central2-b"]
    assert cmds[0] == g + ["describe", *loc, "--format=value(state)"]
    assert cmds[1] == g + [
        "create",
        *loc,
        "--accelerator-type=v4-32",
        "--version=tpu-ubuntu2204-base",
    ]
    tar, scp, untar, rm = cmds[2:6]
    archive = tar[tar.index("-czf") + 1]
    assert tar[0] == "tar" and archive.startswith(str(tmp_path / "tmp") + "/")
    assert "--exclude=.git" in tar and "--exclude=.venv" in tar and tar[-1] == "."
    assert tar[tar.index("-C") + 1] == str(ROOT)
    assert scp == g + ["scp", archive, "my-tpu:medssl_jax_src.tar.gz", loc[1], "--worker=all"]
    assert not os.path.exists(archive)
    assert untar[:8] == g + ["ssh", *loc, "--worker=all"]
    assert "tar -xzf medssl_jax_src.tar.gz -C medssl_jax" in _remote(untar)
    assert rm == ["rm", "-f", archive]
    python, install, train = cmds[6:]
    assert len(cmds) == 9
    for c in (python, install, train):
        assert c[:8] == g + ["ssh", *loc, "--worker=all"], c
    # Python 3.11 on every worker (apt unless the image has it), a venv made from it ...
    assert _remote(python) == (
        "python3.11 -c 'import ensurepip, venv' 2>/dev/null || { "
        f"{APT} update -qq && {APT} install -y -qq python3.11 python3.11-venv; }}"
    )
    assert _remote(install) == (
        "python3.11 -m venv ~/medssl_venv && ~/medssl_venv/bin/python -m pip install -q -U pip"
        " && cd medssl_jax && ~/medssl_venv/bin/python -m pip install -q -e . 'jax[tpu]'"
    )
    # ... and training with the venv's python, as one process of many.
    assert _remote(train).startswith(
        "cd medssl_jax && export TF_CPP_MIN_LOG_LEVEL=2 MEDSSL_MULTIHOST=tpu && "
        f"~/medssl_venv/bin/python main.py --config={CONFIG} --workdir={WORKDIR} "
        "--config.batch_size=1024 '--config.note="
    )
    # The PREEMPTED/TERMINATED branch is shown with its exact delete command.
    comments = [ln for ln in p.stdout.splitlines() if ln.startswith("#")]
    assert any("PREEMPTED or TERMINATED" in ln and "create it again" in ln for ln in comments)
    delete = "#   gcloud compute tpus tpu-vm delete my-tpu --zone=us-central2-b --quiet"
    assert delete in comments
    assert any("CREATING" in ln and "poll" in ln for ln in comments)


def test_dry_run_options(tmp_path):
    p = _dry_run(
        tmp_path,
        "--python",
        "3.12",
        "--spot",
        "--project",
        "my-proj",
        "--version",
        "v2-alpha-tpuv6e",
        "--detach",
        *REPO,
        "--branch",
        "v1 rc",
        extra=(),
    )
    cmds = _commands(p.stdout)
    loc = ["my-tpu", "--zone=us-central2-b", "--project=my-proj"]
    assert cmds[0][4:] == ["describe", *loc, "--format=value(state)"]
    assert cmds[1][4:] == [
        "create",
        *loc,
        "--accelerator-type=v4-32",
        "--version=v2-alpha-tpuv6e",
        "--spot",
    ]
    clone, python, install, train = map(_remote, cmds[2:])
    assert clone == (
        "rm -rf medssl_jax && git clone https://example.com/medssl_jax.git medssl_jax"
        " && git -C medssl_jax checkout 'v1 rc'"
    )
    assert "apt-get -o DPkg::Lock::Timeout=600 install -y -qq python3.12 python3.12-venv" in python
    assert install.startswith("python3.12 -m venv ~/medssl_venv && ")
    assert train.startswith("nohup bash -c 'cd medssl_jax && export ")
    assert train.endswith("' > ~/medssl_train.log 2>&1 < /dev/null &")
    assert "tar" not in p.stdout
    p = _dry_run(tmp_path, "--skip-setup")
    assert [c[4] for c in _commands(p.stdout)] == ["describe", "create", "ssh"]
    assert "--skip-setup" in p.stdout


@pytest.mark.parametrize("detach", [False, True])
def test_training_command_reaches_main_py_intact(tmp_path, detach):
    """Runs the dry run's remote training command in a shell, with HOME holding a fake venv
    python that records its argv and MEDSSL_MULTIHOST: quoting survives both shells."""
    p = _dry_run(tmp_path, *(["--detach"] if detach else []))
    home = tmp_path / "home"
    (home / "medssl_jax").mkdir(parents=True)
    (home / "medssl_venv/bin").mkdir(parents=True)
    record = home / "record.json"
    fake_python = home / "medssl_venv/bin/python"
    fake_python.write_text(
        f"#!{sys.executable}\nimport json, os, sys\n"
        f"json.dump({{'argv': sys.argv[1:], 'cwd': os.getcwd(), "
        f"'multihost': os.environ.get('MEDSSL_MULTIHOST')}}, open({str(record)!r}, 'w'))\n"
    )
    fake_python.chmod(0o755)
    train = _remote(_commands(p.stdout)[-1])
    env = dict(os.environ, HOME=str(home))
    env.pop("MEDSSL_MULTIHOST", None)
    subprocess.run(["bash", "-c", train], cwd=home, env=env, check=True, timeout=30)
    for _ in range(100):  # --detach: nohup ... & returns at once
        if record.exists() and record.stat().st_size:
            break
        time.sleep(0.1)
    got = json.loads(record.read_text())
    assert got == {
        "argv": [
            "main.py",
            f"--config={CONFIG}",
            f"--workdir={WORKDIR}",
            "--config.batch_size=1024",
            TRICKY,
        ],
        "cwd": str(home / "medssl_jax"),
        "multihost": "tpu",
    }
    assert (home / "medssl_train.log").exists() == detach


@pytest.mark.parametrize(
    "args,message",
    [
        (["my-tpu", "zone", "v4-8", "configs/simclr.py:demo", "/local/dir"], "must be a gs://"),
        (["my-tpu", "zone", "v4-8", "configs/nope.py", "gs://b/w"], "configs/nope.py"),
        (["my-tpu", "zone", "tpu-8", "configs/simclr.py:demo", "gs://b/w"], "ACCELERATOR_TYPE"),
        (["My_TPU", "zone", "v4-8", "configs/simclr.py:demo", "gs://b/w"], "NAME 'My_TPU'"),
        (["my-tpu", "zone"], "expected NAME ZONE"),
        (["--python", "3.10", "t", "z", "v4-8", "configs/simclr.py:demo", "gs://b/w"], "3.11"),
        (["--bogus", "t", "z", "v4-8", "configs/simclr.py:demo", "gs://b/w"], "unknown option"),
    ],
)
def test_rejects_bad_arguments(tmp_path, args, message):
    p = _tpu("--dry-run", *args, env=_env(tmp_path))
    assert p.returncode == 2, p.stdout
    assert message in p.stderr and p.stderr.startswith("tpu_vm.sh: error: ")
    assert _calls(tmp_path) == [] and p.stdout == ""


def _run_fake(tmp_path, states, *options, **env):
    """tpu_vm.sh for real against the fake gcloud; returns (process, the gcloud verbs)."""
    env = _env(tmp_path, **env)
    (tmp_path / "fake/states").write_text("".join(s + "\n" for s in states))
    p = _tpu(*options, "my-tpu", "zone-a", "v4-8", "configs/simclr.py:demo", "gs://b/w", env=env)
    return p, [c[0] for c in _calls(tmp_path)]


SETUP = ["ssh", "ssh", "ssh"]  # clone, python, venv + install


@pytest.mark.parametrize(
    "states,verbs",
    [
        (["READY"], ["describe", *SETUP, "ssh"]),
        (["PREEMPTED"], ["describe", "delete", "create", *SETUP, "ssh"]),
        (["TERMINATED"], ["describe", "delete", "create", *SETUP, "ssh"]),
        (["NOT_FOUND"], ["describe", "create", *SETUP, "ssh"]),
        (["CREATING", "STARTING", "READY"], ["describe"] * 3 + [*SETUP, "ssh"]),
        (["DELETING", "NOT_FOUND"], ["describe", "describe", "create", *SETUP, "ssh"]),
    ],
)
def test_vm_state_decides_reuse_or_recreate(tmp_path, states, verbs):
    p, got = _run_fake(tmp_path, states, *REPO)
    assert p.returncode == 0, p.stderr
    assert got == verbs
    calls = _calls(tmp_path)
    assert calls[0] == ["describe", "my-tpu", "--zone=zone-a", "--format=value(state)"]
    if "delete" in verbs:
        assert calls[1] == ["delete", "my-tpu", "--zone=zone-a", "--quiet"]
        assert f"is {states[0]}" in p.stdout and "deleting and creating it anew" in p.stdout
    if "create" in verbs:
        create = calls[verbs.index("create")]
        assert create == [
            "create",
            "my-tpu",
            "--zone=zone-a",
            "--accelerator-type=v4-8",
            "--version=tpu-ubuntu2204-base",
        ]
    train = _remote(calls[-1])
    assert "MEDSSL_MULTIHOST=tpu && ~/medssl_venv/bin/python main.py" in train


@pytest.mark.parametrize(
    "state,verbs",
    [
        ("READY", ["describe", "ssh"]),
        ("PREEMPTED", ["describe", "delete", "create", *SETUP, "ssh"]),
    ],
)
def test_skip_setup_is_ignored_on_a_new_vm(tmp_path, state, verbs):
    p, got = _run_fake(tmp_path, [state], "--skip-setup", *REPO)
    assert p.returncode == 0, p.stderr
    assert got == verbs
    assert ("despite --skip-setup" in p.stdout) == (state != "READY")


@pytest.mark.parametrize(
    "states,message",
    [
        (["STOPPED"], "in state STOPPED"),
        (["DENIED"], "PERMISSION_DENIED"),
        (["CREATING"], "still CREATING after 0 s"),
    ],
)
def test_vm_state_errors_stop_before_anything_is_created(tmp_path, states, message):
    p, got = _run_fake(tmp_path, states, *REPO, MEDSSL_TPU_WAIT_S="0")
    assert p.returncode == 2
    assert message in p.stderr
    assert set(got) == {"describe"}


def test_copy_sends_an_archive_and_removes_it(tmp_path):
    p, got = _run_fake(tmp_path, ["READY"])
    assert p.returncode == 0, p.stderr
    assert got == ["describe", "scp", "ssh", "ssh", "ssh", "ssh"]
    archive = (tmp_path / "fake/scp_saw_archive").read_text().strip()
    assert archive.startswith(str(tmp_path / "tmp"))  # existed when scp ran ...
    assert list((tmp_path / "tmp").iterdir()) == []  # ... and is gone


# The Colab notebook's TPU path: its install helpers (cell-02), run here on made-up runtimes.


@pytest.fixture(scope="module")
def colab_helpers():
    with open(ROOT / "launch" / "colab.ipynb") as f:
        cells = {c["id"]: c for c in json.load(f)["cells"]}
    ns = {}
    exec(compile("".join(cells["cell-02"]["source"]), "cell-02", "exec"), ns)
    install = "".join(cells["cell-02b"]["source"])
    return ns, install


REQUIRES = [
    "jax[cpu]<0.11,>=0.7",
    "flax<0.13,>=0.11",
    "tensorflow-cpu<2.22,>=2.18",
    "tensorboard<2.22,>=2.18",
    "numpy<3,>=1.26",
    'pytest>=8; extra == "test"',
]


def test_colab_tpu_installs_jax_tpu_and_keeps_colabs_tensorflow(colab_helpers):
    ns, install = colab_helpers
    colab = {"tensorflow": "2.19.0"}.get
    reqs = ns["pip_requirements"](REQUIRES, "tpu", installed=colab)
    assert reqs == [
        "jax[tpu]<0.11,>=0.7",
        "flax<0.13,>=0.11",
        "tensorboard<2.22,>=2.18",
        "numpy<3,>=1.26",
    ]
    assert ns["pip_requirements"](REQUIRES, "gpu", installed=colab)[0] == "jax[cuda12]<0.11,>=0.7"
    # A TensorFlow outside the range is upgraded as itself, never replaced by tensorflow-cpu.
    old = ns["pip_requirements"](REQUIRES, "tpu", installed={"tensorflow": "2.15.1"}.get)
    assert "tensorflow<2.22,>=2.18" in old and not any("tensorflow-cpu" in r for r in old)
    bare = ns["pip_requirements"](REQUIRES, "cpu", installed=lambda d: None)
    assert bare[:3] == ["jax[cpu]<0.11,>=0.7", "flax<0.13,>=0.11", "tensorflow-cpu<2.22,>=2.18"]
    assert ns["detect_runtime"]("tpu") == "tpu"
    # The install cell: the package without its dependencies, then pip_requirements's list,
    # and a check (in a subprocess) that jax really uses the TPU.
    assert '"--no-deps", "-e", "."' in install
    assert "pip_requirements(filter(None, requires), runtime)" in install
    assert 'runtime == "tpu" and jax_backend != "tpu"' in install
