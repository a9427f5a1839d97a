"""medssl_jax.report: fake sweep folders -> report.md table numbers, valid PNGs, clear errors."""

import json
import re

import numpy as np
import pytest
from PIL import Image

from medssl_jax import confidence, metrics, predictions, report

INITS = ("micle", "simclr")
FRACTIONS = (0.1, 1.0)
SEEDS = (0, 1)
CLASSES = ("mel", "nv", "bcc")
CHEX = ("Atelectasis", "Cardiomegaly", "Edema")


def _top1(init, frac, seed, split):
    """Deterministic fake metric so the expected means are known exactly."""
    base = {"micle": 0.70, "simclr": 0.60}[init] + 0.1 * frac + 0.02 * seed
    return base - (0.15 if split == "test_shifted" else 0.0)


def _val(frac, seed):
    return 0.5 + 0.1 * seed + (0.3 if frac == 0.1 else 0.0)


def _write_multiclass_run(folder, init, frac, seed, rng):
    n = 60
    labels = rng.integers(0, len(CLASSES), n)
    logits = rng.normal(size=(n, len(CLASSES))) + 2.0 * np.eye(len(CLASSES))[labels]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    folder.mkdir(parents=True)
    preds = {}
    for split in ("test", "test_shifted"):
        predictions.write_predictions_csv(
            folder / f"predictions_{split}.csv",
            case_ids=[f"case{i // 2}" for i in range(n)],
            image_ids=[f"img{i}" for i in range(n)],
            patient_ids=[f"patient{i // 4}" for i in range(n)],
            labels=labels,
            scores=probs,
            class_names=CLASSES,
        )
        preds[split] = f"predictions_{split}.csv"
    splits = {
        s: {"top1": _top1(init, frac, seed, s), "auc_mean": 0.9, "balanced_accuracy": 0.5}
        for s in preds
    }
    # Validation prefers fraction 0.1, seed 1; test top1 prefers fraction 1.0, seed 1.
    splits["validation"] = {
        "top1": 0.5 + seed,
        "auc_mean": 0.8,
        "balanced_accuracy": _val(frac, seed),
    }
    results = {
        "kind": "finetune",
        "name": f"derm_{init}_{frac}_{seed}",
        "dataset": "derm",
        "label_kind": "multiclass",
        "init": init,
        "label_fraction": frac,
        "seed": seed,
        "step": 100,
        "class_names": list(CLASSES),
        "splits": splits,
        "predictions": preds,
    }
    report.write_results(folder, results)


def _write_multilabel_run(folder, init, rng):
    n, k = 50, len(CHEX)
    labels = rng.integers(0, 2, (n, k)).astype(float)
    mask = rng.random((n, k)) < 0.8
    probs = 1 / (1 + np.exp(-(rng.normal(size=(n, k)) + 2 * labels - 1)))
    folder.mkdir(parents=True)
    predictions.write_predictions_csv(
        folder / "predictions_test.csv",
        case_ids=[f"patient{i}" for i in range(n)],
        image_ids=[f"view{i}" for i in range(n)],
        labels=labels,
        scores=probs,
        class_names=CHEX,
        label_mask=mask,
    )
    out = metrics.sigmoid_metrics(np.log(probs / (1 - probs)), labels, mask, class_names=CHEX)
    results = {
        "kind": "linear_eval",
        "name": f"chex_{init}",
        "dataset": "chexpert",
        "label_kind": "multilabel",
        "init": init,
        "label_fraction": 1,
        "seed": 0,
        "step": 10,
        "class_names": list(CHEX),
        "splits": {"test": out},
        "predictions": {"test": "predictions_test.csv"},
    }
    (folder / "results.json").write_text(json.dumps(results))


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    rng = np.random.default_rng(0)
    for init in INITS:
        for frac in FRACTIONS:
            for seed in SEEDS:
                _write_multiclass_run(
                    root / "derm" / f"{init}_{frac}_{seed}", init, frac, seed, rng
                )
    chex = tmp_path_factory.mktemp("chex")
    for init in INITS:
        _write_multilabel_run(chex / init, init, rng)
    pre = root / "pretrain_run"
    pre.mkdir()
    (pre / "results.json").write_text(json.dumps({"kind": "pretrain", "loss": 1.0}))
    return root, chex


