"""Deterministic batch schedules: which items form this process's batch at a given step.

A schedule is a pure function of (seed, process_index, epoch), computed on host metadata only
(no pixels), so a resumed run recomputes exactly where it was in O(epochs) NumPy work, and every
batch is known before any image is decoded. Epochs are over the schedule's items: images for
SimCLR and fine-tuning, cases (bags) for MICLe.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) & 0xFFFFFFFF for k in key])


def _index_dtype(n: int) -> type:
    return np.int32 if n < 2**31 else np.int64


def plain_epoch(
    num_items: int, batch_size: int, seed: int, epoch: int, salt: int = 0
) -> np.ndarray:
    """[num_batches, batch_size] item indices: a seeded permutation; the remainder is dropped.
    int32 below 2**31 items (half the memory of `permutation`'s int64, same values)."""
    perm = np.arange(num_items, dtype=_index_dtype(num_items))
    _rng(seed, salt, epoch, 1).shuffle(perm)  # == Generator.permutation(num_items)
    n = (num_items // batch_size) * batch_size
    return perm[:n].reshape(-1, batch_size)


def patient_unique_epoch(
    patient_keys: np.ndarray, batch_size: int, seed: int, epoch: int, salt: int = 0
) -> tuple[np.ndarray, int]:
    """Batches in which no patient appears twice (MICLe: same-patient cases are false negatives).

    Cases are visited in a seeded random order; a case whose patient is already in the batch
    being filled waits (in order) for the next batch. Cases still waiting when the epoch ends
    are left for this epoch only (the next epoch reshuffles). Returns (batches, num_left).
    """
    n = len(patient_keys)
    order = np.arange(n, dtype=_index_dtype(n))
    _rng(seed, salt, epoch, 2).shuffle(order)
    out = np.empty((n // batch_size, batch_size), order.dtype)  # rows filled as batches close
    num_batches = 0
    waiting: list[int] = []
    current: list[int] = []
    patients: set[int] = set()

    def take(i: int) -> bool:
        p = int(patient_keys[i])
        if p in patients:
            return False
        current.append(i)
        patients.add(p)
        return True

    for i in map(int, order):  # (not .tolist(): no O(cases) list of Python ints)
        if not take(i):
            waiting.append(i)
        while len(current) == batch_size:  # emit, then refill from the waiting cases first
            out[num_batches] = current
            num_batches += 1
            current, patients = [], set()
            still = []
            for w in waiting:
                if len(current) >= batch_size or not take(w):
                    still.append(w)
            waiting = still
    left = len(current) + len(waiting)
    return out[:num_batches], left


@dataclasses.dataclass
class Schedule:
    """Maps a global step to this process's item indices, epoch after epoch, forever.

    Args:
      num_items: items in this process's shard (images or cases).
      batch_size: this process's batch size.
      seed, salt: the run seed and a per-process salt (e.g. process index).
      patient_keys: when given, batches are patient-unique (MICLe).
    """

    num_items: int
    batch_size: int
    seed: int
    salt: int = 0
    patient_keys: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.num_items < self.batch_size:
            raise ValueError(
                f"the dataset shard has {self.num_items} items, fewer than one per-process batch "
                f"({self.batch_size}): lower config.batch_size or use more data"
            )
        self._epoch_cache: dict[int, np.ndarray] = {}
        self._starts = [0]  # first global step of each epoch computed so far

    def epoch(self, e: int) -> np.ndarray:
        if e not in self._epoch_cache:
            if self.patient_keys is None:
                b = plain_epoch(self.num_items, self.batch_size, self.seed, e, self.salt)
            else:
                b, left = patient_unique_epoch(
                    self.patient_keys, self.batch_size, self.seed, e, self.salt
                )
                if len(b) == 0:
                    raise ValueError(
                        f"cannot form one patient-unique batch of {self.batch_size} cases: fewer "
                        "distinct patients than the per-process batch; lower config.batch_size"
                    )
                if left:
                    logging.info(
                        "epoch %d: %d cases left for the next epoch (remainder / same-patient)",
                        e,
                        left,
                    )
            self._epoch_cache = {k: v for k, v in self._epoch_cache.items() if k >= e - 1}
            self._epoch_cache[e] = b
        return self._epoch_cache[e]

    def locate(self, step: int) -> tuple[int, int]:
        """(epoch, batch index within the epoch) of a global step."""
        while len(self._starts) <= 1 or self._starts[-1] <= step:
            e = len(self._starts) - 1
            self._starts.append(self._starts[-1] + len(self.epoch(e)))
        e = int(np.searchsorted(self._starts, step, side="right")) - 1
        return e, step - self._starts[e]

    def batch(self, step: int) -> np.ndarray:
        e, i = self.locate(step)
        return self.epoch(e)[i]

    def epoch_float(self, step: int) -> float:
        e, i = self.locate(step)
        return e + i / max(1, len(self.epoch(e)))
