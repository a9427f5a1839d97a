r"""MICLe vs SimCLR on the demo data at equal steps: pretrain, then linear evaluation.

  python benchmarks/micle_vs_simclr.py --seeds 0,1,2 --workdir runs/micle_vs_simclr \
      --out benchmarks/results/micle_vs_simclr.json [--stage1_steps 600] [--override k=v ...]

The paper's protocol (Azizi et al. 2021): the domain stage (SimCLR or MICLe on medical images)
starts from a SimCLR checkpoint. For every seed this script
  1. pretrains SimCLR for --stage1_steps (configs/simclr.py:demo), shared by both arms
     (0 = both arms start from random weights);
  2. continues from that checkpoint with SimCLR and with MICLe (configs/{simclr,micle}.py:demo:
     identical model, optimiser, augmentations and number of steps; only the positive pairs
     differ, and each arm starts a fresh optimiser);
  3. trains a linear classifier on each frozen backbone (configs/linear_eval.py:demo), and on
     the stage-1 checkpoint and on random weights as references, evaluating on validation,
     test and test_shifted.
Prints a Markdown table (mean +- std over seeds) and per-seed rows, and saves JSON. Runs already
finished in --workdir are reused, so an interrupted benchmark continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "configs"))
# No fake devices: on a CPU host these scripts run on one device. Eight fake devices on 2 cores
# made a DINO demo pretraining 3.5x slower (546 s vs 158 s) for the same computation up to
# rounding (BatchNorm statistics and negatives are global; over 600 steps the rounding still
# moves the final top-1 by a few images); set XLA_FLAGS to choose another count.

METHODS = ("simclr", "micle")  # compared arms
REFERENCES = ("random", "stage1")  # context rows (linear eval only)


def _set(c, key: str, value: str) -> None:
    node = c
    *path, last = key.split(".")
    for p in path:
        node = node[p]
    from medssl_jax.config_lib import parse_value

    node[last] = parse_value(node[last], value)  # lists: a,b (as main.py's --config.x=a,b)


_T0 = time.time()


def _run(config, workdir: str) -> dict:
    """One stage (reused when its results exist), with a progress line: these scripts log at
    WARNING, so this is what shows they are alive."""
    from medssl_jax import train
    from medssl_jax.results import check_finished, finished

    path = os.path.join(workdir, "results.json")
    if finished(workdir):  # an interrupted stage is rerun (it resumes from its checkpoint)
        with open(path) as f:
            return json.load(f)
    steps = config.get("num_steps", -1)
    print(f"[{time.time() - _T0:7.0f} s] {config.method} ({steps} steps) -> {workdir}", flush=True)
    t = time.time()
    res = train.train_and_evaluate(config, workdir)
    check_finished(res, workdir)  # preempted: stop the benchmark, rerun to resume
    print(f"[{time.time() - _T0:7.0f} s]   done in {time.time() - t:.0f} s", flush=True)
    return res


def _table(rows: list[dict], names: list[str], n_seeds: int) -> tuple[str, dict]:
    import numpy as np

    metrics = [k for k in rows[0] if "/" in k]
    summary = {}
    lines = ["| model | " + " | ".join(metrics) + " |", "|---|" + "---:|" * len(metrics)]
    for name in names:
        vals = {k: [r[k] for r in rows if r["method"] == name] for k in metrics}
        if not vals[metrics[0]]:
            continue
        summary[name] = {k: (float(np.mean(v)), float(np.std(v))) for k, v in vals.items()}
        mean_std = [summary[name][k] for k in metrics]
        cells = " | ".join(f"{m:.3f} ± {s:.3f}" for m, s in mean_std)
        lines.append(f"| {name} (n={n_seeds}) | {cells} |")
    return "\n".join(lines), summary


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--workdir", default="runs/micle_vs_simclr")
    p.add_argument("--out", default="")
    p.add_argument("--stage1_steps", type=int, default=600, help="shared SimCLR stage (0: none)")
    p.add_argument("--override", nargs="*", default=[], help="pretraining config key=value")
    p.add_argument("--eval_override", nargs="*", default=[], help="linear-eval key=value")
    p.add_argument("--data_dir", default="")
    args = p.parse_args(argv)
    if args.stage1_steps < 0:
        p.error(f"--stage1_steps must be >= 0, got {args.stage1_steps}")
    from absl import logging

    logging.set_verbosity(logging.WARNING)
    import jax
    import linear_eval
    import micle
    import simclr

    def pretrain_config(module, seed: int):
        c = module.get_config("demo")
        c.seed = seed
        c.data.data_dir = args.data_dir
        for kv in args.override:
            _set(c, *kv.split("=", 1))
        return c

    def linear(seed: int, init_dir: str, name: str, workdir: str) -> dict:
        e = linear_eval.get_config("demo")
        e.seed = seed
        e.data.data_dir = args.data_dir
        e.init_checkpoint, e.init_name = init_dir, name
        for kv in args.eval_override:
            _set(e, *kv.split("=", 1))
        splits = _run(e, workdir)["splits"]
        # Sorted: a run reloaded from results.json lists its splits in another order.
        return {
            **{f"{s}/top1": splits[s]["top1"] for s in sorted(splits)},
            **{f"{s}/auc_mean": splits[s]["auc_mean"] for s in sorted(splits)},
        }

    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    for seed in seeds:
        stage1_dir = ""
        ref_inits = {"random": ""}
        if args.stage1_steps:
            c = pretrain_config(simclr, seed)
            c.num_steps = args.stage1_steps
            stage1_dir = os.path.join(args.workdir, f"stage1_simclr_seed{seed}")
            _run(c, stage1_dir)
            ref_inits["stage1"] = stage1_dir
        for name, init_dir in ref_inits.items():
            lin_dir = os.path.join(args.workdir, f"{name}_seed{seed}_linear")
            res = linear(seed, init_dir, name, lin_dir)
            rows.append({"method": name, "seed": seed, **res})
            print(json.dumps(rows[-1]), flush=True)
        for method, module in (("simclr", simclr), ("micle", micle)):
            c = pretrain_config(module, seed)
            c.init_checkpoint = stage1_dir
            pre_dir = os.path.join(args.workdir, f"{method}_seed{seed}")
            pre = _run(c, pre_dir)
            res = linear(seed, pre_dir, method, f"{pre_dir}_linear")
            rows.append(
                {
                    "method": method,
                    "seed": seed,
                    "stage1_steps": args.stage1_steps,
                    "steps": pre["step"],
                    "contrastive_acc": pre["final_metrics"].get("contrastive_acc"),
                    **res,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    table, summary = _table(rows, [*REFERENCES, *METHODS], len(seeds))

    def top1(method: str, seed: int) -> float:
        return next(r for r in rows if r["method"] == method and r["seed"] == seed)["test/top1"]

    wins = sum(top1("micle", s) > top1("simclr", s) for s in seeds)
    print(table)
    print(f"MICLe beats SimCLR on test top-1 in {wins}/{len(seeds)} seeds")
    result = {
        "rows": rows,
        "summary": summary,
        "table": table,
        "micle_wins": wins,
        "seeds": seeds,
        "stage1_steps": args.stage1_steps,
        "overrides": args.override,
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
