"""medssl_jax.metrics against scikit-learn (a test-only dependency) and reference loops."""

import numpy as np
import pytest
import sklearn.metrics as skm

from medssl_jax import metrics, predictions

SEEDS = range(5)


def _ece_reference(conf, outcome, num_bins):
    """Straightforward loop: bins (lo, hi], first bin also holds 0."""
    edges = np.linspace(0.0, 1.0, num_bins + 1)
    total = 0.0
    for b in range(num_bins):
        lo, hi = edges[b], edges[b + 1]
        sel = [(lo < c <= hi) or (b == 0 and c == 0.0) for c in conf]
        sel = np.array(sel)
        if sel.any():
            total += sel.sum() / len(conf) * abs(outcome[sel].mean() - conf[sel].mean())
    return total


def _softmax(x):
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _random_multiclass(seed, n=300, k=5, ties=True):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k)) + 1.5 * np.eye(k)[labels]
    if ties:
        logits = np.round(logits, 1)  # many tied scores per column
    return logits, labels


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("ties", [True, False])
def test_roc_auc_and_curve_match_sklearn(seed, ties):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 400))
    labels = rng.integers(0, 2, n)
    scores = rng.normal(size=n) + labels
    if ties:
        scores = np.round(scores, 0)  # few distinct values -> heavy ties
    assert metrics.roc_auc(scores, labels) == pytest.approx(skm.roc_auc_score(labels, scores))
    for drop in (True, False):
        fpr, tpr, thr = metrics.roc_curve(scores, labels, drop_intermediate=drop)
        fpr2, tpr2, thr2 = skm.roc_curve(labels, scores, drop_intermediate=drop)
        np.testing.assert_allclose(fpr, fpr2)
        np.testing.assert_allclose(tpr, tpr2)
        np.testing.assert_array_equal(thr, thr2)
        # Trapezoid area under our curve is the AUC.
        assert np.trapezoid(tpr, fpr) == pytest.approx(metrics.roc_auc(scores, labels))


def test_roc_auc_edge_cases():
    assert metrics.roc_auc([0.1, 0.9], [0, 1]) == 1.0
    assert metrics.roc_auc([0.9, 0.1], [0, 1]) == 0.0
    assert metrics.roc_auc([0.5, 0.5, 0.5], [0, 1, 1]) == 0.5
    with pytest.raises(ValueError, match="single class"):
        metrics.roc_auc([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match="0/1"):
        metrics.roc_auc([0.1, 0.2], [0, 2])
    with pytest.raises(ValueError, match="non-finite"):
        metrics.roc_auc([np.nan, 0.2], [0, 1])


@pytest.mark.parametrize("seed", SEEDS)
def test_softmax_metrics_match_sklearn(seed):
    logits, labels = _random_multiclass(seed)
    k = logits.shape[1]
    names = tuple(f"c{i}" for i in range(k))
    out = metrics.softmax_metrics(logits, labels, class_names=names, graded=True)
    probs = _softmax(logits)
    assert out["num_examples"] == len(labels)
    assert out["loss"] == pytest.approx(skm.log_loss(labels, probs, labels=range(k)), rel=1e-9)
    assert out["top1"] == pytest.approx(skm.accuracy_score(labels, probs.argmax(1)))
    # Ties: ours breaks towards the lower class index (np.argmax); sklearn towards the higher
    # one, so compare with sklearn on the class-reversed problem.
    rev = skm.top_k_accuracy_score(k - 1 - labels, logits[:, ::-1], k=3, labels=range(k))
    assert out["top3"] == pytest.approx(rev)
    for c in range(k):
        ref = skm.roc_auc_score(labels == c, probs[:, c])
        assert out[f"auc/c{c}"] == pytest.approx(ref)
    ovr = skm.roc_auc_score(labels, probs, multi_class="ovr", average="macro")
    assert out["auc_mean"] == pytest.approx(ovr)
    assert out["auc_num_skipped"] == 0
    ref_ece = _ece_reference(probs.max(1), (probs.argmax(1) == labels).astype(float), 15)
    assert out["ece"] == pytest.approx(ref_ece)
    kappa = skm.cohen_kappa_score(labels, logits.argmax(1), weights="quadratic", labels=range(k))
    assert out["kappa_quadratic"] == pytest.approx(kappa)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("k", [1, 2, 4])
def test_top_k_without_ties_matches_sklearn(seed, k):
    logits, labels = _random_multiclass(seed, ties=False, k=6)
    ref = skm.top_k_accuracy_score(labels, logits, k=k, labels=range(6))
    assert metrics.top_k_accuracy(logits, labels, k) == pytest.approx(ref)


def test_softmax_metrics_skips_absent_classes_and_small_k():
    logits, labels = _random_multiclass(0, k=4)
    labels = np.where(labels == 2, 0, labels)  # class 2 never occurs
    out = metrics.softmax_metrics(logits, labels)
    assert "auc/2" not in out and out["auc_num_skipped"] == 1
    present = [out[f"auc/{c}"] for c in (0, 1, 3)]
    assert out["auc_mean"] == pytest.approx(np.mean(present))
    assert "kappa_quadratic" not in out
    two = metrics.softmax_metrics(logits[:, :2], labels % 2)
    assert "top3" not in two  # k must stay <= K
    single = metrics.softmax_metrics(logits[:1], labels[:1])
    assert np.isnan(single["auc_mean"]) and single["auc_num_skipped"] == 4


def test_softmax_metrics_bad_input_is_named():
    logits, labels = _random_multiclass(0, k=3)
    with pytest.raises(ValueError, match=r"labels\[5\] = 7"):
        metrics.softmax_metrics(logits, np.where(np.arange(len(labels)) == 5, 7, labels))
    bad = logits.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="row 3, class 1"):
        metrics.softmax_metrics(bad, labels)
    with pytest.raises(ValueError, match="class_names has 2"):
        metrics.softmax_metrics(logits, labels, class_names=("a", "b"))


