"""SwAV, DINO and hybrid losses against independent float64 NumPy references.

The references follow the papers and the public code: SwAV's `distributed_sinkhorn` and
swapped-prediction loop (facebookresearch/swav, main_swav.py, one process = the global batch),
DINO's `DINOLoss` / `update_center` and `utils.cosine_scheduler` (facebookresearch/dino), and
SimCLR's NT-Xent. Each check also runs against deliberately broken variants
(`test_checks_reject_mutants`) to show that it would catch those mistakes.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medssl_jax.methods import dino, swav

RTOL = 1e-5
B, SIZE, LOCAL_SIZE, NUM_LOCAL, NUM_CLASSES = 16, 32, 16, 2, 5


# ----------------------------------------------------------------------------- NumPy references


def np_l2n(x):
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def np_log_softmax(x):
    x = np.asarray(x, np.float64)
    m = np.max(x, axis=-1, keepdims=True)
    return x - m - np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True))


def np_sinkhorn(scores, epsilon, iterations):
    """SwAV's distributed_sinkhorn with world_size 1: Q is K x N, alternately every prototype
    (row) gets mass 1/K and every sample (column) mass 1/N; returned N x K, rows summing to 1."""
    q = np.exp(np.asarray(scores, np.float64) / epsilon).T
    k, n = q.shape
    q = q / q.sum()
    for _ in range(iterations):
        q = q / q.sum(axis=1, keepdims=True)
        q = q / k
        q = q / q.sum(axis=0, keepdims=True)
        q = q / n
    return (q * n).T


def np_swav_loss(scores, codes, temperature):
    """For each assigned (global) crop i: mean over the other crops v of CE(q_i, p_v)."""
    n_crops = len(scores)
    total = 0.0
    for i, q in enumerate(codes):
        sub = 0.0
        for v in range(n_crops):
            if v == i:
                continue
            logp = np_log_softmax(np.asarray(scores[v], np.float64) / temperature)
            sub -= np.mean(np.sum(np.asarray(q, np.float64) * logp, axis=1))
        total += sub / (n_crops - 1)
    return total / len(codes)


def np_dino_loss(student, teacher, center, student_temp, teacher_temp):
    """DINOLoss.forward: centred, sharpened teacher; every student crop but the same view."""
    t = [
        np.exp(np_log_softmax((np.asarray(x, np.float64) - center) / teacher_temp)) for x in teacher
    ]
    total, n = 0.0, 0
    for iq, q in enumerate(t):
        for v, s in enumerate(student):
            if v == iq:
                continue
            total += np.mean(
                np.sum(-q * np_log_softmax(np.asarray(s, np.float64) / student_temp), 1)
            )
            n += 1
    return total / n, np.stack(t)


def np_cosine_schedule(base_value, final_value, n_iters):
    """DINO's utils.cosine_scheduler without warm-up (per-iteration values, len n_iters)."""
    it = np.arange(n_iters)
    return final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * it / n_iters))


