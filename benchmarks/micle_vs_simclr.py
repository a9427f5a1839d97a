r"""MICLe vs SimCLR on the demo data at equal steps: pretrain, then linear evaluation.

  python benchmarks/micle_vs_simclr.py --seeds 0,1,2 --workdir runs/micle_vs_simclr \
      --out benchmarks/results/micle_vs_simclr.json [--override num_steps=300 ...]

For every seed, pretrains SimCLR and MICLe with configs/{simclr,micle}.py:demo (identical model,
optimiser, augmentations and number of steps; only the positive pairs differ), then trains a
linear classifier on each frozen backbone (configs/linear_eval.py:demo) and evaluates it on
test and test_shifted. Prints a Markdown table (mean +- std over seeds, and per seed) and saves
JSON. Runs already finished in --workdir are reused, so an interrupted benchmark continues.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "configs"))
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")


def _set(c, key: str, value: str) -> None:
    node = c
    *path, last = key.split(".")
    for p in path:
        node = node[p]
    old = node[last]
    node[last] = (value == "True") if isinstance(old, bool) else type(old)(value)


def _run(config, workdir: str) -> dict:
    from medssl_jax import train

    path = os.path.join(workdir, "results.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return train.train_and_evaluate(config, workdir)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--workdir", default="runs/micle_vs_simclr")
    p.add_argument("--out", default="")
    p.add_argument("--override", nargs="*", default=[], help="pretraining config key=value")
    p.add_argument("--eval_override", nargs="*", default=[], help="linear-eval key=value")
    p.add_argument("--data_dir", default="")
    args = p.parse_args(argv)
    from absl import logging

    logging.set_verbosity(logging.WARNING)
    import linear_eval
    import micle
    import numpy as np
    import simclr

    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    for seed in seeds:
        for method, module in (("simclr", simclr), ("micle", micle)):
            c = module.get_config("demo")
            c.seed = seed
            c.data.data_dir = args.data_dir
            for kv in args.override:
                _set(c, *kv.split("=", 1))
            pre_dir = os.path.join(args.workdir, f"{method}_seed{seed}")
            pre = _run(c, pre_dir)
            e = linear_eval.get_config("demo")
            e.seed = seed
            e.data.data_dir = args.data_dir
            e.init_checkpoint, e.init_name = pre_dir, method
            for kv in args.eval_override:
                _set(e, *kv.split("=", 1))
            ev = _run(e, os.path.join(args.workdir, f"{method}_seed{seed}_linear"))
            row = {
                "method": method,
                "seed": seed,
                "pretrain_steps": pre["step"],
                "contrastive_acc": pre["final_metrics"].get("contrastive_acc"),
                **{f"{s}/top1": ev["splits"][s]["top1"] for s in ev["splits"]},
                **{f"{s}/auc_mean": ev["splits"][s]["auc_mean"] for s in ev["splits"]},
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    metrics = [k for k in rows[0] if "/" in k]
    summary = {}
    lines = ["| method | " + " | ".join(metrics) + " |", "|---|" + "---:|" * len(metrics)]
    for method in ("simclr", "micle"):
        vals = {k: [r[k] for r in rows if r["method"] == method] for k in metrics}
        summary[method] = {k: (float(np.mean(v)), float(np.std(v))) for k, v in vals.items()}
        lines.append(
            f"| {method} (n={len(seeds)}) | "
            + " | ".join(
                f"{summary[method][k][0]:.3f} ± {summary[method][k][1]:.3f}" for k in metrics
            )
            + " |"
        )
    wins = sum(
        next(r for r in rows if r["method"] == "micle" and r["seed"] == s)["test/top1"]
        > next(r for r in rows if r["method"] == "simclr" and r["seed"] == s)["test/top1"]
        for s in seeds
    )
    table = "\n".join(lines)
    print(table)
    print(f"MICLe beats SimCLR on test top-1 in {wins}/{len(seeds)} seeds")
    result = {
        "rows": rows,
        "summary": summary,
        "table": table,
        "micle_wins": wins,
        "seeds": seeds,
        "overrides": args.override,
        "eval_overrides": args.eval_override,
    }
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
