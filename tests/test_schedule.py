"""Deterministic batch schedules: permutations, patient-unique batches, step -> epoch mapping."""

import numpy as np
import pytest

from medssl_jax.schedule import Schedule, patient_unique_epoch, plain_epoch


def test_plain_epoch_is_a_seeded_permutation():
    b = plain_epoch(103, 10, seed=1, epoch=0)
    assert b.shape == (10, 10)
    assert len(set(b.ravel())) == 100
    np.testing.assert_array_equal(b, plain_epoch(103, 10, seed=1, epoch=0))
    assert not np.array_equal(b, plain_epoch(103, 10, seed=1, epoch=1))
    assert not np.array_equal(b, plain_epoch(103, 10, seed=2, epoch=0))


def test_plain_epoch_is_the_same_permutation_in_int32():
    """Halving the epoch's memory (int32) must not change a single batch: runs resumed across
    versions keep their schedule. Reference: NumPy's own int64 permutation."""
    for n, batch in ((103, 10), (4099, 64)):
        ref = np.random.default_rng([5, 2, 3, 1]).permutation(n)[: n // batch * batch]
        got = plain_epoch(n, batch, seed=5, epoch=3, salt=2)
        assert got.dtype == np.int32
        np.testing.assert_array_equal(got.ravel(), ref)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_patient_unique_batches(seed):
    rng = np.random.default_rng(seed)
    keys = rng.integers(0, 60, size=200)  # ~3.3 cases per patient
    batches, left = patient_unique_epoch(keys, 16, seed, epoch=0)
    assert len(batches) > 0
    for b in batches:
        assert len(set(keys[b])) == len(b)  # no patient twice in a batch
    used = batches.ravel()
    assert len(set(used)) == len(used)  # no case twice in an epoch
    assert len(used) + left == len(keys)  # every case is either used or waits: nothing lost


def test_schedule_locate_and_resume_equivalence():
    keys = np.repeat(np.arange(40), 3)
    s = Schedule(len(keys), 8, seed=7, patient_keys=keys)
    seq = [s.batch(t) for t in range(60)]  # spans several epochs
    s2 = Schedule(len(keys), 8, seed=7, patient_keys=keys)
    np.testing.assert_array_equal(s2.batch(45), seq[45])  # fresh schedule, direct jump
    e, i = s2.locate(45)
    assert s2.epoch(e)[i].tolist() == seq[45].tolist()
    assert 0 < s2.epoch_float(45) and e >= 1


def test_schedule_rejects_too_small_dataset():
    with pytest.raises(ValueError, match="batch"):
        Schedule(5, 8, seed=0)
    with pytest.raises(ValueError, match="patient"):
        Schedule(20, 8, seed=0, patient_keys=np.zeros(20, int)).batch(0)
