r"""Every pretraining method vs random weights on the demo data: pretrain, then linear evaluation.

  python benchmarks/methods_vs_random.py --seeds 0,1,2 --methods swav,dino,hybrid \
      --workdir runs/methods_vs_random --out benchmarks/results/methods_vs_random.json

For every seed this script pretrains each method from random weights with its demo config
(`configs/<method>.py:demo`, the demo budget: --steps overrides num_steps), then trains a
linear classifier on the frozen backbone (configs/linear_eval.py:demo; for DINO the EMA
teacher, as DINO evaluates), and on random weights as the reference, evaluating on validation,
test and test_shifted. Nothing is selected on test: the table reports it. Prints a Markdown
table (mean +- std over seeds) and per-seed rows, saves JSON; finished runs in --workdir are
reused, so an interrupted benchmark continues where it stopped. `--pretrain_override` takes
`method:key=value` (e.g. `dino:model.variant=vit_tiny`) for one method only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from micle_vs_simclr import ROOT, _run, _set, _table  # noqa: E402,F401  (sets sys.path)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--methods", default="swav,dino,hybrid")
    p.add_argument("--workdir", default="runs/methods_vs_random")
    p.add_argument("--out", default="")
    p.add_argument("--steps", type=int, default=0, help="pretraining steps (0: the demo config's)")
    p.add_argument("--override", nargs="*", default=[], help="pretraining config key=value")
    p.add_argument("--pretrain_override", nargs="*", default=[], help="method:key=value")
    p.add_argument("--eval_override", nargs="*", default=[], help="linear-eval key=value")
    p.add_argument("--data_dir", default="")
    args = p.parse_args(argv)
    from absl import logging

    logging.set_verbosity(logging.WARNING)
    import importlib

    import jax
    import linear_eval

    methods = [m for m in args.methods.split(",") if m]

    def pretrain_config(method: str, seed: int):
        c = importlib.import_module(method).get_config("demo")
        c.seed = seed
        c.data.data_dir = args.data_dir
        if args.steps:
            c.num_steps = args.steps
        for kv in args.override:
            _set(c, *kv.split("=", 1))
        for mkv in args.pretrain_override:
            m, kv = mkv.split(":", 1)
            if m == method:
                _set(c, *kv.split("=", 1))
        return c

    def linear(seed: int, init_dir: str, name: str, workdir: str, variant: str) -> dict:
        e = linear_eval.get_config("demo")
        e.seed = seed
        e.data.data_dir = args.data_dir
        e.model.variant = variant
        e.init_checkpoint, e.init_name = init_dir, name
        for kv in args.eval_override:
            _set(e, *kv.split("=", 1))
        splits = _run(e, workdir)["splits"]
        return {
            **{f"{s}/top1": splits[s]["top1"] for s in sorted(splits)},
            **{f"{s}/auc_mean": splits[s]["auc_mean"] for s in sorted(splits)},
        }

    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    for seed in seeds:
        variants = {}
        for method in methods:
            c = pretrain_config(method, seed)
            variants[method] = c.model.variant
            pre_dir = os.path.join(args.workdir, f"{method}_seed{seed}")
            pre = _run(c, pre_dir)
            res = linear(seed, pre_dir, method, f"{pre_dir}_linear", c.model.variant)
            fm = pre["final_metrics"]
            rows.append(
                {
                    "method": method,
                    "seed": seed,
                    "variant": c.model.variant,
                    "steps": pre["step"],
                    "final_loss": fm.get("loss"),
                    "assign_entropy": fm.get("assign_entropy"),
                    "embed_spread": fm.get("embed_spread"),
                    "collapse_warnings": len(pre.get("collapse_warnings", [])),
                    "pretrain_seconds": pre.get("train_seconds"),
                    **res,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
        for variant in sorted(set(variants.values())):
            name = "random" if variant == "r18_0.125x_sk0" else f"random_{variant}"
            lin_dir = os.path.join(args.workdir, f"{name}_seed{seed}_linear")
            rows.append({"method": name, "seed": seed, "variant": variant})
            rows[-1].update(linear(seed, "", "random", lin_dir, variant))
            print(json.dumps(rows[-1]), flush=True)
    names = sorted({r["method"] for r in rows if r["method"].startswith("random")}) + methods
    table, summary = _table(rows, names, len(seeds))

    def metric(method: str, seed: int, key: str) -> float:
        return next(r for r in rows if r["method"] == method and r["seed"] == seed)[key]

    wins = {}
    for m in methods:
        ref = "random" if variants[m] == "r18_0.125x_sk0" else f"random_{variants[m]}"
        wins[m] = {
            split: sum(
                metric(m, s, f"{split}/top1") > metric(ref, s, f"{split}/top1") for s in seeds
            )
            for split in ("validation", "test")
        }
    print(table)
    for m, w in wins.items():
        print(
            f"{m} beats random weights (top-1): validation {w['validation']}/{len(seeds)}, "
            f"test {w['test']}/{len(seeds)} seeds"
        )
    result = {
        "rows": rows,
        "summary": summary,
        "table": table,
        "wins_over_random": wins,
        "seeds": seeds,
        "steps": args.steps,
        "overrides": args.override,
        "pretrain_overrides": args.pretrain_override,
        "eval_overrides": args.eval_override,
        "num_devices": jax.device_count(),  # XLA_FLAGS decides on a CPU host
    }
    if args.out:
        from medssl_jax.loop import write_json

        write_json(os.path.abspath(args.out), result)
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
