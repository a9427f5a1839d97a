r"""The paper's pipeline in one command: (optionally) released ImageNet weights converted, SimCLR
(or another method) from them, then MICLe from it (and any other arms), then the fine-tuning
sweep (scratch, SimCLR, MICLe x label fractions x seeds),
optionally a linear-eval sweep, then the report (configs/pipeline.py).

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

STAGES = ("pretrain", "arms", "finetune", "report")
EXIT_STOPPED = 75  # EX_TEMPFAIL: a stage was preempted; rerun the same command to resume


def parse_overrides(spec: str, field: str) -> list[tuple[str, str]]:
    """'sampler.distinct_prob=0.5;sampler.epoch_over=images' -> [(key, value), ...] ('' -> [])."""
    from medssl_jax.config_lib import ConfigError

    out = []
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        key, eq, value = part.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"config.{field}: {part!r} is not KEY=VALUE (separate them by ';')")
        out.append((key.strip(), value.strip()))
    return out


def _apply(c: ml_collections.ConfigDict, overrides: list[tuple[str, str]], field: str) -> None:
    from medssl_jax import config_lib

    for key, value in overrides:
        config_lib.set_field(c, key, value, where=f"config.{field}: ")


def stage_dir(root, name: str, seed: int | str | None) -> str:
    """WORKDIR/<stage>, or WORKDIR/<stage>/seed<s> with one pretraining run per seed."""
    folder = paths.path(root) / name
    return str(folder if seed is None else folder / f"seed{seed}")


def first_stage(config: ml_collections.ConfigDict) -> str:
    """The first stage's folder and init name: its method's label ('simclr', 'swav', ...)."""
    from medssl_jax.pretrain import method_label

    return method_label(config.pretrain)


def convert_weights(config: ml_collections.ConfigDict, root) -> str | None:
    """Stage 0 (config.weights.source set): a released checkpoint converted for the first
    stage's variant into WORKDIR/weights (skipped when its converted.json exists); its path."""
    w = config.get("weights")
    if not w or not w.get("source"):
        return None
    from medssl_jax.convert import __main__ as convert
    from medssl_jax.convert import common

    out = paths.path(root) / "weights"
    if (out / common.INFO_FILE).exists():
        logging.info("pipeline [0/%d] weights: done already (%s)", len(STAGES), out)
        return str(out)
    if out.exists():  # an interrupted write: no converted.json, so nothing uses it yet
        out.rmtree()
    logging.info("pipeline [0/%d] weights: converting %s (%s)", len(STAGES), w.source, w.format)
    converted = convert.convert(
        w.source,
        w.format,
        config.pretrain.model.variant,
        ema=bool(w.get("ema", False)),
        rescale_v1=bool(w.get("rescale_v1", False)),
        checkpoint_key=w.get("checkpoint_key") or None,
        drop_heads=bool(w.get("drop_heads", False)),
    )
    return common.write(converted, str(out))


def _check_weights(config: ml_collections.ConfigDict) -> None:
    w = config.get("weights")
    if not w or not w.get("source"):
        return
    from medssl_jax.config_lib import ConfigError
    from medssl_jax.convert.__main__ import FORMATS

    if not paths.path(w.source).exists():
        raise ConfigError(f"config.weights.source: {w.source!r} does not exist")
    if w.format not in FORMATS:
        raise ConfigError(f"config.weights.format: {w.format!r} not in {sorted(FORMATS)}")
    if config.pretrain.get("init_checkpoint"):
        raise ConfigError(
            "config.weights.source and config.pretrain.init_checkpoint: give one start for the "
            "first stage, not both"
        )


