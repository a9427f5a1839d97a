"""Fault injection: kill -9 and SIGTERM at chosen and random moments (mid async save included),
corrupt and non-finite checkpoints, a diverging run, a full disk, and the one-line errors of
main.py. Each test breaks something on purpose and checks what is kept."""

from __future__ import annotations

import os
import pathlib
import queue
import random
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medssl_jax import checkpoint, pretrain, train
from medssl_jax.loop import DivergenceError
from tests.utils import ROOT, tiny_pretrain_config

WORKER = ROOT / "tests" / "fault_worker.py"


# --------------------------------------------------------------------------------------------
# A real training process, killed at chosen moments.


class Worker:
    """tests/fault_worker.py as a subprocess, with its stdout markers on a queue."""

    def __init__(self, workdir: pathlib.Path, data_dir: str, slow_rename: float = 0.0):
        self.log = open(workdir.parent / f"{workdir.name}.{time.time_ns()}.err", "w")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKER), str(workdir), data_dir, str(slow_rename)],
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            cwd=str(ROOT),
        )
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.strip())
        self.lines.put(None)

    def wait_for(self, prefix: str, timeout: float = 300.0) -> str:
        end = time.time() + timeout
        while time.time() < end:
            try:
                line = self.lines.get(timeout=max(end - time.time(), 0.01))
            except queue.Empty:
                break
            if line is None:
                raise AssertionError(f"worker exited before {prefix!r}: {self.stderr()}")
            if line.startswith(prefix):
                return line
        raise AssertionError(f"no {prefix!r} within {timeout} s")

    def kill(self, sig: int) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=300)

    def finish(self) -> str:
        line = self.wait_for("DONE")
        assert self.proc.wait(timeout=300) == 0, self.stderr()
        return line

    def stderr(self) -> str:
        self.log.flush()
        return pathlib.Path(self.log.name).read_text()[-3000:]


def _final_variables(workdir: pathlib.Path) -> tuple[dict, dict, int]:
    return checkpoint.load_variables(str(workdir))


def _steps_on_disk(workdir: pathlib.Path) -> list[str]:
    return sorted(p.name for p in (workdir / "checkpoints").iterdir())


@pytest.mark.slow
def test_kill_at_any_moment_then_resume_equals_uninterrupted_run(tmp_path, tfds_data_dir):
    """SIGKILL while an async save is being committed, right after a save started, and at a
    random moment; SIGTERM (preemption) at a step. Each rerun resumes from the newest complete
    checkpoint, and the run ends with exactly the parameters of a run never interrupted."""
    seed = int(os.environ.get("FAULT_SEED", time.time_ns() % 10_000))
    rng = random.Random(seed)
    ref = tmp_path / "ref"
    assert "DONE completed 16" in Worker(ref, tfds_data_dir).finish()

    run = tmp_path / "run"
    w = Worker(run, tfds_data_dir, slow_rename=3.0)  # the first save's commit takes 3 s
    w.wait_for("RENAME")
    assert w.kill(signal.SIGKILL) == -signal.SIGKILL
    on_disk = _steps_on_disk(run)
    assert not [s for s in on_disk if s.isdigit()], f"a half-committed step is visible: {on_disk}"

    w = Worker(run, tfds_data_dir, slow_rename=1.0)
    saved = int(w.wait_for("SAVE 6").split()[1])  # killed with the async write in flight
    w.kill(signal.SIGKILL)

    w = Worker(run, tfds_data_dir, slow_rename=1.0)  # >= 3 s per save: the run outlives 2 s
    w.wait_for("STEP")
    time.sleep(rng.uniform(0.0, 2.0))  # anywhere: mid step, mid save, mid commit
    w.kill(signal.SIGKILL)

    w = Worker(run, tfds_data_dir)
    w.wait_for("STEP")
    assert w.kill(signal.SIGTERM) == 0, w.stderr()  # preemption: checkpoint, clean exit

    done = Worker(run, tfds_data_dir).finish()
    assert "DONE completed 16" in done, (seed, done)
    assert not [s for s in _steps_on_disk(run) if s.startswith("unusable")], seed
    p_ref, s_ref, step_ref = _final_variables(ref)
    p_run, s_run, step_run = _final_variables(run)
    assert step_ref == step_run == 16 and saved == 6
    for a, b in zip(jax.tree.leaves((p_ref, s_ref)), jax.tree.leaves((p_run, s_run)), strict=True):
        np.testing.assert_array_equal(a, b, err_msg=f"FAULT_SEED={seed}")


# --------------------------------------------------------------------------------------------
# Corrupt, non-finite and foreign checkpoints.


def _state(value: float, n: int = 4096) -> dict:
    return {
        "params": {"w": np.full((n,), value, np.float32), "b": np.full((3,), value, np.float32)},
        "step": np.asarray(int(value), np.int32),
    }


