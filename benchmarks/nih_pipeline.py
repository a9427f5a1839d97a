r"""Real-image evidence: the paper's pipeline on 1,000 real NIH chest X-rays, patient-level CIs.

  python benchmarks/nih_pipeline.py --workdir=runs/nih \
      [--out=benchmarks/results/nih_pipeline.json] [--nih=../shared/data/nih_cxr_1000] \
      [--set=simclr.num_steps=600 ...]   # any field of configs/pipeline.py:nih

The images (../shared/data/nih_cxr_1000, 64 px, normal vs abnormal) are described by a
labels.csv (case = patient, so a patient's follow-up studies form a MICLe bag) that the derm_csv
builder re-splits by patient (the set as shipped has 30 patients in two splits). Then
`medssl_jax.pipeline` with configs/pipeline.py:nih runs, for each of 3 seeds: SimCLR from random
weights; continued from it for equal steps: SimCLR (simclr_more, the fair control), MICLe, and
the two MICLe options (micle_mix: half the pairs SimCLR pairs; micle_images: epochs over images);
fine-tuning at 10% and 100% labels and a linear probe from each, and from scratch. The summary:
every (sweep, init) on validation and test with the seed mean and its 95% patient-bootstrap CI,
and paired patient-bootstrap differences (same patients drawn for both models) of each arm
against simclr_more and of each pretrained init against scratch. Nothing is chosen on test:
the checkpoint of every run is chosen on validation (selection_metric), and the options are
ranked on validation. The stages are reused when their results exist (resumable).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from collections import defaultdict

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "configs"))
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

DEFAULT_NIH = os.path.join(os.path.dirname(ROOT), "shared", "data", "nih_cxr_1000")
METRICS = ("auc_mean", "balanced_accuracy")
CONTROL = "simclr_more"  # SimCLR continued for as many steps as every arm


def write_labels_csv(nih: str, manual_dir: str) -> int:
    """labels.csv (image_path, case_id = patient, label = class folder) of every PNG under
    nih/{train,valid,test}/{class}/<patient>_<followup>.png; returns the number of images."""
    pngs = sorted(
        os.path.join(dp, f) for dp, _, files in os.walk(nih) for f in files if f.endswith(".png")
    )
    if not pngs:
        raise SystemExit(f"error: no PNG images under {nih} (--nih)")
    os.makedirs(manual_dir, exist_ok=True)
    with open(os.path.join(manual_dir, "labels.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_path", "case_id", "label"])
        for p in pngs:
            stem = os.path.splitext(os.path.basename(p))[0]
            if "_" not in stem:
                raise SystemExit(f"error: {p}: expected <patient>_<followup>.png")
            w.writerow([p, stem.split("_")[0], os.path.basename(os.path.dirname(p))])
    return len(pngs)


def summarise(root: str, bootstrap: int) -> dict:
    """Seed means with patient-bootstrap CIs, and paired differences, for every sweep."""
    from medssl_jax import confidence, predictions
    from medssl_jax.results import load_runs

    out: dict = {"cells": [], "paired": [], "pretraining": []}
    for name in sorted(os.listdir(root)):  # pretraining stages: <name>/seed<s>/results.json
        files = sorted(
            os.path.join(root, name, d, "results.json")
            for d in (
                os.listdir(os.path.join(root, name))
                if os.path.isdir(os.path.join(root, name))
                else []
            )
            if d.startswith("seed")
        )
        res = [json.load(open(f)) for f in files if os.path.exists(f)]
        res = [r for r in res if r.get("kind") == "pretrain"]
        if res:
            final = [r["final_metrics"] for r in res]
            out["pretraining"].append(
                dict(
                    stage=name,
                    label=res[0]["label"],
                    epoch_unit=res[0]["epoch_unit"],
                    steps=res[0]["total_steps"],
                    **{
                        # null: undefined (NaN) in strict JSON
                        k: float(np.mean([np.nan if f[k] is None else f[k] for f in final]))
                        for k in ("epoch", "contrastive_acc", "distinct_pairs", "loss")
                        if all(k in f for f in final)
                    },
                )
            )
    splits = ("validation", "test")
    for sweep in ("finetune", "linear"):
        runs, _ = load_runs([os.path.join(root, sweep)])
        groups: dict = defaultdict(list)  # (init, fraction) -> runs, by seed
        for r in sorted(runs, key=lambda r: r.results["seed"]):
            groups[(r.results["init"], float(r.results["label_fraction"]))].append(r)
        preds = {  # every prediction CSV read once: (init, fraction, split) -> one per seed
            (*key, split): [
                predictions.read_predictions_csv(r.folder / r.results["predictions"][split])
                for r in rs
            ]
            for key, rs in groups.items()
            for split in splits
        }
        for (init, frac), rs in sorted(groups.items()):
            for split in splits:
                for m in METRICS:
                    p = preds[(init, frac, split)]
                    point, lo, hi = confidence.bootstrap_ci(p, m, num_replicates=bootstrap)
                    seeds = [r.metric(split, m) for r in rs]
                    cell = dict(init=init, mean=point, ci=[lo, hi], seeds=seeds)
                    out["cells"].append(
                        dict(sweep=sweep, fraction=frac, split=split, metric=m, **cell)
                    )
        pairs = [(a, CONTROL) for a, _ in groups if a not in (CONTROL, "scratch", "simclr")]
        pairs += [(a, "scratch") for a, _ in groups if a != "scratch"]
        for a, b in sorted(set(pairs)):
            for frac in sorted({f for i, f in groups if i == a and (b, f) in groups}):
                for split in splits:
                    for m in METRICS:
                        point, lo, hi = confidence.paired_difference_ci(
                            preds[(a, frac, split)],
                            preds[(b, frac, split)],
                            m,
                            num_replicates=bootstrap,
                        )
                        pair = dict(a=a, b=b, diff=point, ci=[lo, hi])
                        out["paired"].append(
                            dict(sweep=sweep, fraction=frac, split=split, metric=m, **pair)
                        )
    return out


def train_minutes(root: str) -> float:
    """Training time summed over every stage's results.json (pretraining and sweeps), so the
    JSON says what the whole study cost even when this invocation only summarised it."""
    total = 0.0
    for dirpath, _, files in os.walk(root):
        if "results.json" in files:
            with open(os.path.join(dirpath, "results.json")) as f:
                r = json.load(f)
            total += float(
                r.get("train_seconds") or (r.get("train") or {}).get("train_seconds") or 0
            )
    return total / 60


def table(summary: dict) -> str:
    """Markdown: one row per (sweep, fraction, init); AUC and balanced accuracy with CIs."""
    cells = {
        (c["sweep"], c["fraction"], c["init"], c["split"], c["metric"]): c for c in summary["cells"]
    }
    rows = sorted({k[:3] for k in cells}, key=lambda k: (k[0] != "linear", k[1], k[2]))
    cols = [(s, m) for s in ("validation", "test") for m in METRICS]
    lines = [
        "| protocol | labels | init | n | " + " | ".join(f"{s} {m}" for s, m in cols) + " |",
        "|---|---:|---|---:|" + "---:|" * len(cols),
    ]
    for sweep, frac, init in rows:
        vals = []
        for s, m in cols:
            c = cells.get((sweep, frac, init, s, m))
            vals.append(f"{c['mean']:.3f} [{c['ci'][0]:.3f}, {c['ci'][1]:.3f}]" if c else "-")
        n = len(cells[(sweep, frac, init, "test", METRICS[0])]["seeds"])
        name = "linear probe" if sweep == "linear" else "fine-tune"
        lines.append(f"| {name} | {frac:.0%} | {init} | {n} | " + " | ".join(vals) + " |")
    lines += ["", "Pretraining stages (mean over seeds of the last logged step):", ""]
    lines += ["| stage | pairs | epochs over | epochs | distinct pairs | contrastive acc |"]
    lines += ["|---|---|---|---:|---:|---:|"]
    for p in summary["pretraining"]:
        lines.append(
            f"| {p['stage']} | {p['label']} | {p['epoch_unit']} | {p.get('epoch', 0):.1f} | "
            f"{p.get('distinct_pairs', 0):.2f} | {p.get('contrastive_acc', 0):.3f} |"
        )
    lines += ["", "Paired differences (same patients resampled for both; 95% CI):", ""]
    lines += [
        "| protocol | labels | a - b | split | metric | diff [95% CI] |",
        "|---|---:|---|---|---|---:|",
    ]
    for p in summary["paired"]:
        name = "linear probe" if p["sweep"] == "linear" else "fine-tune"
        lines.append(
            f"| {name} | {p['fraction']:.0%} | {p['a']} - {p['b']} | {p['split']} | "
            f"{p['metric']} | {p['diff']:+.3f} [{p['ci'][0]:+.3f}, {p['ci'][1]:+.3f}] |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--nih", default=DEFAULT_NIH)
    ap.add_argument(
        "--out", default=os.path.join(ROOT, "benchmarks", "results", "nih_pipeline.json")
    )
    ap.add_argument("--set", action="append", default=[], help="pipeline config KEY=VALUE")
    ap.add_argument("--bootstrap", type=int, default=1000)
    args = ap.parse_args()
    if not os.path.isdir(args.nih):
        raise SystemExit(f"error: --nih {args.nih!r} is not a directory")

    import pipeline as pipeline_config
    from absl import logging

    from medssl_jax import config_lib, pipeline, train

    logging.set_verbosity(logging.INFO)  # stage and step progress (images/s, ETA)
    train.quiet_libraries()
    config = pipeline_config.get_config("nih")
    manual = os.path.join(args.workdir, "manual")
    n = write_labels_csv(args.nih, manual)
    config.data.manual_dir = manual
    config.data.data_dir = os.path.join(args.workdir, "tfds")
    for kv in args.set:
        key, eq, value = kv.partition("=")
        if not eq:
            raise SystemExit(f"error: --set {kv!r}: expected KEY=VALUE")
        try:
            config_lib.set_field(config, key, value, where="--set ")
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
    t0 = time.time()
    print(f"{n} images from {args.nih}; pipeline in {args.workdir}", flush=True)
    report = pipeline.run_pipeline(config, args.workdir)
    summary = summarise(args.workdir, args.bootstrap)
    md = table(summary)
    print(md)
    result = {
        "data": os.path.relpath(args.nih, ROOT),
        "config": "configs/pipeline.py:nih",
        "overrides": args.set,
        "seeds": list(config.seeds),
        "steps": {k: int(config[k].num_steps) for k in ("pretrain", "micle", "finetune", "linear")},
        "arms": dict(config.arms),
        "bootstrap": args.bootstrap,
        "minutes_this_invocation": round((time.time() - t0) / 60, 1),
        "train_minutes_all_stages": round(train_minutes(args.workdir), 1),
        "report": os.path.relpath(report, args.workdir),
        "table": md,
        **summary,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