def np_nt_xent(z1, z2, temperature):
    """SimCLR NT-Xent over 2B anchors: positive = the other view, self-similarity excluded."""
    z = np_l2n(np.concatenate([z1, z2]))
    n = len(z)
    total = 0.0
    for a in range(n):
        pos = (a + n // 2) % n
        others = [j for j in range(n) if j != a]
        s = np.array([z[a] @ z[j] / temperature for j in others])
        total -= np_log_softmax(s)[others.index(pos)]
    return total / n


def np_masked_softmax_ce(logits, labels):
    logits = np.asarray(logits, np.float64)
    rows = np.flatnonzero(labels >= 0)
    if len(rows) == 0:
        return 0.0
    logp = np_log_softmax(logits[rows])
    return float(-np.mean(logp[np.arange(len(rows)), labels[rows]]))


# ----------------------------------------------------------------------------- checks


def _scores(rng, n, k, d=16, scale=1.0):
    """Cosine scores of random unit embeddings against random unit prototypes."""
    return scale * (np_l2n(rng.normal(size=(n, d))) @ np_l2n(rng.normal(size=(k, d))).T)


def check_sinkhorn(fn):
    rng = np.random.default_rng(0)
    for (n, k), eps, iters in [((24, 10), 0.05, 3), ((6, 16), 0.05, 3), ((48, 16), 0.1, 1)]:
        s = _scores(rng, n, k)
        q = np.asarray(fn(jnp.asarray(s, jnp.float32), eps, iters))
        np.testing.assert_allclose(q, np_sinkhorn(s, eps, iters), rtol=RTOL, atol=1e-8)
        # What the reference guarantees: the last step normalises each sample, so rows sum to 1.
        np.testing.assert_allclose(q.sum(axis=1), 1.0, rtol=RTOL)


def check_swav_loss(fn):
    rng = np.random.default_rng(1)
    for n_crops in (4, 2):
        scores = [rng.normal(size=(8, 6)) for _ in range(n_crops)]
        codes = [np_sinkhorn(s, 0.05, 3) for s in scores[:2]]
        got = fn(
            [jnp.asarray(s, jnp.float32) for s in scores], [jnp.asarray(q) for q in codes], 0.1
        )
        np.testing.assert_allclose(float(got), np_swav_loss(scores, codes, 0.1), rtol=RTOL)


def check_dino_loss(fn):
    rng = np.random.default_rng(2)
    for n_crops in (4, 2):
        student = [rng.normal(size=(8, 12)) for _ in range(n_crops)]
        teacher = [rng.normal(size=(8, 12)) for _ in range(2)]
        center = rng.normal(size=12)  # nonzero and not constant over K
        loss, probs = fn(
            [jnp.asarray(x, jnp.float32) for x in student],
            [jnp.asarray(x, jnp.float32) for x in teacher],
            jnp.asarray(center, jnp.float32),
            0.1,
            0.04,
        )
        ref_loss, ref_probs = np_dino_loss(student, teacher, center, 0.1, 0.04)
        np.testing.assert_allclose(float(loss), ref_loss, rtol=RTOL)
        np.testing.assert_allclose(np.asarray(probs), ref_probs, rtol=RTOL, atol=1e-7)


def check_teacher_momentum(fn):
    total = 10
    got = np.array([float(fn(jnp.int32(i), total, 0.996)) for i in range(total + 1)])
    np.testing.assert_allclose(got[:total], np_cosine_schedule(0.996, 1.0, total), rtol=1e-6)
    assert got[0] == pytest.approx(0.996, abs=1e-7)
    assert got[total] == pytest.approx(1.0, abs=1e-7)


# ----------------------------------------------------------------------------- SwAV


def test_sinkhorn_matches_reference():
    check_sinkhorn(swav.sinkhorn)


def test_sinkhorn_shift_invariant_and_no_overflow():
    """exp(100) overflows float32: the max subtraction must make a constant shift a no-op."""
    rng = np.random.default_rng(3)
    s = _scores(rng, 24, 10)
    q = np.asarray(swav.sinkhorn(jnp.asarray(s + 4.0, jnp.float32), 0.04, 3))
    assert np.all(np.isfinite(q))
    np.testing.assert_allclose(q, np_sinkhorn(s, 0.04, 3), rtol=RTOL, atol=1e-8)
    np.testing.assert_allclose(q, np_sinkhorn(s + 4.0, 0.04, 3), rtol=RTOL, atol=1e-8)


def test_sinkhorn_converges_to_equipartition():
    """Columns (prototypes) hold N/K only in the limit; 3 iterations just approach it."""
    rng = np.random.default_rng(4)
    n, k = 24, 8
    s = _scores(rng, n, k)
    q = np.asarray(swav.sinkhorn(jnp.asarray(s, jnp.float32), 0.1, 100))
    np.testing.assert_allclose(q.sum(axis=0), n / k, rtol=1e-4)
    np.testing.assert_allclose(q.sum(axis=1), 1.0, rtol=RTOL)
    q3 = np.asarray(swav.sinkhorn(jnp.asarray(s, jnp.float32), 0.05, 3))
    assert np.all(q3 >= 0)
    np.testing.assert_allclose(q3.sum(axis=1), 1.0, rtol=RTOL)


def test_swapped_prediction_loss_matches_reference():
    check_swav_loss(swav.swapped_prediction_loss)


def test_swapped_prediction_two_crops_is_mean_of_cross_terms():
    rng = np.random.default_rng(5)
    s = [rng.normal(size=(8, 6)) for _ in range(2)]
    q = [np_sinkhorn(x, 0.05, 3) for x in s]

    def ce(code, score):
        return -np.mean(np.sum(code * np_log_softmax(score / 0.1), axis=1))

    got = swav.swapped_prediction_loss(
        [jnp.asarray(x, jnp.float32) for x in s], [jnp.asarray(x) for x in q], 0.1
    )
    np.testing.assert_allclose(float(got), (ce(q[0], s[1]) + ce(q[1], s[0])) / 2, rtol=RTOL)


# ----------------------------------------------------------------------------- DINO


def test_dino_loss_matches_reference():
    check_dino_loss(dino.dino_loss)


def test_dino_teacher_probs_and_same_view_skipped():
    rng = np.random.default_rng(6)
    student = [rng.normal(size=(8, 12)) for _ in range(2)]
    teacher = [rng.normal(size=(8, 12)) for _ in range(2)]
    center = rng.normal(size=12)
    loss, probs = dino.dino_loss(
        [jnp.asarray(x, jnp.float32) for x in student],
        [jnp.asarray(x, jnp.float32) for x in teacher],
        jnp.asarray(center, jnp.float32),
        0.1,
        0.07,
    )
    probs = np.asarray(probs)
    assert probs.shape == (2, 8, 12)
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=RTOL)
    t = [np.exp(np_log_softmax((x - center) / 0.07)) for x in teacher]

    def ce(p, s):
        return np.mean(np.sum(-p * np_log_softmax(s / 0.1), axis=1))

    np.testing.assert_allclose(
        float(loss), (ce(t[0], student[1]) + ce(t[1], student[0])) / 2, rtol=RTOL
    )


