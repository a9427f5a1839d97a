"""Patient-level bootstrap CIs (medssl_jax.confidence) and balanced accuracy, against
brute-force references: explicit concatenation of the drawn patients' rows, and the exact
bootstrap distribution from enumerating every possible draw of a small split."""

import itertools

import numpy as np
import pytest

from medssl_jax import confidence, metrics, predictions
from medssl_jax.predictions import Predictions


def _pred(labels, scores, patients, classes=("a", "b", "c")) -> Predictions:
    labels = np.asarray(labels)
    return Predictions(
        case_ids=[f"case{i}" for i in range(len(labels))],
        image_ids=[f"img{i}" for i in range(len(labels))],
        patient_ids=list(patients),
        patients_from_cases=False,
        labels=labels,
        label_mask=np.ones(labels.shape, bool),
        scores=np.asarray(scores, np.float64),
        class_names=tuple(classes),
    )


def _random_pred(rng, n=40, k=3, n_patients=12):
    labels = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k)) + 1.5 * np.eye(k)[labels]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    patients = [f"p{j}" for j in rng.integers(0, n_patients, n)]
    return _pred(labels, probs, patients)


def test_balanced_accuracy_brute_force_and_majority():
    rng = np.random.default_rng(0)
    label = rng.integers(0, 4, 200)
    pred = np.where(rng.random(200) < 0.6, label, rng.integers(0, 4, 200))
    recalls = [np.mean(pred[label == c] == c) for c in range(4)]
    assert metrics.balanced_accuracy(pred, label, 4) == pytest.approx(np.mean(recalls))
    # Always the majority class: top-1 is its rate, balanced accuracy 1 / classes present.
    imbalanced = np.array([0] * 67 + [1] * 20 + [2] * 13)
    const = np.zeros(100, int)
    assert metrics.balanced_accuracy(const, imbalanced, 5) == pytest.approx(1 / 3)
    m = metrics.softmax_metrics(np.eye(5)[const] * 5.0, imbalanced)
    assert m["top1"] == pytest.approx(0.67) and m["majority_top1"] == pytest.approx(0.67)
    assert m["balanced_accuracy"] == pytest.approx(1 / 3)


@pytest.mark.parametrize("name", ["top1", "balanced_accuracy", "auc_mean", "auc/b"])
def test_metric_from_predictions_equals_softmax_metrics(name):
    pred = _random_pred(np.random.default_rng(1))
    ref = metrics.softmax_metrics(np.log(pred.scores), pred.labels, class_names=pred.class_names)
    assert confidence.metric_from_predictions(pred, name) == pytest.approx(ref[name])


def test_multilabel_metrics_from_predictions():
    rng = np.random.default_rng(2)
    n, k = 50, 3
    labels = rng.integers(0, 2, (n, k)).astype(float)
    mask = rng.random((n, k)) < 0.7
    scores = 1 / (1 + np.exp(-(rng.normal(size=(n, k)) + 2 * labels - 1)))
    pred = Predictions(
        [f"c{i}" for i in range(n)],
        [f"i{i}" for i in range(n)],
        [f"p{i}" for i in range(n)],
        False,
        np.where(mask, labels, 0.0),
        mask,
        scores,
        ("x", "y", "z"),
    )
    ref = metrics.sigmoid_metrics(np.log(scores / (1 - scores)), labels, mask.astype(int))
    assert confidence.metric_from_predictions(pred, "auc_mean") == pytest.approx(ref["auc_mean"])
    assert confidence.metric_from_predictions(pred, "accuracy") == pytest.approx(ref["accuracy"])
    with pytest.raises(ValueError, match="multi-class"):
        confidence.metric_from_predictions(pred, "top1")