@pytest.mark.parametrize("seed", SEEDS)
def test_sigmoid_metrics_masked_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    n, k = 250, 5
    labels = rng.integers(0, 2, (n, k)).astype(np.float64)
    logits = np.round(rng.normal(size=(n, k)) + (2 * labels - 1), 1)
    mask = rng.random((n, k)) < 0.7
    labels_seen = np.where(mask, labels, -1.0)  # uncertain/missing entries carry junk
    names = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")
    out = metrics.sigmoid_metrics(logits, labels_seen, mask, class_names=names)
    probs = 1 / (1 + np.exp(-logits))
    aucs = []
    for c, name in enumerate(names):
        v = mask[:, c]
        ref = skm.roc_auc_score(labels[v, c], probs[v, c])
        assert out[f"auc/{name}"] == pytest.approx(ref)
        aucs.append(ref)
        ref_ece = _ece_reference(probs[v, c], labels[v, c], 15)
        assert out[f"ece/{name}"] == pytest.approx(ref_ece)
    assert out["auc_mean"] == pytest.approx(np.mean(aucs))
    assert out["ece_mean"] == pytest.approx(np.mean([out[f"ece/{c}"] for c in names]))
    ref_loss = skm.log_loss(labels[mask], probs[mask], labels=[0, 1])
    assert out["loss"] == pytest.approx(ref_loss, rel=1e-9)
    ref_acc = np.mean((probs[mask] > 0.5) == (labels[mask] == 1))
    assert out["accuracy"] == pytest.approx(ref_acc)
    assert out["num_labels"] == mask.sum()


def test_sigmoid_metrics_skips_single_valued_class_and_validates():
    labels = np.array([[0, 1], [1, 1], [0, 1.0]])
    logits = np.array([[-1.0, 2.0], [3.0, 1.0], [0.5, -2.0]])
    out = metrics.sigmoid_metrics(logits, labels)
    assert out["auc/0"] == 1.0 and "auc/1" not in out and out["auc_num_skipped"] == 1
    assert out["accuracy"] == pytest.approx(4 / 6)
    uncertain = labels.copy()
    uncertain[0, 1] = -1.0
    with pytest.raises(ValueError, match=r"labels\[0, 1\] = -1.0 must be 0 or 1"):
        metrics.sigmoid_metrics(logits, uncertain)
    masked = metrics.sigmoid_metrics(logits, uncertain, np.where(uncertain == -1, 0, 1))
    assert masked["num_labels"] == 5
    with pytest.raises(ValueError, match="no valid label"):
        metrics.sigmoid_metrics(logits, labels, np.zeros_like(labels))
    # Extreme logits stay finite.
    big = metrics.sigmoid_metrics(np.array([[800.0], [-800.0]]), np.array([[0.0], [1.0]]))
    assert big["loss"] == pytest.approx(800.0)


@pytest.mark.parametrize("seed", SEEDS)
def test_kappa_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    k = 5
    label = rng.integers(0, k, 200)
    pred = np.clip(label + rng.integers(-2, 3, 200), 0, k - 1)
    pred[:20] = rng.integers(0, k - 1, 20)
    ref = skm.cohen_kappa_score(label, pred, weights="quadratic", labels=range(k))
    assert metrics.cohen_kappa_quadratic(pred, label, k) == pytest.approx(ref)


