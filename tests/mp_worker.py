"""One process of a local multi-process JAX run (gloo collectives over localhost).

Usage: python tests/mp_worker.py PROCESS_ID NUM_PROCESSES DEVICES_PER_PROCESS PORT OUT_JSON
Runs a few pretraining steps of a tiny model on fixed synthetic global batches; every process
feeds only its own rows, exactly as the input pipeline does on a pod.
"""

import json
import os
import sys

pid, nproc, ndev, port, out = sys.argv[1:6]
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={ndev}"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

jax.config.update("jax_platforms", "cpu")
jax.config.update("jax_cpu_collectives_implementation", "gloo")
if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
if int(nproc) > 1:
    jax.distributed.initialize(
        coordinator_address=f"localhost:{port}", num_processes=int(nproc), process_id=int(pid)
    )

from medssl_jax import pretrain, sharding  # noqa: E402
from tests.utils import synthetic_pretrain_batch, tiny_pretrain_config  # noqa: E402

config = tiny_pretrain_config()
mesh = sharding.make_mesh()
assert mesh.devices.size == 8, mesh
built = pretrain.build(
    config, mesh, num_classes=5, label_kind="multiclass", total_steps=10, warmup_steps=1
)
state = built.init(jax.random.key(0))
per_proc = config.batch_size // jax.process_count()
lo, hi = jax.process_index() * per_proc, (jax.process_index() + 1) * per_proc
losses = []
for s in range(3):
    full = synthetic_pretrain_batch(100 + s, config.batch_size, 32, 5)
    local = {k: v[lo:hi] for k, v in full.items()}
    state, m = built.step(state, sharding.to_global(local, mesh))
    losses.append({k: float(v) for k, v in jax.device_get(m).items()})
kernel = jax.tree.leaves(state.params["backbone"])[0]
checksum = float(jax.device_get(kernel).astype("float64").sum())
if jax.process_index() == 0:
    with open(out, "w") as f:
        json.dump({"metrics": losses, "checksum": checksum}, f)
