r"""Prepare a config's dataset(s) ahead of training and print what is in them.

  python -m medssl_jax.prepare --config=configs/finetune.py:chexpert \
      --config.data.manual_dir=/data/chexpert [--json=prepared.json]

Builds (first use only) every split the config reads: data.split, val_split, eval_splits and
the eval_datasets' splits (a pipeline config: those of every stage), then prints per split:
cases, images, patients, multi-image cases (MICLe bags), images per case, class balance
(multi-class: count and share per class; multi-label: positives per class among valid
labels) and the time it took. Errors in the data (bad rows, missing files) surface here,
before any training.
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS


def split_summary(store) -> dict[str, Any]:
    """Counts and class balance of one split's store."""
    spec = store.spec
    counts = store.counts
    out: dict[str, Any] = {
        "dataset": spec.name,
        "split": spec.split,
        "cases": int(store.num_cases),
        "images": int(store.num_images),
        "patients": int(len(np.unique(store.patient_ids))),
        "bags": int((counts >= 2).sum()),
        "images_per_case": {"mean": float(counts.mean()), "max": int(counts.max())},
        "label_kind": spec.label_kind,
    }
    if spec.label_kind == "multiclass":
        lab = store.labels[store.labels >= 0]
        per = np.bincount(lab, minlength=spec.num_classes)
        out["classes"] = {
            c: {"images": int(n), "share": float(n / max(lab.size, 1))}
            for c, n in zip(spec.class_names, per, strict=True)
        }
        out["unlabelled_images"] = int((store.labels < 0).sum())
    elif spec.label_kind == "multilabel":
        valid = store.label_masks > 0
        pos = ((store.labels > 0.5) & valid).sum(0)
        out["classes"] = {
            c: {"positives": int(p), "valid": int(v), "share": float(p / max(v, 1))}
            for c, p, v in zip(spec.class_names, pos, valid.sum(0), strict=True)
        }
    return out


def _splits(config, seen: set[tuple]) -> list[tuple[dict, str, str]]:
    """(data config, split, what reads it) for every split the config reads, in order, but
    those in `seen` (dataset, options, split), which it extends."""
    data = dict(config.data)
    wanted = [(data, config.data.split, "data.split")]
    if config.get("val_split"):
        wanted.append((data, config.val_split, "val_split"))
    evals = list(config.get("eval_splits", ()))
    if not evals:  # the dataset's own splits (data.split is prepared by then)
        from medssl_jax import datasets

        names = datasets.split_names(config.data.name, data.get("data_dir") or None)
        evals = [s for s in names if s != config.data.split]
    for s in evals:
        wanted.append((data, s, "eval_splits"))
    for entry, e in sorted((config.get("eval_datasets") or {}).items()):
        ext = {
            "name": e.name,
            "data_dir": e.get("data_dir") or data.get("data_dir", ""),
            "manual_dir": e.get("manual_dir", ""),
            "options": dict(e.get("options") or {}),
        }
        splits = [e.splits] if isinstance(e.splits, str) else list(e.splits)
        wanted += [(ext, s, f"eval_datasets.{entry}") for s in splits]
    out = []
    for d, s, why in wanted:
        key = (d["name"], json.dumps(d.get("options") or {}, sort_keys=True), s)
        if key not in seen:
            seen.add(key)
            out.append((d, s, why))
    return out


def prepare(config) -> list[dict[str, Any]]:
    """Loads (building on first use) every split the config reads; returns their summaries.
    A pipeline config (configs/pipeline.py): every split of every stage, each once."""
    from medssl_jax import config_lib

    if "pretrain" in config and "finetune" in config:
        from medssl_jax import pipeline

        stages = list(pipeline.stage_configs(config, "").values())
    else:
        config_lib.normalize_lists(config)
        stages = [config]
    rows: list[dict[str, Any]] = []
    seen: set[tuple] = set()
    for stage in stages:
        rows += _prepare_one(stage, seen)
    return rows


def _prepare_one(config, seen: set[tuple]) -> list[dict[str, Any]]:
    from medssl_jax import config_lib, datasets, input_pipeline

    try:  # first the training split: it prepares the dataset, whose splits may be listed next
        input_pipeline.load_store(dict(config.data), config.data.split)
    except datasets.UnknownSplitError as e:
        raise config_lib.ConfigError(f"config.data.split: {e}") from None
    rows = []
    for data, split, why in _splits(config, seen):
        t0 = time.time()
        try:
            store = input_pipeline.load_store(data, split)
        except datasets.UnknownSplitError as e:
            raise config_lib.ConfigError(f"config.{why}: {e}") from None
        row = split_summary(store)
        row["seconds"] = round(time.time() - t0, 1)
        row["read_by"] = why
        rows.append(row)
    return rows


def format_summary(row: dict[str, Any]) -> str:
    lines = [
        f"{row['dataset']} / {row['split']} ({row['read_by']}): {row['cases']} cases, "
        f"{row['images']} images, {row['patients']} patients, {row['bags']} multi-image cases, "
        f"{row['images_per_case']['mean']:.2f} images/case (max {row['images_per_case']['max']}); "
        f"{row['seconds']} s"
    ]
    for c, v in row.get("classes", {}).items():
        if "images" in v:
            lines.append(f"    {c:>24}: {v['images']:7d} images ({100 * v['share']:.1f}%)")
        else:
            share = f"{100 * v['share']:.1f}%"
            lines.append(f"    {c:>24}: {v['positives']:7d} positive of {v['valid']} ({share})")
    return "\n".join(lines)


def main(argv):
    del argv
    from medssl_jax import train

    train.quiet_libraries()
    t0 = time.time()
    try:
        rows = prepare(FLAGS.config)
    except train.USER_ERRORS as e:
        raise SystemExit(f"error: {e}") from None
    for r in rows:
        print(format_summary(r))
    print(f"prepared {len(rows)} split(s) in {time.time() - t0:.1f} s")
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    config_flags.DEFINE_config_file("config", None, "Any stage's config file (:variants).")
    flags.DEFINE_string("json", None, "Also write the summaries here as JSON.")
    flags.mark_flags_as_required(["config"])
    from medssl_jax import cli

    app.run(
        main,
        flags_parser=cli.config_flags_parser(
            "python -m medssl_jax.prepare --config=configs/<file>.py[:variants]"
        ),
    )