def _checkpointer(path, keep: int = 5, async_save: bool = False) -> checkpoint.Checkpointer:
    return checkpoint.Checkpointer(str(path), every_steps=1, keep=keep, async_save=async_save)


def _largest_file(folder: pathlib.Path) -> pathlib.Path:
    return max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_corrupt_newest_checkpoint_is_reported_and_previous_used(tmp_path, damage, caplog):
    ck = _checkpointer(tmp_path)
    for step in (2, 4):
        assert ck.save(step, _state(step), {"step": step})
    ck.close()
    victim = _largest_file(tmp_path / "checkpoints" / "4" / "state")
    if damage == "truncate":
        with open(victim, "r+b") as f:
            f.truncate(victim.stat().st_size // 2)
    else:
        victim.unlink()
    ck = _checkpointer(tmp_path)
    state, meta, step = ck.restore_newest_usable(_state(0))
    assert step == 2 and meta == {"step": 2}
    np.testing.assert_array_equal(state["params"]["w"], _state(2)["params"]["w"])
    assert "unusable_4_unreadable" in _steps_on_disk(tmp_path)
    assert "Checkpoint" in caplog.text and "unusable" in caplog.text
    # The run goes on: step 4 can be written again and is then the one restored.
    assert ck.save(4, _state(4), {"step": 4})
    ck.close()
    assert _checkpointer(tmp_path).restore_newest_usable(_state(0))[2] == 4


def test_damaged_array_data_with_readable_metadata_falls_back(tmp_path):
    """The newest step's metadata reads fine but its array data is truncated: the restore itself
    fails, the step is set aside, and the previous one is used."""
    rng = np.random.default_rng(0)
    states = {s: {"w": rng.normal(size=1 << 15).astype(np.float32)} for s in (2, 4)}
    ck = _checkpointer(tmp_path)
    for step, state in states.items():
        assert ck.save(step, state, {"step": step})
    ck.close()
    data = [p for p in (tmp_path / "checkpoints" / "4" / "state").rglob("d/*") if p.is_file()]
    victim = max(data, key=lambda p: p.stat().st_size)  # the random array's chunk
    assert victim.stat().st_size > 1 << 16
    with open(victim, "r+b") as f:
        f.truncate(victim.stat().st_size // 2)
    ck = _checkpointer(tmp_path)
    tried, restore = [], ck.restore

    def recording(abstract, step):
        tried.append(step)
        return restore(abstract, step)

    ck.restore = recording
    state, meta, step = ck.restore_newest_usable({"w": np.zeros(1 << 15, np.float32)})
    assert tried == [4, 2]  # step 4's metadata passed; its restore failed
    assert step == 2 and meta == {"step": 2}
    np.testing.assert_array_equal(state["w"], states[2]["w"])
    assert "unusable_4_unreadable" in _steps_on_disk(tmp_path)


def test_nonfinite_checkpoint_is_never_resumed_and_foreign_one_is_an_error(tmp_path):
    ck = _checkpointer(tmp_path)
    ck.save(2, _state(2), {})
    bad = _state(4)
    bad["params"]["b"][1] = np.inf
    ck.save(4, bad, {})  # e.g. written by an older version without the state check
    ck.close()
    ck = _checkpointer(tmp_path)
    assert ck.restore_newest_usable(_state(0))[2] == 2
    assert "unusable_4_nonfinite" in _steps_on_disk(tmp_path)
    ck.close()
    other = _state(0, n=100)  # another model: a different shape
    with pytest.raises(
        checkpoint.CheckpointError, match=r"params/w is \(4096,\) there and \(100,\)"
    ):
        _checkpointer(tmp_path).restore_newest_usable(other)


# Sometimes (2 of the last 4 CI runs), after the failed write, a callback still in flight posts
# to the asyncio loop Orbax has already closed: "Exception ignored in: None ... Event loop is
# closed", from native code with no Python frame of ours (the checkpoint library's writer
# threads). A library race after an I/O error; the assertions below are what this project
# promises (a clear error, the previous checkpoint intact).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("async_save", [False, True])
def test_full_disk_while_saving_is_a_clear_error_and_keeps_the_previous_checkpoint(
    tmp_path, async_save
):
    noise = np.random.default_rng(0).standard_normal(1 << 18).astype(np.float32)  # 1 MiB

    def big(v: float) -> dict:  # incompressible, unlike a constant array
        s = _state(v, n=1 << 18)
        s["params"]["w"] = noise + v
        return s

    ck = _checkpointer(tmp_path, async_save=async_save)
    ck.save(1, big(1), {})
    ck.manager.wait_until_finished()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes fail with EFBIG
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))  # "disk full" past 64 KiB
        with pytest.raises(checkpoint.CheckpointError, match=r"newest: 1\b") as err:
            ck.save(2, big(2), {})
            ck.close()
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    assert "could not write a checkpoint" in str(err.value)
    ck = _checkpointer(tmp_path)
    state, _, step = ck.restore_newest_usable(_state(0, n=1 << 18))
    assert step == 1
    np.testing.assert_array_equal(state["params"]["w"], noise + 1)


