"""Entry point: `python main.py --config=configs/micle.py:demo --workdir=DIR`."""

import os
import socket
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


_USAGE = (
    "python main.py --config=configs/<file>.py[:variants] --workdir=DIR "
    "[--config.<field>=<value> ...]"
)


MULTIHOST_MODES = ("tpu", "slurm")


def _slurm_local_device_ids() -> list[int] | None:
    """GPUs this SLURM task drives: all of its node's with one task per node, else None
    (jax then gives task i of a node its GPU i, which is right with one task per GPU)."""
    per_node = (
        os.environ.get("SLURM_NTASKS_PER_NODE")
        or os.environ.get("SLURM_STEP_TASKS_PER_NODE", "").split("(")[0]
    )
    gpus = os.environ.get("SLURM_GPUS_ON_NODE")
    if per_node == "1" and gpus:
        return list(range(int(gpus)))
    return None


def init_distributed() -> str:
    """Starts jax.distributed when this is one process of many; returns how ('' if not).

    The launchers say so explicitly (big_vision's way): `MEDSSL_MULTIHOST=tpu` (launch/tpu_vm.sh:
    jax's own TPU VM detection) or `=slurm` (launch/slurm_gpu.sbatch: coordinator, process count
    and id from SLURM's variables). `--coordinator_address/--num_processes/--process_id` (or
    JAX_COORDINATOR_ADDRESS) set everything by hand. Must run before anything touches devices.
    """
    import jax

    mode = os.environ.get("MEDSSL_MULTIHOST", "").strip().lower()
    if mode and mode not in MULTIHOST_MODES:
        sys.exit(f"error: MEDSSL_MULTIHOST={mode!r}: expected one of {MULTIHOST_MODES} or unset")
    # CPU collectives across processes (tests, CPU clusters); accelerators ignore it.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    by_hand = FLAGS.num_processes is not None or FLAGS.process_id is not None
    if by_hand and not (FLAGS.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")):
        sys.exit(
            "error: --num_processes/--process_id need --coordinator_address (host:port of "
            "process 0) or JAX_COORDINATOR_ADDRESS; without one each process would train alone"
        )
    if FLAGS.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS"):
        jax.distributed.initialize(
            coordinator_address=FLAGS.coordinator_address,
            num_processes=FLAGS.num_processes,
            process_id=FLAGS.process_id,
        )
        return "flags"
    if mode == "slurm":
        needed = ("SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
        missing = [v for v in (*needed, "SLURM_STEP_NODELIST") if v not in os.environ]
        if missing:
            sys.exit(
                f"error: MEDSSL_MULTIHOST=slurm but {missing} unset: run main.py under srun "
                "(launch/slurm_gpu.sbatch)"
            )
        jax.distributed.initialize(
            local_device_ids=_slurm_local_device_ids(), cluster_detection_method="slurm"
        )
        return "slurm"
    if mode == "tpu":
        jax.distributed.initialize()  # jax reads the TPU VM's worker list and its own index
        return "tpu"
    if int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_PROCID" in os.environ:
        logging.warning(
            "SLURM_NTASKS=%s but MEDSSL_MULTIHOST is unset: this process trains alone. For one "
            "run across the tasks, export MEDSSL_MULTIHOST=slurm (launch/slurm_gpu.sbatch does)",
            os.environ["SLURM_NTASKS"],
        )
    return ""


def main(argv):
    del argv
    from medssl_jax.train import quiet_libraries

    quiet_libraries()
    from medssl_jax import tpu_schedule

    added = tpu_schedule.apply(FLAGS.config)  # before libtpu starts (init_distributed below)
    import jax

    how = init_distributed()
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")  # tf.data only; keep accelerators for JAX
    from medssl_jax import train

    logging.info(
        "JAX %s on %s: process %d of %d (%s), %d local of %d devices (%s)",
        jax.__version__,
        socket.gethostname(),
        jax.process_index(),
        jax.process_count(),
        f"jax.distributed via {how}" if how else "single process",
        jax.local_device_count(),
        jax.device_count(),
        jax.devices()[0].platform,
    )
    if added:
        logging.info("libtpu flags of sharding.low_memory_schedule: %s", " ".join(added))
    try:
        results = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except train.USER_ERRORS as e:  # bad input or a stopped run: say what, not where in the code
        sys.exit(f"error: {e}")
    logging.info("Done: %s", {k: results[k] for k in ("step", "stop_reason") if k in results})
    ckpt = results.get("checkpoint_dir") or results.get("train", {}).get("checkpoint_dir")
    print(f"Checkpoints: {ckpt}\nResults: {FLAGS.workdir}/results.json")


if __name__ == "__main__":
    from medssl_jax import cli

    app.run(main, flags_parser=cli.config_flags_parser(_USAGE))
