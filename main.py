"""Entry point: `python main.py --config=configs/micle.py:demo --workdir=DIR`."""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (optionally :variants).")
flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, results.json.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host runs).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host runs).")
flags.DEFINE_integer("process_id", None, "This process's index (multi-host runs).")
flags.mark_flags_as_required(["config", "workdir"])


def _quiet_libraries() -> None:
    """Orbax logs every checkpoint phase at INFO; keep its warnings (>= 30), drop the chatter."""
    logging.get_absl_handler().addFilter(lambda r: r.levelno >= 30 or "/orbax/" not in r.pathname)


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing, with config mistakes (unknown field, bad value) as one line, not a trace."""
    try:
        return FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
        text = " ".join(str(e).replace("\\n", " ").split()).strip("'\"")
        sys.exit(
            f"error: {text}\nUsage: python main.py --config=configs/<file>.py[:variants] "
            "--workdir=DIR [--config.<field>=<value> ...]"
        )


def main(argv):
    del argv
    _quiet_libraries()
    import jax

    if FLAGS.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS"):
        jax.distributed.initialize(
            coordinator_address=FLAGS.coordinator_address,
            num_processes=FLAGS.num_processes,
            process_id=FLAGS.process_id,
        )
    elif os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("SLURM_NTASKS", "1") != "1":
        jax.distributed.initialize()  # TPU pods and SLURM clusters configure themselves
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")  # tf.data only; keep accelerators for JAX
    from medssl_jax import train

    logging.info(
        "JAX %s: process %d/%d, %d devices",
        jax.__version__,
        jax.process_index(),
        jax.process_count(),
        jax.device_count(),
    )
    try:
        results = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except train.USER_ERRORS as e:  # bad input or a stopped run: say what, not where in the code
        sys.exit(f"error: {e}")
    logging.info("Done: %s", {k: results[k] for k in ("step", "stop_reason") if k in results})
    ckpt = results.get("checkpoint_dir") or results.get("train", {}).get("checkpoint_dir")
    print(f"Checkpoints: {ckpt}\nResults: {FLAGS.workdir}/results.json")


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