# --------------------------------------------------------------------------------------------
# Divergence: the NaN guard checks the state, and nan_policy='skip'.


def _run_with_fault(monkeypatch, workdir, config, before=None, after=None):
    """pretrain.train_and_evaluate with faults injected around every update (outside the
    compiled step): `before(i, state, batch) -> (state, batch)`, `after(i, state) -> state`,
    i the update's index. Returns (results, params before each update)."""
    build = pretrain.build
    seen = {}

    def faulty_build(*a, **kw):
        built = build(*a, **kw)
        step = built.step

        def faulty(state, batch):
            i = int(state.step)
            seen[i] = jax.device_get(state.params)
            if before is not None:
                state, batch = before(i, state, batch)
            state, metrics = step(state, batch)
            return (after(i, state) if after is not None else state), metrics

        built.step = faulty
        return built

    monkeypatch.setattr(pretrain, "build", faulty_build)
    try:
        return pretrain.train_and_evaluate(config, str(workdir)), seen
    finally:
        monkeypatch.setattr(pretrain, "build", build)


def _poison_params(at: int):
    def after(i, state):  # this update's loss was finite; the state after it is not
        if i == at:
            state = state.replace(params=jax.tree.map(lambda x: x * jnp.inf, state.params))
        return state

    return after


def test_divergence_leaves_a_finite_checkpoint_that_resumes(tmp_path, monkeypatch, tfds_data_dir):
    config = tiny_pretrain_config("simclr", num_steps=6, checkpoint_every_steps=1)
    config.data.data_dir = tfds_data_dir
    with pytest.raises(DivergenceError, match=r"Newest checkpoint \(finite\): step 3 ") as err:
        _run_with_fault(monkeypatch, tmp_path, config, after=_poison_params(at=3))
    assert "state became non-finite by step 4" in str(err.value)
    ck = _checkpointer(tmp_path)
    assert ck.manager.all_steps() == [1, 2, 3]  # 4 was never written
    ck.close()
    # The rerun resumes from step 3 and finishes without diverging.
    results, _ = _run_with_fault(monkeypatch, tmp_path, config)
    assert results["resumed_from_step"] == 3 and results["step"] == 6
    assert np.isfinite(results["final_metrics"]["loss"])


def test_nan_policy_skip_drops_the_bad_update_and_goes_on(tmp_path, monkeypatch, tfds_data_dir):
    config = tiny_pretrain_config("simclr", num_steps=6, nan_policy="skip")
    config.data.data_dir = tfds_data_dir

    def nan_batch(at):
        def fault(i, state, batch):
            if i in at:
                batch = {**batch, "views": batch["views"] * jnp.nan}
            return state, batch

        return fault

    results, seen = _run_with_fault(monkeypatch, tmp_path / "a", config, before=nan_batch({2}))
    assert results["skipped_steps"] == [2] and results["step"] == 6
    for a, b in zip(jax.tree.leaves(seen[2]), jax.tree.leaves(seen[3]), strict=True):
        np.testing.assert_array_equal(a, b)  # the NaN update left the parameters unchanged
    assert any(
        not np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(seen[3]), jax.tree.leaves(seen[4]), strict=True)
    )
    _, _, step = checkpoint.load_variables(str(tmp_path / "a"))
    assert step == 6
    config.nan_max_skips = 2
    with pytest.raises(DivergenceError, match="2 updates in a row"):
        _run_with_fault(monkeypatch, tmp_path / "b", config, before=nan_batch({2, 3, 4, 5}))


# --------------------------------------------------------------------------------------------
# Paths and data known to be wrong before compute.


def test_workdir_that_is_a_file_or_under_a_file_is_named(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(train.ConfigError, match="exists and is not a directory"):
        train.check_workdir(str(f))
    with pytest.raises(train.ConfigError, match="is not usable"):
        train.check_workdir(str(f / "run"))
    assert train.check_workdir(str(tmp_path / "new" / "run")) == str(tmp_path / "new" / "run")


def _main(*args: str, cwd: pathlib.Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "main.py"), *args],
        capture_output=True,
        text=True,
        cwd=str(cwd),
        timeout=600,
    )


def _assert_clean_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("error: ")]
    assert starts, proc.stderr[-3000:]
    text = " ".join(lines[starts[-1] :])
    for n in needles:
        assert n in text, (n, text)


@pytest.fixture
def derm_manual(tmp_path) -> pathlib.Path:
    dst = tmp_path / "manual"
    shutil.copytree(
        ROOT / "data_builders" / "derm_csv" / "dummy_data",
        dst,
        ignore=shutil.ignore_patterns("*.py"),
    )
    return dst