@pytest.fixture(scope="module")
def built(sweep, tmp_path_factory):
    root, chex = sweep
    out = tmp_path_factory.mktemp("out")
    written = report.build_report([root, chex], out)
    return out, written, (out / "report.md").read_text()


def _table_rows(md, section):
    """{(init, fraction): [cells]} and the header of the first table after `section`."""
    block = md.split(section, 1)[1]
    lines = [ln for ln in block.splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for ln in lines[2:]:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        if len(cells) != len(header):
            break
        frac = None if cells[1] == "–" else float(cells[1])
        rows[(cells[0], frac)] = dict(zip(header, cells, strict=True))
    return rows


CELL = r"([\d.]+) \[([\d.]+), ([\d.]+)\]; sd ([\d.]+) \(n=(\d+)\)"


def test_table_means_cis_and_counts(sweep, built):
    root, _ = sweep
    _, _, md = built
    rows = _table_rows(md, "## derm / finetune (multiclass)")
    assert set(rows) == {(i, f) for i in INITS for f in FRACTIONS} | {("chance", None)}
    for (init, frac), cells in rows.items():
        if init == "chance":
            continue
        for split in ("test", "test_shifted"):
            cell = cells[f"{split} top1"]
            mean, lo, hi, std, n = re.fullmatch(CELL, cell).groups()
            vals = [_top1(init, frac, s, split) for s in SEEDS]
            assert float(mean) == pytest.approx(np.mean(vals), abs=0.006)
            assert float(std) == pytest.approx(np.std(vals, ddof=1), abs=0.006)
            assert int(n) == len(SEEDS)
            # The CI is the patient bootstrap of the seeds' prediction CSVs, decimals as it allows.
            preds = [
                predictions.read_predictions_csv(
                    root / "derm" / f"{init}_{frac}_{s}" / f"predictions_{split}.csv"
                )
                for s in SEEDS
            ]
            _, ref_lo, ref_hi = confidence.bootstrap_ci(preds, "top1", num_replicates=1000)
            d = len(lo.split(".")[1])
            assert (lo, hi) == (f"{ref_lo:.{d}f}", f"{ref_hi:.{d}f}")
            assert d == max(2, -int(np.floor(np.log10((ref_hi - ref_lo) / 2))))
        # Validation has no prediction CSV, hence no CI: mean and sd only.
        assert cells["validation top1"] == "1.000; sd 0.707 (n=2)"
    # Metrics: top1, balanced accuracy and AUC by default; splits: test, shifted, validation.
    header = list(next(iter(rows.values())))[2:]
    assert header[:3] == ["test top1", "test_shifted top1", "validation top1"]
    assert "test balanced_accuracy" in header and "test auc_mean" in header
    # Chance row: majority-class rate of the test labels, 1/3 balanced accuracy, AUC 0.5.
    labels = predictions.read_predictions_csv(
        root / "derm" / "micle_0.1_0" / "predictions_test.csv"
    ).labels
    chance = rows[("chance", None)]
    assert float(chance["test top1"]) == pytest.approx(np.bincount(labels).max() / 60, abs=1e-3)
    assert float(chance["test balanced_accuracy"]) == pytest.approx(1 / 3, abs=1e-3)
    assert float(chance["test auc_mean"]) == 0.5
    chex_rows = _table_rows(md, "## chexpert / linear_eval (multilabel)")
    assert set(chex_rows) == {(i, 1.0) for i in INITS} | {("chance", None)}
    assert all(
        re.fullmatch(r"[\d.]+ \[[\d.]+, [\d.]+\] \(n=1\)", c["test auc_mean"])
        for k, c in chex_rows.items()
        if k[0] != "chance"
    )
    assert "skipped pretraining run" in md


def test_pngs_exist_are_valid_and_embedded(built):
    out, written, md = built
    pngs = [p for p in written if p.suffix == ".png"]
    names = {p.name for p in pngs}
    assert "label_efficiency_derm_finetune_test_top1.png" in names
    assert "shift_derm_finetune_top1.png" in names
    assert {"roc_derm_finetune_test.png", "roc_derm_finetune_test_shifted.png"} <= names
    assert "roc_chexpert_linear_eval_test.png" in names
    for p in pngs:
        assert p.parent == out
        with Image.open(p) as im:
            im.verify()
        with Image.open(p) as im:
            assert im.format == "PNG" and im.size[0] > 200 and im.size[1] > 200
        assert f"]({p.name})" in md  # relative link
    assert written[0] == out / "report.md"


def test_roc_run_is_chosen_on_validation(built):
    _, _, md = built
    # Best validation balanced accuracy: fraction 0.1, seed 1 (test top1 would pick 1.0, 1).
    for init in INITS:
        assert (
            f"- ROC `test` for {init}: run `derm_{init}_0.1_1` (fraction 0.1, seed 1; "
            "best validation balanced_accuracy = 0.9000)"
        ) in md


def test_no_report_choice_reads_a_test_split(tmp_path):
    """Invariance: permuting every test-split number and test prediction file across runs
    changes no choice the report makes (which run's ROC is shown, and why)."""
    rng = np.random.default_rng(1)
    root = tmp_path / "runs"
    folders = []
    for init in INITS:
        for frac in FRACTIONS:
            for seed in SEEDS:
                folders.append(root / f"{init}_{frac}_{seed}")
                _write_multiclass_run(folders[-1], init, frac, seed, rng)

    def choices(out):
        report.build_report([root], out, bootstrap=50)
        return [ln for ln in (out / "report.md").read_text().splitlines() if "- ROC" in ln]

    before = choices(tmp_path / "a")
    assert len(before) == 2 * len(INITS)
    # Rotate test and shifted-test results and CSVs across all runs.
    blobs = [
        (
            json.loads((f / "results.json").read_text()),
            {s: (f / f"predictions_{s}.csv").read_bytes() for s in ("test", "test_shifted")},
        )
        for f in folders
    ]
    for i, f in enumerate(folders):
        res, _ = blobs[i]
        other_res, other_csv = blobs[(i + 3) % len(folders)]
        for s in ("test", "test_shifted"):
            res["splits"][s] = other_res["splits"][s]
            (f / f"predictions_{s}.csv").write_bytes(other_csv[s])
        (f / "results.json").write_text(json.dumps(res))
    assert choices(tmp_path / "b") == before
    # ...while the validation numbers do decide.
    res = json.loads((folders[0] / "results.json").read_text())  # micle 0.1 seed 0
    res["splits"]["validation"]["balanced_accuracy"] = 0.99
    (folders[0] / "results.json").write_text(json.dumps(res))
    assert "run `derm_micle_0.1_0`" in choices(tmp_path / "c")[0]


def test_roc_curves_agree_with_sigmoid_metrics(sweep):
    _, chex = sweep
    runs, _ = report.load_runs([chex])
    for run in runs:
        curves = report._roc_curves(run, "test")
        assert [c[0] for c in curves] == list(CHEX)
        for name, fpr, tpr, auc in curves:
            assert auc == pytest.approx(run.results["splits"]["test"][f"auc/{name}"])
            assert np.trapezoid(tpr, fpr) == pytest.approx(auc)


def test_unknown_metric_is_reported(sweep, tmp_path):
    root, _ = sweep
    report.build_report([root], tmp_path, ["no_such_metric"])
    md = (tmp_path / "report.md").read_text()
    assert "Metric(s) not found in any split: no_such_metric" in md
    assert not list(tmp_path.glob("label_efficiency_*.png"))


def test_cli_main_prints_paths(sweep, tmp_path, capsys):
    root, _ = sweep
    assert report.main([str(root), "--out", str(tmp_path), "--metric", "auc_mean"]) == 0
    printed = capsys.readouterr().out.split()
    assert str(tmp_path / "report.md") in printed
    assert all((tmp_path / p).exists() for p in printed)
    md = (tmp_path / "report.md").read_text()
    assert "test auc_mean" in md and "test top1" not in md
    assert re.search(r"\| 0\.9\d* \[[\d.]+, [\d.]+\]; sd 0\.0+ \(n=2\) \|", md)


def _valid_results():
    return {
        "kind": "finetune",
        "name": "r",
        "dataset": "demo",
        "label_kind": "multiclass",
        "init": "scratch",
        "label_fraction": 0.5,
        "seed": 0,
        "step": 1,
        "class_names": ["a", "b"],
        "splits": {"test": {"top1": 0.5}},
    }


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda r: r.pop("init"), "missing field 'init'"),
        (lambda r: r.update(seed="zero"), "field 'seed' must be integer"),
        (lambda r: r.update(label_fraction=1.5), "'label_fraction' must be in"),
        (lambda r: r.update(kind="train"), "field 'kind' must be one of"),
        (lambda r: r.update(splits={"test": {"top1": "high"}}), "'splits.test.top1'"),
        (lambda r: r.update(predictions={"test": "nope.csv"}), "'nope.csv' not found"),
    ],
)
def test_malformed_results_name_file_and_field(tmp_path, capsys, change, message):
    bad = _valid_results()
    change(bad)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    path = run_dir / "results.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(report.ResultsError, match=re.escape(message)) as err:
        report.load_runs([tmp_path])
    assert str(path) in str(err.value)
    with pytest.raises(SystemExit) as exit_info:
        report.main([str(tmp_path)])
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err
    assert str(path) in stderr and message in stderr


