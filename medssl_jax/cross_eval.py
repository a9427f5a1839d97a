"""Evaluation on OTHER datasets through a declared label mapping, with no further tuning
(distribution shift across datasets, Azizi et al. 2021: CheXpert models on NIH ChestX-ray14,
dermatology models on an external set).

Config (fine-tune / linear eval), one entry per external dataset:
  c.eval_datasets.nih = ml_collections.ConfigDict(dict(
      name="nih_chestxray14", data_dir="", manual_dir="", options={}, splits=("test",),
      label_map="Atelectasis=Atelectasis,Cardiomegaly=Cardiomegaly,...,Pleural Effusion=Effusion"))
label_map pairs a TRAINING class with the external dataset's class. Only mapped classes are
scored: multi-label, the other classes' labels are masked; multi-class, images whose class is
not mapped are left out (the model still chooses among all its classes). Results appear as
split `test_<entry>` (`test_<entry>_<split>` with several splits), so the report puts them in
its shift section beside the in-distribution test split.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections
import numpy as np

from medssl_jax import datasets, input_pipeline
from medssl_jax.case_store import CaseStore
from medssl_jax.config_lib import ConfigError

__all__ = ["Target", "load_targets", "parse_label_map", "to_training_space"]


@dataclasses.dataclass(frozen=True)
class Target:
    """One (external dataset, split) to evaluate on, with its class mapping."""

    entry: str  # the config key, e.g. 'nih'
    dataset: str
    split: str
    result_split: str  # name in results.json, e.g. 'test_nih'
    store: CaseStore
    pairs: tuple[tuple[int, int], ...]  # (training class index, external class index)
    names: tuple[tuple[str, str], ...]  # the same pairs by name

    def describe(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "split": self.split,
            "classes": {t: e for t, e in self.names},
        }


def parse_label_map(text: str, field: str) -> list[tuple[str, str]]:
    """'a=A,b=B' -> [('a', 'A'), ('b', 'B')]; errors name the field."""
    pairs = []
    for item in [s.strip() for s in str(text).split(",") if s.strip()]:
        t, sep, e = item.partition("=")
        if not sep or not t.strip() or not e.strip():
            raise ConfigError(f"config.{field}: {item!r} is not training_class=external_class")
        pairs.append((t.strip(), e.strip()))
    if not pairs:
        raise ConfigError(f"config.{field}: empty; give training_class=external_class,...")
    for side, i in (("training", 0), ("external", 1)):
        names = [p[i] for p in pairs]
        if len(set(names)) != len(names):
            raise ConfigError(f"config.{field}: a {side} class is mapped twice: {names}")
    return pairs


def load_targets(
    config: ml_collections.ConfigDict,
    train_spec: datasets.DataSpec,
    *,
    process_index: int = 0,
    process_count: int = 1,
) -> list[Target]:
    """Every (entry, split) of config.eval_datasets, loaded and checked against the training
    dataset (label kinds, class names) before anything is compiled."""
    targets = []
    for entry, e in sorted((config.get("eval_datasets") or {}).items()):
        where = f"eval_datasets.{entry}"
        for key in ("name", "splits", "label_map"):
            if key not in e:
                raise ConfigError(f"config.{where}.{key}: missing")
        splits = [e.splits] if isinstance(e.splits, str) else list(e.splits)
        pairs = parse_label_map(e.label_map, f"{where}.label_map")
        data = {
            "name": e.name,
            "data_dir": e.get("data_dir") or config.data.get("data_dir", ""),
            "manual_dir": e.get("manual_dir", ""),
            "options": dict(e.get("options") or {}),
            "image_size": config.data.image_size,
        }
        for split in splits:
            try:
                store = input_pipeline.load_store(
                    data, split, process_index=process_index, process_count=process_count
                )
            except datasets.UnknownSplitError as err:
                raise ConfigError(f"config.{where}.splits: {err}") from None
            spec = store.spec
            if spec.label_kind != train_spec.label_kind:
                raise ConfigError(
                    f"config.{where}.name: {e.name!r} is {spec.label_kind}, the training data "
                    f"{train_spec.name!r} is {train_spec.label_kind}"
                )
            idx = []
            for t, x in pairs:
                if t not in train_spec.class_names:
                    raise ConfigError(
                        f"config.{where}.label_map: {t!r} is not a class of the training data "
                        f"{train_spec.name!r}: {list(train_spec.class_names)}"
                    )
                if x not in spec.class_names:
                    raise ConfigError(
                        f"config.{where}.label_map: {x!r} is not a class of {e.name!r}: "
                        f"{list(spec.class_names)}"
                    )
                idx.append((train_spec.class_names.index(t), list(spec.class_names).index(x)))
            name = f"test_{entry}" if len(splits) == 1 else f"test_{entry}_{split}"
            targets.append(Target(entry, e.name, split, name, store, tuple(idx), tuple(pairs)))
    return targets


def to_training_space(
    target: Target, labels: np.ndarray, masks: np.ndarray | None, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """External labels -> (labels, mask) over the training classes, only mapped ones valid.

    Multi-label: labels [N, K_ext], masks [N, K_ext] -> float [N, K], mask [N, K].
    Multi-class: labels [N] -> int [N] (-1 where the class is not mapped or the image has no
    label, -1), mask bool [N].
    """
    if labels.ndim == 2:
        out = np.zeros((labels.shape[0], num_classes), np.float32)
        mask = np.zeros((labels.shape[0], num_classes), np.float32)
        ext_mask = np.ones_like(labels, np.float32) if masks is None else masks
        for t, x in target.pairs:
            out[:, t] = labels[:, x]
            mask[:, t] = ext_mask[:, x]
        return out, mask
    lookup = np.full(max(int(labels.max(initial=0)) + 1, 1), -1, np.int64)
    for t, x in target.pairs:
        if x < lookup.size:
            lookup[x] = t
    labels = labels.astype(np.int64)
    out = np.full(labels.shape, -1, np.int64)
    labelled = labels >= 0  # -1: no label (lookup[-1] would be the highest external class)
    out[labelled] = lookup[labels[labelled]]
    return out, out >= 0