def stage_configs(config: ml_collections.ConfigDict, root: str) -> dict:
    """Every stage's config: the first (config.pretrain, named by its method), one per arm (the
    micle config, its overrides applied, warm-started from the first stage), 'finetune' and,
    with config.probe, 'linear'; the shared data fields applied to each. Raises naming a bad
    field before any stage runs."""
    from medssl_jax import config_lib

    _check_weights(config)  # its conversion runs first; the first stage is checked then
    first = first_stage(config)
    bases = {first: config.pretrain, "finetune": config.finetune}
    if config.get("probe"):
        bases["linear"] = config.linear
    for arm, spec in config.arms.items():
        if arm in (first, "scratch", "finetune", "linear", "report"):
            raise config_lib.ConfigError(f"config.arms: {arm!r} is a reserved stage name")
        c = copy.deepcopy(config.micle)
        _apply(c, parse_overrides(spec, f"arms.{arm}"), f"arms.{arm}")
        bases[arm] = c
    out = {}
    for name, base in bases.items():
        c = copy.deepcopy(base)
        for key, value in config.data.items():
            if value not in ("", None):
                c.data[key] = value
        for key in config_lib.WARM_START_FIELDS:  # later stages load the first stage's weights
            if key in config.pretrain.model:
                c.model[key] = config.pretrain.model[key]
        config_lib.normalize_lists(c)
        if name in config.arms and config.arms_from_pretrain:
            c.init_checkpoint = stage_dir(root, first, None)  # per seed: see run_pipeline
        out[name] = c
    for name, c in out.items():
        if name in config.arms and config.arms_from_pretrain:
            c = copy.deepcopy(c)  # its warm start exists only after the first stage
            c.init_checkpoint = ""
        config_lib.validate(c)  # every stage before the first one runs
    return out


def _done(folder) -> bool:
    from medssl_jax.results import finished

    return finished(folder)  # an interrupted stage's results.json does not count


def run_pipeline(config: ml_collections.ConfigDict, workdir: str) -> str:
    """Runs the missing stages; returns the report's path."""
    from medssl_jax import report, sweep, train
    from medssl_jax.results import check_finished

    root = paths.path(workdir)
    cfgs = stage_configs(config, str(root))
    first = first_stage(config)
    arms = list(config.arms)
    per_seed = bool(config.get("pretrain_per_seed", False))
    seeds = [int(s) for s in config.seeds]
    t0 = time.time()

    def pretrain(i: int, name: str, seed: int | None) -> None:
        folder = stage_dir(root, name, seed)
        what = name if seed is None else f"{name} seed {seed}"
        if _done(folder):
            logging.info("pipeline [%d/%d] %s: done already (%s)", i, len(STAGES), what, folder)
            return
        logging.info("pipeline [%d/%d] %s (%.0f s so far)", i, len(STAGES), what, time.time() - t0)
        c = copy.deepcopy(cfgs[name])
        if seed is not None:
            c.seed = seed
            if name != first and config.arms_from_pretrain:
                c.init_checkpoint = stage_dir(root, first, seed)
        check_finished(train.train_and_evaluate(c, folder), folder)  # preempted: stop here

    weights = convert_weights(config, root)
    if weights:
        cfgs[first].init_checkpoint = weights
    for seed in seeds if per_seed else [None]:
        pretrain(1, first, seed)
        for arm in arms:
            pretrain(2, arm, seed)
    tail = "{seed}" if per_seed else None
    inits = {"scratch": ""}
    inits.update({name: stage_dir(root, name, tail) for name in [first, *arms]})
    sweeps = [("finetune", [str(f) for f in config.fractions])]
    if config.get("probe"):
        sweeps.append(("linear", ["1.0"]))  # frozen features, every label
    for name, fractions in sweeps:
        logging.info(
            "pipeline [3/%d] %s sweep (%.0f s so far)", len(STAGES), name, time.time() - t0
        )
        sweep.run_sweep(cfgs[name], str(root / name), fractions, [str(s) for s in seeds], inits)
    logging.info("pipeline [4/%d] report (%.0f s so far)", len(STAGES), time.time() - t0)
    written = report.build_report(
        [root / name for name, _ in sweeps], root / "report", bootstrap=int(config.bootstrap)
    )
    logging.info("pipeline done in %.0f s; report: %s", time.time() - t0, written[0])
    return str(written[0])


def main(argv):
    del argv
    from medssl_jax import train

    train.quiet_libraries()
    from medssl_jax.results import StageStopped

    try:
        path = run_pipeline(flags.FLAGS.config, flags.FLAGS.workdir)
    except train.USER_ERRORS as e:
        raise SystemExit(f"error: {e}") from None
    except StageStopped as e:
        print(f"stopped: {e}")
        raise SystemExit(EXIT_STOPPED) from None
    print(f"Report: {path}")


if __name__ == "__main__":
    config_flags.DEFINE_config_file("config", None, "configs/pipeline.py[:variant].")
    flags.DEFINE_string("workdir", None, "Pipeline root directory.")
    flags.mark_flags_as_required(["config", "workdir"])
    from medssl_jax import cli

    app.run(
        main,
        flags_parser=cli.config_flags_parser(
            "python -m medssl_jax.pipeline --config=configs/pipeline.py[:variant] --workdir=DIR"
        ),
    )
