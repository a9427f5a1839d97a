"""A real (tiny) pretraining process for tests/test_faults.py to kill at chosen moments.

  python tests/fault_worker.py WORKDIR TFDS_DATA_DIR [SLOW_RENAME_SECONDS]

Runs `train.train_and_evaluate` on a tiny SimCLR config with ASYNC checkpoints every 2 steps
and prints markers the test waits for: `STEP n` after each dispatched step, `SAVE n` when a
checkpoint save starts, `RENAME` when orbax starts finalising one. A slow-filesystem shim makes
that final rename take SLOW_RENAME_SECONDS, so a kill can land while a save is half done.
"""

import asyncio
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

jax.config.update("jax_platforms", "cpu")
if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

from orbax.checkpoint._src.path import async_path  # noqa: E402

from medssl_jax import checkpoint, pretrain, train  # noqa: E402
from tests.utils import tiny_pretrain_config  # noqa: E402

STEPS = 16


def config(data_dir: str):
    c = tiny_pretrain_config("simclr", num_steps=STEPS, checkpoint_every_steps=2)
    c.async_checkpointing = True
    c.keep_checkpoints = 2
    c.log_every_steps = 4
    c.data.data_dir = data_dir
    return c


def main() -> None:
    workdir, data_dir = sys.argv[1], sys.argv[2]
    slow = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0

    rename = async_path.rename

    async def slow_rename(src, dst):  # the shim: a slow commit of an async save
        print("RENAME", flush=True)
        await asyncio.sleep(slow)
        return await rename(src, dst)

    async_path.rename = slow_rename

    save = checkpoint.Checkpointer.save

    def marked_save(self, step, *a, **kw):
        started = save(self, step, *a, **kw)
        if started:
            print(f"SAVE {step}", flush=True)
        return started

    checkpoint.Checkpointer.save = marked_save

    build = pretrain.build

    def marked_build(*a, **kw):
        built = build(*a, **kw)
        step = built.step

        def marked_step(state, batch):
            out = step(state, batch)
            print(f"STEP {int(out[0].step)}", flush=True)
            return out

        built.step = marked_step
        return built

    pretrain.build = marked_build
    print("STARTED", flush=True)
    t0 = time.time()
    results = train.train_and_evaluate(config(data_dir), workdir)
    print(f"DONE {results['stop_reason']} {results['step']} {time.time() - t0:.1f}", flush=True)


if __name__ == "__main__":
    main()
