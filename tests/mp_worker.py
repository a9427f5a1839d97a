"""One process of a local multi-process JAX run (gloo collectives over localhost).

Usage: python tests/mp_worker.py PROCESS_ID NUM_PROCESSES DEVICES_PER_PROCESS PORT OUT_PREFIX
For every pretraining method, runs 2 steps of a tiny model on fixed synthetic global batches;
every process feeds only its own rows, exactly as the input pipeline does on a pod. Process 0
writes OUT_PREFIX.json (metrics) and OUT_PREFIX.npz (initial and final state leaves).
"""

import json
import os
import sys

pid, nproc, ndev, port, out = sys.argv[1:6]
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={ndev}"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_platforms", "cpu")
jax.config.update("jax_cpu_collectives_implementation", "gloo")
if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
if int(nproc) > 1:
    jax.distributed.initialize(
        coordinator_address=f"localhost:{port}",
        num_processes=int(nproc),
        process_id=int(pid),
        # 2 processes x 4 fake devices share 2 CPU cores with the rest of the suite: under that
        # load one process can reach shutdown minutes after the other (CI once hit the 300 s).
        shutdown_timeout_seconds=1800,
        heartbeat_timeout_seconds=600,
    )

from medssl_jax import datasets, pretrain, sharding  # noqa: E402
from tests.test_pretrain import METHODS, batches_for, method_config  # noqa: E402

# Every process loads the demo set from one fresh data_dir at once (as main.py does on a pod
# whose hosts share a data_dir): process 0 prepares it while the others wait.
cases = datasets.load(
    "demo",
    split="train",
    data_dir=out + "_tfds",
    process_index=jax.process_index(),
    process_count=jax.process_count(),
)[0]


mesh = sharding.make_mesh()
assert mesh.devices.size == int(nproc) * int(ndev), mesh
results, arrays = {}, {}
for method in METHODS:
    config = method_config(method)
    built = pretrain.build(
        config,
        mesh,
        num_classes=5,
        label_kind="multiclass",
        total_steps=10,
        warmup_steps=1,
        steps_per_epoch=1,
    )
    state = built.init(jax.random.key(0))
    per_proc = config.batch_size // jax.process_count()
    lo, hi = jax.process_index() * per_proc, (jax.process_index() + 1) * per_proc

    def host(tree):
        # Replicated state: every process holds the whole value.
        return {
            jax.tree_util.keystr(p): np.asarray(x.addressable_data(0))
            for p, x in jax.tree_util.tree_leaves_with_path(tree)
        }

    keep = lambda s: {"params": s.params, "batch_stats": s.batch_stats, "extra": s.extra}  # noqa: E731
    for k, v in host(keep(state)).items():
        arrays[f"{method}/init{k}"] = v
    metrics, step = [], None
    for full in batches_for(config):
        local = {k: v[lo:hi] for k, v in full.items() if k in built.abstract_batch}
        batch = sharding.to_global(local, mesh)
        if step is None:  # compile first, then meet: gloo's 30 s set-up never waits on XLA
            step = built.step.lower(state, batch).compile()
            sharding.barrier(f"{method}_compiled")
        state, m = step(state, batch)
        metrics.append({k: float(np.asarray(v.addressable_data(0))) for k, v in m.items()})
    for k, v in host(keep(state)).items():
        arrays[f"{method}/final{k}"] = v
    results[method] = metrics

# Warm start of an FSDP state (parameters split over the processes) from a saved checkpoint:
# every process holds only part of each array, so the merge must gather them first.
from jax.experimental import multihost_utils  # noqa: E402

from medssl_jax import checkpoint  # noqa: E402

config = method_config("simclr")
source = pretrain.build(
    config, mesh, num_classes=5, label_kind="multiclass", total_steps=10, warmup_steps=1
)
src_state = source.init(jax.random.key(7))
ck = checkpoint.Checkpointer(out + "_source", every_steps=1, keep=1, async_save=False)
ck.save(3, src_state, {}, force=True)
ck.manager.wait_until_finished()
config.sharding.fsdp, config.sharding.fsdp_min_size = True, 64
fsdp = pretrain.build(
    config, mesh, num_classes=5, label_kind="multiclass", total_steps=10, warmup_steps=1
)
state = fsdp.init(jax.random.key(0))
split = [x for x in jax.tree.leaves(state.params) if not x.is_fully_addressable]
warm = checkpoint.warm_start(state, out + "_source", ("backbone",))
got, want = multihost_utils.process_allgather(
    (warm.params["backbone"], src_state.params["backbone"]), tiled=True
)
# first_then_others: the others run only after process 0 finished, and raise (not hang, not
# run) when it failed; each process records what happened to it.
flag = out + "_first_done"


def first_or_after():
    if jax.process_index() == 0:
        import time

        time.sleep(1)
        open(flag, "w").close()
        return "first"
    return "after" if os.path.exists(flag) else "too early"


def fail_on_first():
    raise ValueError("disk full")


outcome = [sharding.first_then_others("order check", first_or_after)]
try:
    sharding.first_then_others("fail check", fail_on_first)
    outcome.append("ran")
except (ValueError, RuntimeError) as e:
    outcome.append(f"{type(e).__name__}: {e}")
with open(f"{out}_outcome{jax.process_index()}.json", "w") as f:
    json.dump(outcome, f)
results["all_processes"] = [
    sharding.all_processes(True),
    sharding.all_processes(jax.process_index() == 0),
]
results["demo_cases"] = multihost_utils.process_allgather(np.int64(cases.num_cases)).tolist()
results["fsdp_warm_start"] = {
    "split_leaves": len(split),
    "backbone_equal": all(
        np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True)
    ),
    "same_sharding": all(
        a.sharding == b.sharding
        for a, b in zip(jax.tree.leaves(warm.params), jax.tree.leaves(state.params), strict=True)
    ),
}
if jax.process_index() == 0:
    with open(out + ".json", "w") as f:
        json.dump(results, f)
    np.savez(out + ".npz", **arrays)
if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices("mp_worker_done")  # leave together