def test_replicates_lacking_a_rare_class_are_undefined_not_easier():
    """A resample without the rare class's patients is NaN for the class means (dropped by
    the interval), not a mean over the easy classes: the upper bound would jump to 1."""
    rng = np.random.default_rng(0)
    labels = np.array([0] * 29 + [1] * 29 + [2] * 2)  # class c: 2 patients, ranked at chance
    n = labels.size
    scores = np.full((n, 3), 0.1)
    scores[np.arange(n), labels] = 0.8  # a and b perfectly separated
    scores[:, 2] = rng.random(n) * 0.1
    scores /= scores.sum(1, keepdims=True)  # probabilities, as in a prediction CSV
    q = np.quantile(scores[labels != 2, 2], [0.4, 0.6])  # class c's rows ranked mid-pack
    scores[labels == 2] = np.stack([(1 - q) / 2, (1 - q) / 2, q], axis=1)
    pred = _pred(labels, scores, [f"p{i:02d}" for i in range(n)])
    patients = sorted(pred.patient_ids)
    counts = confidence.patient_counts(n, 400, seed=0)
    lacks_c = counts[:, [patients.index("p58"), patients.index("p59")]].sum(1) == 0
    assert 0.05 < lacks_c.mean() < 0.5
    for name in ("auc_mean", "balanced_accuracy"):
        vals = confidence.replicate_values([pred], name, counts, patients)
        assert np.isnan(vals[lacks_c]).all() and np.isfinite(vals[~lacks_c]).all()
        # Each kept replicate equals the metric on the explicitly drawn rows over all 3 classes.
        b = int(np.flatnonzero(~lacks_c)[0])
        rows = np.repeat(np.arange(n), counts[b][[patients.index(p) for p in pred.patient_ids]])
        ref = metrics.softmax_metrics(np.log(scores[rows]), labels[rows])
        assert vals[b] == pytest.approx(ref[name])
    _, lo, hi = confidence.bootstrap_ci([pred], "auc_mean", num_replicates=400, seed=0)
    assert hi < 0.95  # was 1.0: the replicates without class c averaged a and b only
    # Multi-label: a class whose positives are all in one patient.
    ml_labels = np.zeros((n, 2))
    ml_labels[:30, 0] = 1
    ml_labels[58, 1] = 1
    ml = Predictions(
        pred.case_ids,
        pred.image_ids,
        pred.patient_ids,
        False,
        ml_labels,
        np.ones((n, 2), bool),
        rng.random((n, 2)),
        ("x", "y"),
    )
    vals = confidence.replicate_values([ml], "auc_mean", counts, patients)
    lacks_y = counts[:, patients.index("p58")] == 0
    assert np.isnan(vals[lacks_y]).all() and np.isfinite(vals[~lacks_y]).all()


def test_replicates_equal_explicit_concatenation_of_drawn_patients():
    """Each replicate = the metric on the rows of the drawn patients, concatenated (a patient
    drawn twice contributes its rows twice); two seeds share the same draws."""
    rng = np.random.default_rng(3)
    a = _random_pred(rng)
    b = _pred(a.labels, rng.dirichlet(np.ones(3), len(a.labels)), a.patient_ids)
    patients = sorted(set(a.patient_ids))
    counts = confidence.patient_counts(len(patients), 25, seed=7)
    assert counts.shape == (25, len(patients)) and (counts.sum(1) == len(patients)).all()
    for name in ("top1", "balanced_accuracy", "auc_mean"):
        got = confidence.replicate_values([a, b], name, counts, patients)
        for r, c in enumerate(counts):
            drawn = [p for p, times in zip(patients, c, strict=True) for _ in range(times)]
            vals = []
            for pred in (a, b):
                rows = [i for p in drawn for i, q in enumerate(pred.patient_ids) if q == p]
                sub = _pred(
                    pred.labels[rows], pred.scores[rows], [pred.patient_ids[i] for i in rows]
                )
                vals.append(confidence.metric_from_predictions(sub, name))
            assert got[r] == pytest.approx(np.mean(vals)), (name, r)


def test_too_few_patients_give_no_interval():
    """One patient resampled is always the same patient: a zero-width "95% CI". Below
    MIN_PATIENTS (10) the bounds are NaN, for one model and for a paired difference."""
    rng = np.random.default_rng(0)
    for n_patients, defined in ((1, False), (9, False), (10, True)):
        patients = [f"p{i // 3}" for i in range(3 * n_patients)]
        labels = rng.integers(0, 2, 3 * n_patients)
        scores = rng.dirichlet([1, 1], 3 * n_patients)
        pred = _pred(labels, scores, patients)
        _, lo, hi = confidence.bootstrap_ci([pred], "top1", num_replicates=200)
        _, dlo, dhi = confidence.paired_difference_ci([pred], [pred], "top1", num_replicates=200)
        assert np.isfinite([lo, hi, dlo, dhi]).all() == defined, n_patients
        assert np.isnan([lo, hi, dlo, dhi]).all() != defined, n_patients


def test_bootstrap_distribution_equals_exact_enumeration_over_patients(monkeypatch):
    """4 patients with 3, 1, 2, 2 images: every ordered draw of 4 patients (4**4, equally
    likely) gives the exact bootstrap distribution; 20000 replicates must match its CDF, and
    resampling IMAGES instead (the wrong unit) must not."""
    patients = ["A"] * 3 + ["B"] + ["C"] * 2 + ["D"] * 2
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 0])
    predicted = np.array([0, 0, 0, 0, 1, 2, 1, 1])  # A all right, B wrong, C, D half right
    scores = np.full((8, 3), 0.1)
    scores[np.arange(8), predicted] = 0.8
    pred = _pred(labels, scores, patients)
    names = sorted(set(patients))
    exact = []
    for draw in itertools.product(range(4), repeat=4):
        rows = [i for j in draw for i, p in enumerate(patients) if p == names[j]]
        exact.append(np.mean(predicted[rows] == labels[rows]))
    exact = np.sort(exact)
    counts = confidence.patient_counts(4, 20000, seed=0)
    boot = np.sort(confidence.replicate_values([pred], "top1", counts, names))
    grid = np.unique(exact)
    cdf = lambda s, x: np.searchsorted(s, x, side="right") / s.size  # noqa: E731
    ks = max(abs(cdf(boot, x) - cdf(exact, x)) for x in grid)
    assert ks < 0.02
    # 4 patients are too few for a CI (NaN bounds); allowing them, the CI is the 2.5 / 97.5 %
    # quantile of those replicates, near the exact quantiles.
    assert np.isnan(confidence.bootstrap_ci([pred], "top1", num_replicates=200)[1:]).all()
    monkeypatch.setattr(confidence, "MIN_PATIENTS", 4)
    point, lo, hi = confidence.bootstrap_ci([pred], "top1", num_replicates=20000, seed=0)
    assert point == pytest.approx(np.mean(predicted == labels))
    assert (lo, hi) == pytest.approx(tuple(np.quantile(boot, [0.025, 0.975])))
    assert cdf(exact, lo) >= 0.02 and cdf(exact, np.nextafter(hi, -1)) <= 0.98
    # Image-level resampling gives another distribution: the test above can tell them apart.
    img = np.random.default_rng(0).integers(0, 8, (20000, 8))
    img_vals = np.sort(np.mean(predicted[img] == labels[img], axis=1))
    assert max(abs(cdf(img_vals, x) - cdf(exact, x)) for x in np.unique(img_vals)) > 0.05