def test_kappa_edge_cases():
    assert metrics.cohen_kappa_quadratic([0, 1, 2], [0, 1, 2], 3) == pytest.approx(1.0)
    assert np.isnan(metrics.cohen_kappa_quadratic([1, 1], [1, 1], 3))
    with pytest.raises(ValueError, match=r"pred\[1\] = 3"):
        metrics.cohen_kappa_quadratic([0, 3], [0, 1], 3)


def test_ece_hand_example_and_reference():
    # Two bins: (0, .5] holds conf .4 (wrong); (.5, 1] holds .9 (right) and .6 (wrong).
    probs = np.array([[0.4, 0.3, 0.3], [0.9, 0.05, 0.05], [0.2, 0.6, 0.2]])
    labels = np.array([1, 0, 0])
    expected = 1 / 3 * 0.4 + 2 / 3 * abs(0.5 - 0.75)
    assert metrics.expected_calibration_error(probs, labels, 2) == pytest.approx(expected)
    rng = np.random.default_rng(3)
    conf = np.round(rng.random(500), 2)  # values exactly on bin edges too
    conf[:3] = [0.0, 1.0, 0.2]
    outcome = (rng.random(500) < conf).astype(float)
    for bins in (1, 10, 15):
        got = metrics.expected_calibration_error(conf, outcome, bins)
        assert got == pytest.approx(_ece_reference(conf, outcome, bins))
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        metrics.expected_calibration_error(np.array([1.5]), np.array([1.0]))


def test_predictions_csv_round_trip_multiclass(tmp_path):
    rng = np.random.default_rng(0)
    n, k = 40, 4
    scores = _softmax(rng.normal(size=(n, k))).astype(np.float32)
    labels = rng.integers(0, k, n)
    case_ids = [f"patient,{i // 3}" for i in range(n)]  # commas must be quoted
    image_ids = np.array([f"img_{i}.jpg".encode() for i in range(n)])  # TFDS gives bytes
    names = ("mel", "nv", "bcc", 'a "quoted" name')
    path = tmp_path / "pred.csv"
    mask = np.ones(n, bool)
    mask[7] = False
    predictions.write_predictions_csv(
        path,
        case_ids=case_ids,
        image_ids=image_ids,
        labels=labels,
        scores=scores,
        class_names=names,
        label_mask=mask,
    )
    header = path.read_text().splitlines()[0]
    assert header.startswith("case_id,image_id,label,score/mel")
    back = predictions.read_predictions_csv(path)
    assert back.class_names == names and not back.multilabel
    assert back.case_ids == case_ids
    assert back.image_ids == [f"img_{i}.jpg" for i in range(n)]
    np.testing.assert_array_equal(back.scores.astype(np.float32), scores)  # exact
    np.testing.assert_array_equal(back.label_mask, mask)
    np.testing.assert_array_equal(back.labels[mask], labels[mask])
    assert back.labels[7] == -1


def test_predictions_csv_round_trip_multilabel_and_errors(tmp_path):
    rng = np.random.default_rng(1)
    n, k = 30, 3
    scores = rng.random((n, k))  # float64: full precision round trip
    labels = rng.integers(0, 2, (n, k)).astype(np.float32)
    mask = rng.random((n, k)) < 0.6
    path = tmp_path / "ml.csv"
    predictions.write_predictions_csv(
        path,
        case_ids=[str(i) for i in range(n)],
        image_ids=[f"v{i}" for i in range(n)],
        labels=labels,
        scores=scores,
        class_names=("Edema", "Atelectasis", "Cardiomegaly"),
        label_mask=mask,
    )
    back = predictions.read_predictions_csv(path)
    assert back.multilabel
    np.testing.assert_array_equal(back.scores, scores)
    np.testing.assert_array_equal(back.label_mask, mask)
    np.testing.assert_array_equal(back.labels[mask], labels[mask])
    # Malformed files name the file, row and column.
    lines = path.read_text().splitlines()
    cells = lines[3].split(",")
    cells[-1] = "abc"
    lines[3] = ",".join(cells)
    bad = tmp_path / "bad.csv"
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"bad.csv: row 4, column 'score/Cardiomegaly'"):
        predictions.read_predictions_csv(bad)
    with pytest.raises(ValueError, match="not a probability"):
        predictions.write_predictions_csv(
            tmp_path / "x.csv",
            case_ids=["a"],
            image_ids=["b"],
            labels=[0],
            scores=[[2.0, -1.0]],
            class_names=("p", "q"),
        )