def test_invalid_json_and_empty_dir(tmp_path):
    (tmp_path / "results.json").write_text("{not json")
    with pytest.raises(report.ResultsError, match="results.json: invalid JSON"):
        report.load_runs([tmp_path])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(report.ResultsError, match="no results.json found"):
        report.load_runs([empty])


def test_duplicate_runs_keep_latest_step(tmp_path):
    first, second = _valid_results(), _valid_results()
    second["step"] = 5
    second["splits"] = {"test": {"top1": 0.9}}
    report.write_results(tmp_path / "a", first)
    report.write_results(tmp_path / "b", second)
    runs, notes = report.load_runs([tmp_path])
    assert len(runs) == 1 and runs[0].metric("test", "top1") == 0.9
    assert any("duplicate" in n for n in notes)


def test_undefined_metrics_are_written_as_strict_json_null(tmp_path):
    """A split with one class has no AUC (NaN): results.json and the loop's JSON write null,
    which strict readers (jq, JavaScript) parse, and the report reads it as 'no value'."""
    import json

    import numpy as np

    from medssl_jax import loop

    res = _valid_results()
    res["splits"] = {"test": {"top1": 0.75, "auc_mean": float("nan"), "kappa": float("inf")}}
    report.write_results(tmp_path / "a", res)

    def strict(text):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON token {c}"))

    back = strict((tmp_path / "a" / "results.json").read_text())
    assert back["splits"]["test"] == {"top1": 0.75, "auc_mean": None, "kappa": None}
    runs, _ = report.load_runs([tmp_path])
    assert runs[0].metric("test", "auc_mean") is None and runs[0].metric("test", "top1") == 0.75
    loop.write_json(tmp_path / "summary.json", {"loss": np.array([1.0, np.nan]), "x": (2, 3)})
    assert strict((tmp_path / "summary.json").read_text()) == {"loss": [1.0, None], "x": [2, 3]}


