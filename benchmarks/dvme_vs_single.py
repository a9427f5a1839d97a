r"""DVME over two of this project's encoders vs a linear probe on each, on the demo data.

  python benchmarks/dvme_vs_single.py --encoders simclr,swav --seeds 0,1,2 \
      --workdir runs/dvme_vs_single --out benchmarks/results/dvme_vs_single.json

Pretrains each encoder once with its demo config (`configs/<name>.py:demo`, seed 0), then for
every seed trains, on the SAME cached features (one extraction per encoder and split):
a linear probe on each encoder alone (`configs/dvme.py:demo,probe`: DVME with one encoder and
no attention is a linear head) and DVME over all of them (`configs/dvme.py:demo`). Heads are
chosen on validation (balanced accuracy); the table reports test and test_shifted, which
choose nothing. Writes the JSON and a report (95% CIs from resampling patients) next to it.
Finished runs are reused, so an interrupted benchmark continues.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from micle_vs_simclr import _run, _set  # noqa: E402  (puts the repo and configs/ on sys.path)

METRICS = ("top1", "balanced_accuracy", "auc_mean")
SPLITS = ("validation", "test", "test_shifted")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--encoders", default="simclr,swav")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--workdir", default="runs/dvme_vs_single")
    p.add_argument("--out", default="")
    p.add_argument("--data_dir", default="")
    p.add_argument("--override", nargs="*", default=[], help="DVME/probe config key=value")
    args = p.parse_args(argv)
    from absl import logging

    logging.set_verbosity(logging.WARNING)
    import dvme as dvme_config
    import numpy as np

    names = [n for n in args.encoders.split(",") if n]
    seeds = [int(s) for s in args.seeds.split(",")]
    root = os.path.abspath(args.workdir)
    t0 = time.time()
    encoders = {}
    for name in names:
        c = importlib.import_module(name).get_config("demo")
        c.seed, c.data.data_dir = 0, args.data_dir
        d = os.path.join(root, "pretrain", name)
        print(f"[{time.time() - t0:6.0f} s] pretraining {name} -> {d}", flush=True)
        _run(c, d)
        encoders[name] = d

    def head_config(variant: str, enc: dict[str, str], seed: int):
        c = dvme_config.get_config(variant)
        c.seed, c.data.data_dir = seed, args.data_dir
        c.dvme.encoders = ",".join(f"{n}={p}" for n, p in enc.items())
        c.dvme.cache_dir = os.path.join(root, "features")
        for kv in args.override:
            _set(c, *kv.split("=", 1))
        return c

    runs = [(f"probe_{n}", "demo,probe", {n: encoders[n]}) for n in names]
    runs.append((f"dvme_{'+'.join(names)}", "demo", encoders))
    rows = []
    for seed in seeds:
        for label, variant, enc in runs:
            d = os.path.join(root, "heads", label, f"seed{seed}")
            print(f"[{time.time() - t0:6.0f} s] seed {seed}: {label}", flush=True)
            res = _run(head_config(variant, enc, seed), d)
            row = {"model": label, "seed": seed}
            for s in SPLITS:
                for m in METRICS:
                    row[f"{s}/{m}"] = res["splits"][s][m]
            if "dvme" in res and len(enc) > 1:
                row["test/attention"] = res["dvme"]["mean_encoder_weights"]["test"]
            rows.append(row)

    def mean_std(label: str, key: str) -> tuple[float, float]:
        v = [r[key] for r in rows if r["model"] == label]
        return float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0

    cols = [f"{s}/{m}" for s in SPLITS for m in METRICS]
    table = ["| model | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    summary = {}
    for label, _, _ in runs:
        summary[label] = {k: mean_std(label, k) for k in cols}
        cells = " | ".join(f"{m:.3f} ± {s:.3f}" for m, s in summary[label].values())
        table.append(f"| {label} (n={len(seeds)}) | {cells} |")
    dvme_label = runs[-1][0]
    # Per seed: is DVME at least as good as the better single probe (chosen on VALIDATION)?
    verdicts = []
    for seed in seeds:
        by = {r["model"]: r for r in rows if r["seed"] == seed}
        best = max(
            (f"probe_{n}" for n in names), key=lambda k: by[k]["validation/balanced_accuracy"]
        )
        verdicts.append(
            {
                "seed": seed,
                "best_single_on_validation": best,
                **{
                    f"dvme_minus_best/{s}/{m}": by[dvme_label][f"{s}/{m}"] - by[best][f"{s}/{m}"]
                    for s in ("test", "test_shifted")
                    for m in METRICS
                },
            }
        )
    from medssl_jax import report

    report_dir = os.path.join(root, "report")
    report.build_report([os.path.join(root, "heads")], report_dir)
    result = {
        "command": "python benchmarks/dvme_vs_single.py " + " ".join(argv or sys.argv[1:]),
        "encoders": encoders,
        "seeds": seeds,
        "rows": rows,
        "summary": summary,
        "table": "\n".join(table),
        "dvme_vs_best_single": verdicts,
        "report": os.path.join(report_dir, "report.md"),
        "minutes": (time.time() - t0) / 60,
    }
    print("\n".join(table))
    print(json.dumps(verdicts, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