def test_ci_of_identical_seeds_equals_single_and_needs_one_split():
    pred = _random_pred(np.random.default_rng(4))
    one = confidence.bootstrap_ci([pred], "auc_mean", num_replicates=300, seed=1)
    two = confidence.bootstrap_ci([pred, pred], "auc_mean", num_replicates=300, seed=1)
    assert one == pytest.approx(two)
    assert one[1] < one[0] < one[2]
    other = _pred(pred.labels, pred.scores, [p + "x" for p in pred.patient_ids])
    with pytest.raises(ValueError, match="different patients"):
        confidence.bootstrap_ci([pred, other], "top1")


def test_patient_id_column_round_trip_and_fallback(tmp_path):
    pred = _random_pred(np.random.default_rng(5), n=10)
    kw = dict(
        case_ids=pred.case_ids,
        image_ids=pred.image_ids,
        labels=pred.labels,
        scores=pred.scores,
        class_names=pred.class_names,
    )
    predictions.write_predictions_csv(tmp_path / "p.csv", patient_ids=pred.patient_ids, **kw)
    back = predictions.read_predictions_csv(tmp_path / "p.csv")
    assert back.patient_ids == pred.patient_ids and not back.patients_from_cases
    predictions.write_predictions_csv(tmp_path / "old.csv", **kw)  # a file from before
    old = predictions.read_predictions_csv(tmp_path / "old.csv")
    assert old.patient_ids == pred.case_ids and old.patients_from_cases
    text = (tmp_path / "p.csv").read_text().splitlines()
    cells = text[3].split(",")
    cells[2] = ""
    (tmp_path / "bad.csv").write_text("\n".join([*text[:3], ",".join(cells), *text[4:]]))
    with pytest.raises(ValueError, match="row 4, column 'patient_id': empty"):
        predictions.read_predictions_csv(tmp_path / "bad.csv")


def test_paired_difference_shares_patient_draws_and_is_narrower_than_separate_cis():
    """A model vs a slightly changed copy: the paired interval is the quantile of per-replicate
    differences on the SAME patients (checked against a direct computation), lies inside the
    gap of the separate CIs, and a model against itself has a zero-width interval at 0."""
    rng = np.random.default_rng(5)
    a = _random_pred(rng, n=60, n_patients=20)
    scores = a.scores.copy()
    flip = rng.random(len(a.labels)) < 0.15
    scores[flip] = scores[flip][:, ::-1]  # b: some rows' scores permuted
    b = _pred(a.labels, scores, a.patient_ids)
    for name in ("top1", "auc_mean"):
        point, lo, hi = confidence.paired_difference_ci([a], [b], name, num_replicates=400, seed=2)
        patients = sorted(set(a.patient_ids))
        counts = confidence.patient_counts(len(patients), 400, 2)
        diff = confidence.replicate_values([a], name, counts, patients) - (
            confidence.replicate_values([b], name, counts, patients)
        )
        assert (lo, hi) == pytest.approx(tuple(np.quantile(diff, [0.025, 0.975])))
        assert point == pytest.approx(
            confidence.metric_from_predictions(a, name)
            - confidence.metric_from_predictions(b, name)
        )
        _, alo, ahi = confidence.bootstrap_ci([a], name, num_replicates=400, seed=2)
        _, blo, bhi = confidence.bootstrap_ci([b], name, num_replicates=400, seed=2)
        assert hi - lo < max(ahi - blo, bhi - alo)
    assert confidence.paired_difference_ci([a], [a], "top1", num_replicates=50) == (0.0, 0.0, 0.0)
    other = _pred(a.labels, a.scores, [p + "x" for p in a.patient_ids])
    with pytest.raises(ValueError, match="different patients"):
        confidence.paired_difference_ci([a], [other], "top1")