def test_a_split_the_checkpoints_were_chosen_on_is_flagged(tmp_path):
    """Numbers on the split a run chose its checkpoint on are optimistic; the report says so
    for that split only."""
    chosen, other = _valid_results(), _valid_results()
    chosen["selected_on"], other["selected_on"] = "test", "validation"
    other["init"] = "other"
    report.write_results(tmp_path / "runs" / "a", chosen)
    report.build_report([tmp_path / "runs"], tmp_path / "out", ["top1"])
    md = (tmp_path / "out" / "report.md").read_text()
    assert "checkpoints were chosen on test: its numbers are optimistic" in md
    report.write_results(tmp_path / "runs2" / "b", other)
    report.build_report([tmp_path / "runs2"], tmp_path / "out2", ["top1"])
    assert "optimistic" not in (tmp_path / "out2" / "report.md").read_text()


def test_cells_without_a_ci_say_why(tmp_path):
    """A cell whose predictions cover 3 patients, and one whose seed has no prediction CSV,
    print no CI, and the report's notes say why for each."""
    few, none = _valid_results(), _valid_results()
    few["init"], none["init"] = "few", "none"
    (tmp_path / "a").mkdir()
    predictions.write_predictions_csv(
        tmp_path / "a" / "predictions_test.csv",
        case_ids=[f"c{i}" for i in range(6)],
        image_ids=[f"i{i}" for i in range(6)],
        patient_ids=[f"p{i // 2}" for i in range(6)],
        labels=np.array([0, 1, 0, 1, 1, 0]),
        scores=np.array([[0.8, 0.2], [0.3, 0.7], [0.6, 0.4], [0.1, 0.9], [0.7, 0.3], [0.9, 0.1]]),
        class_names=["a", "b"],
    )
    few["predictions"] = {"test": "predictions_test.csv"}
    report.write_results(tmp_path / "a", few)
    report.write_results(tmp_path / "b", none)
    report.build_report([tmp_path], tmp_path / "out", ["top1"])
    md = (tmp_path / "out" / "report.md").read_text()
    assert "no CI for top1 on test (few, 0.5): fewer than 10 patients" in md
    assert "no CI for top1 on test (none, 0.5): a seed has no prediction CSV" in md
    assert "| few | 0.5 | 0.500 (n=1) |" in md and "| none | 0.5 | 0.500 (n=1) |" in md


