r"""Fine-tuning sweeps: label fractions x seeds x initialisations, then the report.

  python -m medssl_jax.sweep --config=configs/finetune.py:demo --workdir=runs/sweep \
      --fractions=0.1,1.0 --seeds=0,1,2 \
      --init=scratch --init=simclr:runs/simclr_demo --init=micle:runs/micle_demo

An init path with '{seed}' pairs runs: --init=micle:runs/micle_seed{seed} fine-tunes seed s from
pretraining run runs/micle_seed<s> (several pretraining runs, one per seed).

With a DVME config (configs/dvme.py) the inits are the ENCODERS: each (fraction, seed) runs one
DVME over all of them (init 'dvme(a+b)') and, with --dvme_probes, a linear probe on each
encoder's cached features (DVME with one encoder and no attention; init 'probe(a)'):

  python -m medssl_jax.sweep --config=configs/dvme.py:demo --workdir=runs/study \
      --fractions=0.1,1.0 --seeds=0,1,2 --init=simclr:runs/simclr --init=swav:runs/swav

Each run goes to WORKDIR/<init>/frac<f>/seed<s>/ and is skipped when its results.json exists,
so an interrupted sweep continues where it stopped (a half-finished run resumes from its
checkpoint). Every init path is checked before the first run starts. Several sweeps (linear
eval, fine-tuning, DVME) may share one WORKDIR if their inits' names differ, or be reported
together: python -m medssl_jax.report DIR1 DIR2 ...
"""

from __future__ import annotations

import copy

from absl import app, flags, logging
from ml_collections import config_flags

from medssl_jax import paths

FLAGS = flags.FLAGS


def _define_flags() -> None:
    """Defined when run as a program only, so that other programs (medssl_jax.study) can
    import this module and define flags of the same names."""
    config_flags.DEFINE_config_file("config", None, "Fine-tuning, linear-eval or DVME config.")
    flags.DEFINE_string("workdir", None, "Sweep root directory.")
    flags.DEFINE_list("fractions", ["0.1", "1.0"], "Label fractions.")
    flags.DEFINE_list("seeds", ["0"], "Seeds.")
    flags.DEFINE_multi_string("init", ["scratch"], "NAME or NAME:PRETRAIN_WORKDIR ('scratch').")
    flags.DEFINE_bool("report", True, "Write the report into WORKDIR when done.")
    flags.DEFINE_bool("dvme_probes", True, "DVME config: also a linear probe per encoder.")


def parse_inits(specs: list[str], seeds: list | None = None) -> dict[str, str]:
    """{'scratch': '', 'micle': '/runs/micle'}; raises naming a missing checkpoint path.

    A path may contain '{seed}' (one pretraining run per seed: fine-tuning seed s starts from
    pretraining run s); it must exist for every one of `seeds`.
    """
    from medssl_jax import checkpoint

    inits = {}
    for spec in specs:
        name, _, path = spec.partition(":")
        if not name:
            raise ValueError(f"--init {spec!r}: expected NAME or NAME:PATH")
        for p in sorted({path.replace("{seed}", str(s)) for s in (seeds or [0])} if path else ()):
            try:  # a run folder without a checkpoint fails here, not hours into the sweep
                checkpoint.latest_step(p)
            except FileNotFoundError as e:
                raise FileNotFoundError(f"--init {spec!r}: {e}") from None
        if not path and name != "scratch":
            raise ValueError(f"--init {spec!r}: only 'scratch' may omit the checkpoint path")
        inits[name] = path
    return inits


def run_dir(root: str, init: str, fraction: float, seed: int) -> str:
    return str(paths.path(root) / init / f"frac{fraction:g}" / f"seed{seed}")


def _arms(config, inits: dict[str, str], probes: bool) -> list[tuple[str, dict]]:
    """(init name, config fields) of every arm: one per init, or for a DVME config one DVME
    over every encoder (plus a probe per encoder)."""
    if config.get("method") != "dvme":
        return [(i, {"init_checkpoint": p, "init_name": i}) for i, p in inits.items()]
    encoders = {i: p for i, p in inits.items() if p}
    if not encoders:
        raise ValueError("a DVME sweep needs --init=NAME:CHECKPOINT encoders, not 'scratch'")
    spec = ",".join(f"{i}={p}" for i, p in encoders.items())
    arms = [(f"dvme({'+'.join(encoders)})", {"dvme.encoders": spec, "dvme.attention": True})]
    if probes:
        for i, p in encoders.items():
            arms.append((f"probe({i})", {"dvme.encoders": f"{i}={p}", "dvme.attention": False}))
    return arms


def run_sweep(
    config, root: str, fractions, seeds, inits: dict[str, str], probes: bool = True
) -> list[str]:
    """Runs every missing combination in-process; returns the run directories."""
    from medssl_jax import train
    from medssl_jax.results import check_finished, finished

    fractions = [float(f) for f in fractions]
    bad = [f for f in fractions if not 0 < f <= 1]
    if bad:
        raise ValueError(f"--fractions: {bad} not in (0, 1]")
    dirs = []
    arms = _arms(config, inits, probes)
    combos = [(a, f, int(s)) for a in arms for f in fractions for s in seeds]
    for n, ((init, fields), frac, seed) in enumerate(combos, 1):
        d = run_dir(root, init, frac, seed)
        dirs.append(d)
        if finished(d):  # an interrupted run's results.json does not count: rerun resumes
            logging.info("[%d/%d] %s done already", n, len(combos), d)
            continue
        c = copy.deepcopy(config)
        for key, value in fields.items():
            if isinstance(value, str):
                value = value.replace("{seed}", str(seed))  # pretraining run s -> seed s
            node, *rest = key.split(".")
            if rest:
                c[node][rest[0]] = value
            else:
                c[key] = value
        c.init_name = init
        c.data.label_fraction, c.seed = frac, seed
        c.name = f"{init}_frac{frac:g}_seed{seed}"
        logging.info("[%d/%d] %s", n, len(combos), c.name)
        check_finished(train.train_and_evaluate(c, d), d)  # preempted: no further runs
    return dirs


def main(argv):
    del argv
    from medssl_jax.train import quiet_libraries

    quiet_libraries()
    from medssl_jax.pipeline import EXIT_STOPPED
    from medssl_jax.results import StageStopped
    from medssl_jax.train import USER_ERRORS

    try:
        inits = parse_inits(FLAGS.init, FLAGS.seeds)
        run_sweep(
            FLAGS.config, FLAGS.workdir, FLAGS.fractions, FLAGS.seeds, inits, FLAGS.dvme_probes
        )
    except StageStopped as e:
        print(f"stopped: {e}")
        raise SystemExit(EXIT_STOPPED) from None
    except (*USER_ERRORS, ValueError) as e:  # the user's to fix: one line, as main.py
        raise SystemExit(f"error: {e}") from None
    if FLAGS.report:
        from medssl_jax import report

        for p in report.build_report([FLAGS.workdir], FLAGS.workdir):
            print(p)


if __name__ == "__main__":
    _define_flags()
    flags.mark_flags_as_required(["config", "workdir"])
    from medssl_jax import cli

    app.run(
        main,
        flags_parser=cli.config_flags_parser(
            "python -m medssl_jax.sweep --config=configs/<file>.py[:variants] --workdir=DIR "
            "--init=NAME[:RUN] ..."
        ),
    )
