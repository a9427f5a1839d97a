"""Patient-level split assignment and nested, stratified label-fraction subsets.

Both are pure functions of ids and seeds (stable across machines, Python versions and runs), so
builders and readers on every host agree without communicating.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence

import numpy as np

_TOLERANCE = 1e-6


def stable_unit_hash(text: str, salt: str = "") -> float:
    """Maps `salt` + `text` to a uniform float in [0, 1) with SHA-256 (stable, unlike hash())."""
    digest = hashlib.sha256(f"{salt}\x1f{text}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def patient_split(patient_id: str, fractions: Mapping[str, float], salt: str = "") -> str:
    """Split name for a patient: deterministic in (patient_id, salt), never two splits per patient.

    `fractions` maps split name -> fraction (>0, summing to 1); splits are laid out on [0, 1) in
    the mapping's order and the patient goes where its hash falls. Use a dataset-specific `salt`.
    """
    if not fractions:
        raise ValueError("patient_split: `fractions` is empty; give e.g. {'train': 0.8, ...}")
    bad = {k: v for k, v in fractions.items() if not (isinstance(v, (int, float)) and v > 0)}
    if bad:
        raise ValueError(f"patient_split: fractions must be > 0, got {bad}")
    total = float(sum(fractions.values()))
    if abs(total - 1.0) > _TOLERANCE:
        raise ValueError(
            f"patient_split: fractions must sum to 1, got {total} from {dict(fractions)}"
        )
    if not isinstance(patient_id, str) or not patient_id:
        raise ValueError(f"patient_split: patient_id must be a non-empty str, got {patient_id!r}")
    u = stable_unit_hash(patient_id, salt)
    acc = 0.0
    names = list(fractions)
    for name in names:
        acc += fractions[name] / total
        if u < acc:
            return name
    return names[-1]  # u is within rounding of 1.0


def check_label_fraction(label_fraction: float) -> float:
    """Validates a label fraction in (0, 1] and returns it as float."""
    try:
        f = float(label_fraction)
    except (TypeError, ValueError):
        raise ValueError(
            f"label_fraction must be a number in (0, 1], got {label_fraction!r}"
        ) from None
    if not (0.0 < f <= 1.0):
        raise ValueError(f"label_fraction must be in (0, 1], got {label_fraction!r}")
    return f


def select_label_fraction(
    case_ids: Sequence[str],
    strata: Sequence[int] | np.ndarray,
    label_fraction: float,
    seed: int = 0,
) -> np.ndarray:
    """Boolean mask [N] of the cases kept for a label fraction, stratified and nested.

    Within each stratum (e.g. class), cases are ranked by a seeded hash of their case id and the
    first ceil(f * n) are kept, so for one seed the subset for f1 <= f2 is contained in the one
    for f2, every non-empty stratum keeps at least one case, and the result does not depend on
    the order of the cases. Case ids must be unique.
    """
    f = check_label_fraction(label_fraction)
    strata = np.asarray(strata)
    n = len(case_ids)
    if strata.shape != (n,):
        raise ValueError(f"strata must have shape ({n},) like case_ids, got {strata.shape}")
    if len(set(case_ids)) != n:
        seen: set[str] = set()
        dup = next(c for c in case_ids if c in seen or seen.add(c))
        raise ValueError(f"select_label_fraction: duplicate case_id {dup!r}")
    keep = np.zeros(n, dtype=bool)
    if f >= 1.0:
        keep[:] = True
        return keep
    salt = f"label_fraction:{int(seed)}"
    scores = np.array([stable_unit_hash(c, salt) for c in case_ids], dtype=np.float64)
    for s in np.unique(strata):
        members = np.flatnonzero(strata == s)
        # Rank by (score, case_id) so ties cannot depend on input order.
        order = sorted(members, key=lambda i: (scores[i], case_ids[i]))
        take = math.ceil(f * len(members) - _TOLERANCE)
        keep[order[: max(take, 1)]] = True
    return keep


def multilabel_strata(labels: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Stratum per case for multilabel data: its positive finding that is most frequent overall.

    `labels`, `masks`: float [N, K] (one row per case, e.g. its first image). A case with no
    counted positive gets stratum K ("no finding").
    """
    labels = np.asarray(labels, dtype=np.float32)
    masks = np.asarray(masks, dtype=np.float32)
    if labels.ndim != 2 or labels.shape != masks.shape:
        raise ValueError(f"labels/masks must both be [N, K], got {labels.shape}, {masks.shape}")
    positive = (labels >= 0.5) & (masks > 0)
    freq = positive.sum(axis=0)  # [K]
    # Most frequent positive: highest global frequency, ties -> lowest index.
    score = np.where(
        positive, freq[None, :] * (labels.shape[1] + 1) - np.arange(labels.shape[1]), -1
    )
    strata = np.argmax(score, axis=1)
    strata[~positive.any(axis=1)] = labels.shape[1]
    return strata.astype(np.int64)