def test_runs_stopped_early_are_left_out_with_a_note(tmp_path):
    """A preempted fine-tune writes results.json (launchers requeue on it) from a model that did
    not finish: the report must not average it in."""
    done, stopped = _valid_results(), _valid_results()
    stopped["seed"] = 1
    stopped["train"] = {"stop_reason": "preempted", "step": 3}
    report.write_results(tmp_path / "a", done)
    report.write_results(tmp_path / "b", stopped)
    runs, notes = report.load_runs([tmp_path])
    assert [r.results["seed"] for r in runs] == [done["seed"]]
    assert any("stopped early (preempted)" in n and "/b/" in n for n in notes)


def test_subset_table_is_the_main_table_pivoted(built):
    """The paper's layout: rows = init, columns = label fractions, same cells as the main table."""
    _, _, md = built
    main = _table_rows(md, "## derm / finetune (multiclass)")
    block = md.split("### top1 on test by label subset (rows: initialisation)", 1)[1]
    lines = [ln for ln in block.splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == ["init", *[f"{f:g} of labels" for f in FRACTIONS]]
    for ln in lines[2 : 2 + len(INITS)]:
        init, *cells = [c.strip() for c in ln.strip("|").split("|")]
        assert cells == [main[(init, f)]["test top1"] for f in FRACTIONS]
    assert lines[2 + len(INITS)].startswith("| chance |")
