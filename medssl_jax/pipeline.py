r"""The paper's pipeline in one command: SimCLR, then MICLe from it, then the fine-tuning sweep
(scratch, SimCLR, MICLe x label fractions x seeds), then the report (configs/pipeline.py).

  python -m medssl_jax.pipeline --config=configs/pipeline.py:demo --workdir=runs/paper_demo

Each stage has its own sub-workdir; a stage whose results exist is skipped, an interrupted
one resumes from its checkpoints, so after a kill the same command continues at the stage it
stopped in. Every stage config is validated before the first stage starts.
"""

from __future__ import annotations

import copy
import time

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from medssl_jax import paths

STAGES = ("simclr", "micle", "finetune", "report")


def stage_configs(config: ml_collections.ConfigDict, root: str) -> dict:
    """The pretraining stages' configs with the shared data fields and the MICLe warm start."""
    from medssl_jax import config_lib

    out = {}
    for name in ("simclr", "micle", "finetune"):
        c = copy.deepcopy(config[name])
        for key, value in config.data.items():
            if value not in ("", None):
                c.data[key] = value
        config_lib.normalize_lists(c)
        out[name] = c
    if config.micle_from_simclr:
        out["micle"].init_checkpoint = str(paths.path(root) / "simclr")
    for name in ("simclr", "finetune"):  # micle's warm start exists only after the simclr stage
        config_lib.validate(out[name])
    return out


def _done(folder) -> bool:
    return (paths.path(folder) / "results.json").exists()


def run_pipeline(config: ml_collections.ConfigDict, workdir: str) -> str:
    """Runs the missing stages; returns the report's path."""
    from medssl_jax import report, sweep, train

    root = paths.path(workdir)
    cfgs = stage_configs(config, str(root))
    t0 = time.time()

    def stage(i: int, name: str) -> None:
        logging.info("pipeline [%d/%d] %s (%.0f s so far)", i, len(STAGES), name, time.time() - t0)

    for i, name in enumerate(("simclr", "micle"), 1):
        folder = root / name
        if _done(folder):
            logging.info("pipeline [%d/%d] %s: done already (%s)", i, len(STAGES), name, folder)
            continue
        stage(i, name)
        train.train_and_evaluate(cfgs[name], str(folder))
    stage(3, "finetune")
    inits = {"scratch": "", "simclr": str(root / "simclr"), "micle": str(root / "micle")}
    sweep.run_sweep(
        cfgs["finetune"],
        str(root / "finetune"),
        [str(f) for f in config.fractions],
        [str(s) for s in config.seeds],
        inits,
    )
    stage(4, "report")
    written = report.build_report(
        [root / "finetune"], root / "report", bootstrap=int(config.bootstrap)
    )
    logging.info("pipeline done in %.0f s; report: %s", time.time() - t0, written[0])
    return str(written[0])


def main(argv):
    del argv
    from medssl_jax import train

    train.quiet_libraries()
    try:
        path = run_pipeline(flags.FLAGS.config, flags.FLAGS.workdir)
    except train.USER_ERRORS as e:
        raise SystemExit(f"error: {e}") from None
    print(f"Report: {path}")


if __name__ == "__main__":
    config_flags.DEFINE_config_file("config", None, "configs/pipeline.py[:variant].")
    flags.DEFINE_string("workdir", None, "Pipeline root directory.")
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