def test_next_center():
    rng = np.random.default_rng(7)
    center = rng.normal(size=12)
    teacher = [rng.normal(size=(8, 12)) for _ in range(2)]
    got = dino.next_center(
        jnp.asarray(center, jnp.float32), [jnp.asarray(x, jnp.float32) for x in teacher], 0.9
    )
    # update_center: sum over all teacher rows (both crops) / their count, then EMA.
    batch_center = np.concatenate(teacher).sum(0) / 16
    np.testing.assert_allclose(np.asarray(got), 0.9 * center + 0.1 * batch_center, rtol=RTOL)


def test_teacher_momentum_cosine():
    check_teacher_momentum(dino.teacher_momentum)
    mid = float(dino.teacher_momentum(jnp.int32(5), 10, 0.99))
    assert mid == pytest.approx(0.995, abs=1e-6)


def test_teacher_temperature_warmup():
    def temp(step, warmup=10):
        return float(dino.teacher_temperature(jnp.int32(step), warmup, 0.04, 0.07))

    assert temp(0) == pytest.approx(0.04, abs=1e-7)
    assert temp(5) == pytest.approx(0.055, abs=1e-7)
    assert temp(3) == pytest.approx(0.04 + 0.03 * 0.3, abs=1e-7)
    assert temp(10) == pytest.approx(0.07, abs=1e-7)
    assert temp(25) == pytest.approx(0.07, abs=1e-7)
    assert temp(0, warmup=0) == pytest.approx(0.07, abs=1e-7)


# ----------------------------------------------------------------------------- mutants


def _sinkhorn_samples_first(scores, epsilon, iterations):
    q = jnp.exp(scores / epsilon).T
    k, n = q.shape
    q = q / jnp.sum(q)
    for _ in range(iterations):
        q = q / jnp.sum(q, axis=0, keepdims=True) / n
        q = q / jnp.sum(q, axis=1, keepdims=True) / k
    return (q * n).T


def _sinkhorn_untransposed(scores, epsilon, iterations):
    return swav.sinkhorn(scores.T, epsilon, iterations).T


def _swav_no_skip(scores, codes, temperature):
    total = 0.0
    for q in codes:
        for s in scores:
            total -= jnp.mean(jnp.sum(q * jax.nn.log_softmax(s / temperature), -1))
    return total / (len(scores) * len(codes))


def _dino_no_center(student, teacher, center, student_temp, teacher_temp):
    return dino.dino_loss(student, teacher, jnp.zeros_like(center), student_temp, teacher_temp)


def _dino_no_skip(student, teacher, center, student_temp, teacher_temp):
    t = [jax.nn.softmax((x - center) / teacher_temp) for x in teacher]
    terms = [
        jnp.mean(jnp.sum(-q * jax.nn.log_softmax(s / student_temp), -1)) for q in t for s in student
    ]
    return sum(terms) / len(terms), jnp.stack(t)


def _momentum_linear(step, total_steps, base_momentum):
    return base_momentum + (1 - base_momentum) * step / total_steps


@pytest.mark.parametrize(
    "check, mutant",
    [
        (check_sinkhorn, _sinkhorn_samples_first),
        (check_sinkhorn, _sinkhorn_untransposed),
        (check_swav_loss, _swav_no_skip),
        (check_dino_loss, _dino_no_center),
        (check_dino_loss, _dino_no_skip),
        (check_teacher_momentum, _momentum_linear),
    ],
    ids=["sinkhorn-order", "sinkhorn-axes", "swav-skip", "dino-center", "dino-skip", "momentum"],
)
def test_checks_reject_mutants(check, mutant):
    with pytest.raises(AssertionError):
        check(mutant)
