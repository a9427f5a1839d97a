"""medssl_jax.report: fake sweep folders -> report.md table numbers, valid PNGs, clear errors."""

import json
import re

import numpy as np
import pytest
from PIL import Image

from medssl_jax import metrics, predictions, report

INITS = ("micle", "simclr")
FRACTIONS = (0.1, 1.0)
SEEDS = (0, 1)
CLASSES = ("mel", "nv", "bcc")
CHEX = ("Atelectasis", "Cardiomegaly", "Edema")


def _top1(init, frac, seed, split):
    """Deterministic fake metric so the expected means are known exactly."""
    base = {"micle": 0.70, "simclr": 0.60}[init] + 0.1 * frac + 0.02 * seed
    return base - (0.15 if split == "test_shifted" else 0.0)


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
            labels=labels,
            scores=probs,
            class_names=CLASSES,
        )
        preds[split] = f"predictions_{split}.csv"
    splits = {s: {"top1": _top1(init, frac, seed, s), "auc_mean": 0.9} for s in preds}
    splits["validation"] = {"top1": 0.5 + seed, "auc_mean": 0.8}
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
        rows[(cells[0], float(cells[1]))] = dict(zip(header, cells, strict=True))
    return rows


def test_table_means_and_counts(built):
    _, _, md = built
    rows = _table_rows(md, "## derm / finetune (multiclass)")
    assert set(rows) == {(i, f) for i in INITS for f in FRACTIONS}
    for (init, frac), cells in rows.items():
        for split in ("test", "test_shifted"):
            cell = cells[f"{split} top1"]
            mean, std, n = re.fullmatch(r"([\d.]+) ± ([\d.]+) \(n=(\d+)\)", cell).groups()
            vals = [_top1(init, frac, s, split) for s in SEEDS]
            assert float(mean) == pytest.approx(np.mean(vals), abs=1e-4)
            assert float(std) == pytest.approx(np.std(vals, ddof=1), abs=1e-4)
            assert int(n) == len(SEEDS)
        assert cells["validation top1"].startswith("1.0000 ± 0.7071 (n=2)")
    # Column order: test, shifted, validation.
    assert list(next(iter(rows.values())))[2:] == [
        "test top1",
        "test_shifted top1",
        "validation top1",
    ]
    chex_rows = _table_rows(md, "## chexpert / linear_eval (multilabel)")
    assert set(chex_rows) == {(i, 1.0) for i in INITS}
    assert all(re.fullmatch(r"[\d.]+ \(n=1\)", c["test auc_mean"]) for c in chex_rows.values())
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


def test_roc_uses_best_run_of_each_init(built):
    _, _, md = built
    # Highest test top1 per init: fraction 1.0, seed 1.
    for init in INITS:
        assert f"- ROC `test` for {init}: run `derm_{init}_1.0_1`" in md


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
    assert "0.9000 ± 0.0000 (n=2)" in md


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
