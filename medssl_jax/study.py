r"""The transfer study of Truong et al. 2021 in one command: pretrained encoders x {linear
evaluation, fine-tuning, DVME} x label subsets x seeds on one task, then one report whose
tables have a row per initialisation (random, supervised if given, each encoder, DVME) and a
column per label subset.

  python -m medssl_jax.study --task=demo --workdir=runs/study \
      --fractions=0.1,1.0 --seeds=0,1,2 \
      --init=simclr:runs/simclr_demo --init=swav:runs/swav_demo

`--task` is a dataset variant that configs/linear_eval.py, configs/finetune.py and
configs/dvme.py all have (demo, chexpert, derm, pcam, dr); `--override key=value` (lists as
a,b) applies to every protocol's config, e.g. data.manual_dir=/data/x. Each protocol is a sweep
(`medssl_jax.sweep`) in WORKDIR/<protocol>/, resumable run by run; 'scratch' (random weights:
a random frozen backbone for linear evaluation, training from scratch for fine-tuning) is
always included. The report goes to WORKDIR/report.md.
"""

from __future__ import annotations

import importlib
import os
import sys

from absl import app, flags, logging

from medssl_jax import paths

PROTOCOLS = ("linear_eval", "finetune", "dvme")

FLAGS = flags.FLAGS


def _define_flags() -> None:
    """Defined when run as a program only (medssl_jax.sweep defines flags of the same name)."""
    flags.DEFINE_string("task", None, "Dataset variant of the configs (demo, chexpert, ...).")
    flags.DEFINE_string("workdir", None, "Study root directory.")
    flags.DEFINE_list("protocols", list(PROTOCOLS), f"Any of {PROTOCOLS}.")
    flags.DEFINE_list("fractions", ["0.1", "1.0"], "Label subsets (fractions of training cases).")
    flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds.")
    flags.DEFINE_multi_string("init", [], "NAME:PRETRAIN_WORKDIR_OR_CONVERTED_FOLDER (encoders).")
    flags.DEFINE_multi_string("override", [], "key=value for every protocol's config.")
    flags.DEFINE_integer("bootstrap", 1000, "Patient-resampling replicates per CI in the report.")


def protocol_config(protocol: str, task: str, overrides: list[str]):
    """configs/<protocol>.py:<task> with `overrides` (key=value) applied."""
    from medssl_jax.config_lib import ConfigError, parse_value

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, os.path.join(root, "configs"))
    c = importlib.import_module(protocol).get_config(task)
    for kv in overrides:
        key, sep, value = kv.partition("=")
        if not sep:
            raise ConfigError(f"--override {kv!r}: expected key=value")
        node = c
        *path, last = key.split(".")
        for p in path:
            node = node[p]
        if last not in node:
            raise ConfigError(f"--override {kv!r}: config.{key} does not exist")
        node[last] = parse_value(node[last], value)
    return c


def run_study(
    task: str,
    root: str,
    *,
    protocols: list[str],
    fractions: list[str],
    seeds: list[str],
    inits: dict[str, str],
    overrides: list[str],
) -> list[str]:
    """Every protocol's sweep (configs built and checked before the first run)."""
    from medssl_jax import config_lib, sweep

    bad = [p for p in protocols if p not in PROTOCOLS]
    if bad:
        raise ValueError(f"--protocols: {bad} not in {PROTOCOLS}")
    configs = {p: protocol_config(p, task, overrides) for p in protocols}
    for c in configs.values():
        config_lib.normalize_lists(c)
    dirs = []
    for p, c in configs.items():
        arms = dict(inits) if p == "dvme" else {"scratch": "", **inits}
        logging.info("study: %s sweep over %s", p, list(arms))
        dirs += sweep.run_sweep(c, str(paths.path(root) / p), fractions, seeds, arms)
    return dirs


def main(argv):
    del argv
    from medssl_jax import report
    from medssl_jax.sweep import parse_inits
    from medssl_jax.train import quiet_libraries

    quiet_libraries()
    from medssl_jax.pipeline import EXIT_STOPPED
    from medssl_jax.results import StageStopped
    from medssl_jax.train import USER_ERRORS

    try:
        inits = parse_inits(FLAGS.init, FLAGS.seeds)
        inits.pop("scratch", None)
        if not inits:
            raise app.UsageError("give at least one --init=NAME:CHECKPOINT")
        run_study(
            FLAGS.task,
            FLAGS.workdir,
            protocols=FLAGS.protocols,
            fractions=FLAGS.fractions,
            seeds=FLAGS.seeds,
            inits=inits,
            overrides=FLAGS.override,
        )
    except StageStopped as e:
        print(f"stopped: {e}")
        raise SystemExit(EXIT_STOPPED) from None
    except (*USER_ERRORS, ValueError) as e:  # the user's to fix: one line, as main.py
        raise SystemExit(f"error: {e}") from None
    for p in report.build_report([FLAGS.workdir], FLAGS.workdir, bootstrap=FLAGS.bootstrap):
        print(p)


if __name__ == "__main__":
    _define_flags()
    flags.mark_flags_as_required(["task", "workdir"])
    from medssl_jax import cli

    app.run(
        main,
        flags_parser=cli.config_flags_parser(
            "python -m medssl_jax.study --task=TASK --workdir=DIR --init=NAME:RUN ..."
        ),
    )