@pytest.mark.slow
def test_main_reports_user_errors_in_one_line(tmp_path, derm_manual, tfds_data_dir):
    ft = "--config=configs/finetune.py:demo"
    derm = [ft, "--config.data.name=derm_csv", f"--config.data.manual_dir={derm_manual}"]
    # An unknown field, named with its likely meaning.
    _assert_clean_error(_main(ft, f"--workdir={tmp_path}/a", "--config.batchsize=3"), "batch_size")
    # A config file that is not there, and a variant the file does not have.
    missing = _main("--config=configs/nonexist.py:demo", f"--workdir={tmp_path}/a")
    _assert_clean_error(missing, "No such file or directory: 'configs/nonexist.py")
    bogus = _main("--config=configs/finetune.py:bogus", f"--workdir={tmp_path}/a")
    _assert_clean_error(bogus, "unknown config variant 'bogus'; valid: [")
    # A workdir that is a file.
    (tmp_path / "file").write_text("x")
    _assert_clean_error(_main(ft, f"--workdir={tmp_path}/file"), "not a directory")
    # A malformed CSV row: file, row, and the command-line option that skips it.
    csv = derm_manual / "labels.csv"
    lines = csv.read_text().splitlines()
    csv.write_text("\n".join([*lines[:3], lines[3] + ",extra", *lines[4:]]) + "\n")
    data = f"--config.data.data_dir={tmp_path}/tfds"
    _assert_clean_error(
        _main(*derm, data, f"--workdir={tmp_path}/b"),
        "labels.csv, row 4",
        "--config.data.skip_bad_rows=True",
    )
    # A header-only CSV: an error, and nothing cached that would fail the fixed CSV later.
    csv.write_text(lines[0] + "\n")
    _assert_clean_error(_main(*derm, data, f"--workdir={tmp_path}/c"), "no data row")
    assert not list((tmp_path / "tfds").rglob("dataset_info.json"))
    # An evaluation split the dataset lacks, before any training.
    proc = _main(
        ft,
        f"--config.data.data_dir={tfds_data_dir}",
        "--config.eval_splits=('validation','nosuch')",
        f"--workdir={tmp_path}/d",
    )
    _assert_clean_error(proc, "config.eval_splits", "'nosuch'")
    assert not (tmp_path / "d" / "checkpoints").exists()
    # An init checkpoint of another architecture.
    ck = checkpoint.Checkpointer(str(tmp_path / "foreign"), every_steps=1, keep=1, async_save=False)
    ck.save(1, {"params": {"backbone": {"w": np.zeros(3, np.float32)}}, "batch_stats": {}}, {})
    ck.close()
    proc = _main(
        ft,
        f"--config.data.data_dir={tfds_data_dir}",
        f"--config.init_checkpoint={tmp_path}/foreign",
        f"--workdir={tmp_path}/e",
    )
    _assert_clean_error(proc, "config.init_checkpoint", "does not fit")


def test_skip_bad_rows_from_the_config_reaches_the_builder(tmp_path, derm_manual):
    from medssl_jax import input_pipeline

    csv = derm_manual / "labels.csv"
    data = {"name": "derm_csv", "manual_dir": str(derm_manual)}
    clean = input_pipeline.load_store({**data, "data_dir": str(tmp_path / "d0")}, "train")
    lines = csv.read_text().splitlines()
    assert lines[3].endswith(",train")
    csv.write_text("\n".join([*lines[:3], lines[3] + ",extra", *lines[4:]]) + "\n")
    data["data_dir"] = str(tmp_path / "d1")
    with pytest.raises(train.BadInputError, match="row 4"):
        input_pipeline.load_store(data, "train")
    store = input_pipeline.load_store({**data, "skip_bad_rows": True}, "train")
    assert store.spec.num_images == clean.spec.num_images - 1  # just that row dropped


def test_empty_or_header_only_csv_is_an_error_and_caches_nothing(tmp_path, derm_manual):
    from medssl_jax import input_pipeline

    csv = derm_manual / "labels.csv"
    full = csv.read_text()
    csv.write_text(full.splitlines()[0] + "\n")
    data = {"name": "derm_csv", "data_dir": str(tmp_path / "d"), "manual_dir": str(derm_manual)}
    with pytest.raises(train.BadInputError, match=r"labels\.csv: the header is there but no data"):
        input_pipeline.load_store(data, "train")
    csv.write_text("")
    with pytest.raises(train.BadInputError, match=r"labels\.csv, row 1: empty file"):
        input_pipeline.load_store(data, "train")
    csv.write_text(full)  # fixed: the same data_dir now builds
    assert input_pipeline.load_store(data, "train").spec.num_cases > 0
