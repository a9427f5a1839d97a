r"""Fine-tuning sweeps: label fractions x seeds x initialisations, then the report.

  python -m medssl_jax.sweep --config=configs/finetune.py:demo --workdir=runs/sweep \
      --fractions=0.1,1.0 --seeds=0,1,2 \
      --init=scratch --init=simclr:runs/simclr_demo --init=micle:runs/micle_demo

Each run goes to WORKDIR/<init>/frac<f>/seed<s>/ and is skipped when its results.json exists,
so an interrupted sweep continues where it stopped (a half-finished run resumes from its
checkpoint). Every init path is checked before the first run starts.
"""

from __future__ import annotations

import copy

from absl import app, flags, logging
from ml_collections import config_flags

from medssl_jax import paths

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Fine-tuning or linear-eval config file.")
flags.DEFINE_string("workdir", None, "Sweep root directory.")
flags.DEFINE_list("fractions", ["0.1", "1.0"], "Label fractions.")
flags.DEFINE_list("seeds", ["0"], "Seeds.")
flags.DEFINE_multi_string("init", ["scratch"], "NAME or NAME:PRETRAIN_WORKDIR ('scratch').")
flags.DEFINE_bool("report", True, "Write the report into WORKDIR when done.")


def parse_inits(specs: list[str]) -> dict[str, str]:
    """{'scratch': '', 'micle': '/runs/micle'}; raises naming a missing checkpoint path."""
    inits = {}
    for spec in specs:
        name, _, path = spec.partition(":")
        if not name:
            raise ValueError(f"--init {spec!r}: expected NAME or NAME:PATH")
        if path and not paths.path(path).exists():
            raise FileNotFoundError(f"--init {spec!r}: {path!r} does not exist")
        if not path and name != "scratch":
            raise ValueError(f"--init {spec!r}: only 'scratch' may omit the checkpoint path")
        inits[name] = path
    return inits


def run_dir(root: str, init: str, fraction: float, seed: int) -> str:
    return str(paths.path(root) / init / f"frac{fraction:g}" / f"seed{seed}")


def run_sweep(config, root: str, fractions, seeds, inits: dict[str, str]) -> list[str]:
    """Runs every missing combination in-process; returns the run directories."""
    from medssl_jax import train

    fractions = [float(f) for f in fractions]
    bad = [f for f in fractions if not 0 < f <= 1]
    if bad:
        raise ValueError(f"--fractions: {bad} not in (0, 1]")
    dirs = []
    combos = [(i, f, int(s)) for i in inits for f in fractions for s in seeds]
    for n, (init, frac, seed) in enumerate(combos, 1):
        d = run_dir(root, init, frac, seed)
        dirs.append(d)
        if (paths.path(d) / "results.json").exists():
            logging.info("[%d/%d] %s done already", n, len(combos), d)
            continue
        c = copy.deepcopy(config)
        c.init_checkpoint, c.init_name = inits[init], init
        c.data.label_fraction, c.seed = frac, seed
        c.name = f"{init}_frac{frac:g}_seed{seed}"
        logging.info("[%d/%d] %s", n, len(combos), c.name)
        train.train_and_evaluate(c, d)
    return dirs


def main(argv):
    del argv
    inits = parse_inits(FLAGS.init)
    run_sweep(FLAGS.config, FLAGS.workdir, FLAGS.fractions, FLAGS.seeds, inits)
    if FLAGS.report:
        from medssl_jax import report

        for p in report.build_report([FLAGS.workdir], FLAGS.workdir):
            print(p)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
