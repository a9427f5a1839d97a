r"""Will it fit? Ahead-of-time plans of the real pretraining step for TPU slices, on a CPU host.

  pip install -e '.[tpu-aot]'     # libtpu: the TPU compiler, usable with no TPU attached
  python -m medssl_jax.aot --config=configs/micle.py:r152_2x --topology=v4-32
  python -m medssl_jax.aot --config=configs/micle.py:r50_4x --topology=v5e:8x8 \
      --config.batch_size=1024 --json=/tmp/plan.json
  python -m medssl_jax.aot --all        # paper configs x {v4-32, v5e-64, v5p-32}

The step is `pretrain.build(config, mesh)` exactly as training builds it (state replicated,
global batch `config.batch_size` split over the slice's chips on 'data'), lowered from abstract
shapes and compiled by libtpu for a compile-only topology (`jax.experimental.topologies`).
Nothing is allocated and no TPU is needed. The report (per chip):

* HBM: XLA's buffer assignment for one chip: arguments + outputs - aliased (the donated state)
  + temporaries + generated code, against the chip's HBM capacity -> FITS / DOES NOT FIT.
  The runtime keeps a little HBM for itself, so a plan within a few percent of capacity is
  marginal.
* FLOPs and HBM bytes per step: the compiled executable's `cost_analysis()`, which for an SPMD
  program counts one chip's share; the step's total is that x chips. These are the FLOPs of the
  whole compiled step (augmentation on device, forward, backward, the optimiser update that
  every chip does on the replicated state), not an analytic model count.
* Step time, two estimates, no measurement: the roofline max(FLOPs / peak, bytes / HBM
  bandwidth) of the whole step, and XLA's own per-op estimate ('optimal_seconds' of its TPU cost
  model). Both ignore collectives' link time and host input, so they are lower bounds.
  MFU = FLOPs per chip / (estimated step time x peak FLOP/s per chip).

`--all` runs each (config, slice) in a subprocess with a time limit, so a row that fails to
compile, runs out of host memory or times out is reported as such, and writes the rows to
`--json` (default benchmarks/results/aot_plan.json) as it goes, plus a Markdown table.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import time
from typing import Any

from medssl_jax import tpu_schedule

GIB = 1024**3

# Per-chip specifications (one JAX device per chip: v4/v5p in megacore mode).
#   v4:  275 TFLOP/s bf16, 32 GiB HBM2, 1200 GB/s   https://cloud.google.com/tpu/docs/v4
#   v5e: 197 TFLOP/s bf16, 16 GB HBM2, 819 GB/s     https://cloud.google.com/tpu/docs/v5e
#   v5p: 459 TFLOP/s bf16, 95 GB HBM2e, 2765 GB/s   https://cloud.google.com/tpu/docs/v5p
# (v5e/v5p list "GB"; the devices report 16 GiB and 95 GiB of HBM.)


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    hbm_bytes: int
    peak_flops: float  # bf16 FLOP/s
    hbm_bandwidth: float  # bytes/s
    chip_config: str  # libtpu chip_config_name: 'megacore' = one device per chip


CHIPS = {
    "v4": Chip("v4", 32 * GIB, 275e12, 1.2e12, "megacore"),
    "v5e": Chip("v5e", 16 * GIB, 197e12, 8.19e11, "default"),
    "v5p": Chip("v5p", 95 * GIB, 459e12, 2.765e12, "megacore"),
}
# libtpu's topology names: the generation is 'v5p' or 'v5' for v5p, 'v5e' for v5e.
_GENERATION_ALIASES = {"v5": "v5p", "v5litepod": "v5e", "v5lite": "v5e"}

# Cloud TPU slice names ('v4-32': 32 TensorCores = 16 chips) -> libtpu topology names.
SLICES = {
    "v4-8": "v4:2x2x1",
    "v4-16": "v4:2x2x2",
    "v4-32": "v4:2x2x4",
    "v4-64": "v4:2x4x4",
    "v5e-4": "v5e:2x2",
    "v5e-16": "v5e:4x4",
    "v5e-64": "v5e:8x8",
    "v5e-256": "v5e:16x16",
    "v5p-8": "v5p:2x2x1",
    "v5p-32": "v5p:2x2x4",
    "v5p-128": "v5p:4x4x4",
}

# The paper's architectures (Azizi et al. 2021, released SimCLR names) at the batch size and
# resolution of the MICLe dermatology recipe (configs/micle.py), on three slices.
PAPER_CONFIGS = (
    "configs/micle.py:r50_1x",
    "configs/micle.py:r50_4x",
    "configs/micle.py:r152_2x",
    "configs/micle.py:r152_3x_sk1",
    # The memory options (`model.remat`, `sharding.fsdp`) for the one that needs them, and with
    # libtpu's scheduler set for memory (`sharding.low_memory_schedule`), which v4-32 needs.
    "configs/micle.py:r152_3x_sk1 --config.model.remat=True --config.sharding.fsdp=True",
    "configs/micle.py:r152_3x_sk1 --config.model.remat=True --config.sharding.fsdp=True "
    "--config.sharding.low_memory_schedule=True",
)
PAPER_SLICES = ("v4-32", "v5e-64", "v5p-32")

# Labels only size the online probe head (a few KiB); the planner reads no data.
_DATASET_LABELS = {
    "ham10000": ("multiclass", 7),
    "demo": ("multiclass", 6),
    "chexpert": ("multilabel", 5),
    "pad_ufes20": ("multiclass", 6),
}


class TopologyUnavailable(RuntimeError):
    """libtpu (the TPU compiler) is not installed or cannot describe the topology."""


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str  # libtpu topology name, e.g. 'v4:2x2x4'
    slice_name: str  # Cloud TPU name, e.g. 'v4-32' (or the topology name)
    chip: Chip
    dims: tuple[int, ...]

    @property
    def num_chips(self) -> int:
        n = 1
        for d in self.dims:
            n *= d
        return n


def parse_topology(name: str) -> Topology:
    """'v4-32' or 'v4:2x2x4' (also 'v5p:2x2x4', 'v5:2x2x4', 'v5e:8x8')."""
    slice_name = name
    if name in SLICES:
        name = SLICES[name]
    m = re.fullmatch(r"([a-z0-9]+):(\d+(?:x\d+)*)", name)
    if not m:
        raise ValueError(
            f"topology {name!r}: expected GEN:AxBxC (e.g. v4:2x2x4, v5e:8x8) or a slice name "
            f"in {sorted(SLICES)}"
        )
    gen = _GENERATION_ALIASES.get(m.group(1), m.group(1))
    if gen not in CHIPS:
        raise ValueError(f"topology {name!r}: generation {gen!r} not in {sorted(CHIPS)}")
    dims = tuple(int(d) for d in m.group(2).split("x"))
    topo_name = f"{gen}:{m.group(2)}"
    if slice_name == name:
        for s, t in SLICES.items():
            if t == topo_name:
                slice_name = s
    return Topology(topo_name, slice_name, CHIPS[gen], dims)


def _quiet_libtpu_env() -> None:
    """A CPU host has no TPU metadata server; these keep libtpu from looking for one (and from
    logging errors about worker host names), and let several processes (pytest-xdist workers,
    `--all`'s rows) load libtpu at once: it guards TPU hardware with /tmp/libtpu_lockfile, and a
    compile-only client touches none. They only matter for the compile-only client."""
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")


_LIBTPU_ARGS_AT_START: list[str] = []  # LIBTPU_INIT_ARGS when this process first used libtpu
_USER_LIBTPU_ARGS = os.environ.get(tpu_schedule.ENV, "")  # the user's own, before any plan


def topology_devices(topo: Topology) -> list[Any]:
    """Compile-only TPU devices (one per chip) of `topo`; TopologyUnavailable without libtpu.

    libtpu reads its flags (LIBTPU_INIT_ARGS, e.g. sharding.low_memory_schedule's) once per
    process, so a later call wanting other flags is an error, not a plan made with the old ones.
    """
    _quiet_libtpu_env()
    args = os.environ.get(tpu_schedule.ENV, "")
    if not _LIBTPU_ARGS_AT_START:
        _LIBTPU_ARGS_AT_START.append(args)
    elif args != _LIBTPU_ARGS_AT_START[0]:
        raise ValueError(
            f"libtpu already started in this process with {tpu_schedule.ENV}="
            f"{_LIBTPU_ARGS_AT_START[0]!r}; this plan needs {args!r}: run it in its own process "
            "(--all runs every row in one)"
        )
    from jax.experimental import topologies

    dims3 = tuple(topo.dims) + (1,) * (3 - len(topo.dims))
    try:
        desc = topologies.get_topology_desc(
            topology_name=topo.name,
            platform="tpu",
            chip_config_name=topo.chip.chip_config,
            chips_per_host_bounds=tuple(min(d, 2) for d in dims3),  # 4 chips per host
            num_slices=1,
            wrap=(False,) * 3,
        )
    except Exception as e:  # RuntimeError without libtpu; JaxRuntimeError for a bad name
        raise TopologyUnavailable(f"{topo.name}: {type(e).__name__}: {e}") from e
    devices = list(desc.devices)
    if len(devices) != topo.num_chips:
        raise TopologyUnavailable(
            f"{topo.name}: libtpu gave {len(devices)} devices for {topo.num_chips} chips"
        )
    return devices


def libtpu_available() -> bool:
    """Whether a compile-only TPU topology can be created here (libtpu installed and working)."""
    try:
        topology_devices(parse_topology("v5e:2x2"))
        return True
    except TopologyUnavailable:
        return False


def dataset_labels(config: Any) -> tuple[str, int]:
    name = str(config.data.name).partition("/")[0]
    return _DATASET_LABELS.get(name, ("multiclass", 2))


def plan(config: Any, topology: str | Topology) -> dict[str, Any]:
    """Compiles the pretraining step of `config` for `topology`; the report as a dict."""
    # The program a TPU runs: 1x1 convs as convolutions and XLA's max-pool gradient (on this
    # CPU host the backend rules of models/resnet.py and models/pooling.py would pick the
    # CPU forms); restored afterwards.
    tpu_forms = {"MEDSSL_CONV1X1": "conv", "MEDSSL_MAXPOOL_GRAD": "xla"}
    before = {k: os.environ.get(k) for k in (*tpu_forms, tpu_schedule.ENV)}  # _plan sets ENV
    os.environ.update(tpu_forms)
    try:
        return _plan(config, topology)
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _plan(config: Any, topology: str | Topology) -> dict[str, Any]:
    import jax

    from medssl_jax import config_lib, methods, pretrain, sharding

    topo = parse_topology(topology) if isinstance(topology, str) else topology
    chip = topo.chip
    config_lib.validate(config)
    batch = int(config.batch_size)
    views = methods.get(config.method).views(config)
    row: dict[str, Any] = {
        "topology": topo.name,
        "slice": topo.slice_name,
        "chip": chip.name,
        "chips": topo.num_chips,
        "method": config.method,
        "multi_instance": bool(config.get("sampler", {}).get("multi_instance", False)),
        "variant": config.model.variant,
        "dtype": config.model.dtype,
        "image_size": int(config.data.image_size),
        "images_per_example": views.images_per_example,
        "batch_size": batch,
        "hbm_capacity_bytes": chip.hbm_bytes,
        "peak_flops_per_chip": chip.peak_flops,
        "hbm_bandwidth_per_chip": chip.hbm_bandwidth,
    }
    if batch % topo.num_chips:
        raise config_lib.ConfigError(
            f"config.batch_size={batch} is not a multiple of the {topo.num_chips} chips of "
            f"{topo.name}"
        )
    row["batch_per_chip"] = batch // topo.num_chips
    # The user's libtpu flags plus this config's (sharding.low_memory_schedule), set before
    # libtpu starts; not those of an earlier plan in this process.
    args, added = tpu_schedule.merged(_USER_LIBTPU_ARGS, tpu_schedule.flags_for(config))
    os.environ[tpu_schedule.ENV] = args
    row["libtpu_flags"] = list(added)
    devices = topology_devices(topo)
    mesh = sharding.make_mesh(devices)
    label_kind, num_classes = dataset_labels(config)
    total = int(config.num_steps) if int(config.get("num_steps", -1)) > 0 else 100_000
    t0 = time.perf_counter()
    built = pretrain.build(
        config,
        mesh,
        num_classes=num_classes,
        label_kind=label_kind,
        total_steps=total,
        warmup_steps=max(total // 100, 1),
    )
    lowered = built.step.lower(built.abstract_state, built.abstract_batch)
    t1 = time.perf_counter()
    row["lower_seconds"] = round(t1 - t0, 1)
    row["params"] = int(sum(x.size for x in jax.tree.leaves(built.abstract_state.params)))
    # A compile-only executable cannot be loaded back from a persistent compilation cache
    # (jax warns and recompiles), so none is written while it compiles.
    min_time = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float("inf"))
    try:
        compiled = lowered.compile()
    except Exception as e:  # noqa: BLE001 - XLA:TPU refuses programs that exceed HBM
        oom = parse_oom(str(e))
        if oom is None:
            raise
        row["compile_seconds"] = round(time.perf_counter() - t1, 1)
        return _oom_row(row, oom, lowered, topo, str(e))
    finally:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", min_time)
    row["compile_seconds"] = round(time.perf_counter() - t1, 1)

    mem = compiled.memory_analysis()
    arg, out = int(mem.argument_size_in_bytes), int(mem.output_size_in_bytes)
    alias, temp = int(mem.alias_size_in_bytes), int(mem.temp_size_in_bytes)
    code = int(mem.generated_code_size_in_bytes)
    used = arg + out - alias + temp + code
    row.update(
        hbm_argument_bytes=arg,
        hbm_output_bytes=out,
        hbm_alias_bytes=alias,
        hbm_temp_bytes=temp,
        hbm_code_bytes=code,
        hbm_used_bytes=used,
        hbm_used_fraction=round(used / chip.hbm_bytes, 4),
        fits=used <= chip.hbm_bytes,
    )
    row["flops_source"] = "compiled executable (per chip)"
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get("flops", 0.0))
    bytes_accessed = float(cost.get("bytes accessed", 0.0))
    t_compute = flops / chip.peak_flops
    t_memory = bytes_accessed / chip.hbm_bandwidth
    roofline = max(t_compute, t_memory)
    xla = float(cost.get("optimal_seconds", 0.0))
    row.update(
        flops_per_chip=flops,
        flops_per_step=flops * topo.num_chips,
        hbm_bytes_accessed_per_chip=bytes_accessed,
        roofline_seconds=roofline,
        roofline_bound="compute" if t_compute >= t_memory else "memory",
        roofline_examples_per_second=batch / roofline if roofline > 0 else None,
        roofline_mfu=t_compute / roofline if roofline > 0 else None,
        xla_estimate_seconds=xla if xla > 0 else None,
        xla_examples_per_second=batch / xla if xla > 0 else None,
        xla_mfu=t_compute / xla if xla > 0 else None,
    )
    return row


_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_oom(message: str) -> dict[str, Any] | None:
    """XLA:TPU's out-of-HBM compile error as {'used', 'usable', 'what'} bytes, else None.

    Two forms: 'Ran out of memory in memory space hbm. Used 20.5G of 15.75G hbm.' (what =
    'total') and 'the total memory required for HLO temporaries (34.98G) exceeds available HBM
    (30.75G)' (what = 'temporaries': a lower bound of the total). XLA's 'G' is 2**30 bytes.
    """
    if "RESOURCE_EXHAUSTED" not in message and "memory" not in message.lower():
        return None
    forms = (
        (r"Used ([\d.]+)([KMGT]?)i?B? of ([\d.]+)([KMGT]?)i?B? hbm", "total"),
        (
            r"required for HLO temporaries \(([\d.]+)([KMGT]?)i?B?\) exceeds available HBM "
            r"\(([\d.]+)([KMGT]?)i?B?\)",
            "temporaries",
        ),
    )
    for pattern, what in forms:
        m = re.search(pattern, message)
        if m:
            return {
                "used": float(m.group(1)) * _UNITS[m.group(2)],
                "usable": float(m.group(3)) * _UNITS[m.group(4)],
                "what": what,
            }
    if "Ran out of memory" in message or "RESOURCE_EXHAUSTED" in message:
        return {"used": float("nan"), "usable": float("nan"), "what": "total"}
    return None


def _oom_row(row: dict, oom: dict, lowered: Any, topo: Topology, message: str) -> dict:
    """DOES NOT FIT: the compiler's own used/usable HBM. There is no executable to ask for
    FLOPs; the lowered program's count is used where the backend gives one (the compile-only
    TPU client of jax 0.10 does not)."""
    used = oom["used"]
    row.update(
        fits=False,
        compile_error=" ".join(message.split())[:600],
        hbm_used_bytes=None if used != used else int(used),
        hbm_usable_bytes_compiler=None if oom["usable"] != oom["usable"] else int(oom["usable"]),
        hbm_used_fraction=None if used != used else round(used / topo.chip.hbm_bytes, 4),
        hbm_needed_what=oom["what"],
    )
    try:
        cost = lowered.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        flops = float(cost.get("flops", 0.0)) if cost else 0.0
        if flops > 0:
            row.update(flops_per_step=flops, flops_per_chip=flops / topo.num_chips)
            row["flops_source"] = "lowered (unpartitioned) HLO"
    except Exception:  # noqa: BLE001 - FLOPs are a bonus on this path
        pass
    return row


def main(argv: list[str]) -> None:
    from absl import flags

    from medssl_jax.aot_table import format_report, markdown_table, run_all, with_missing
    from medssl_jax.config_lib import ConfigError

    FLAGS = flags.FLAGS
    configs = FLAGS.configs or list(PAPER_CONFIGS)
    slices = FLAGS.slices or list(PAPER_SLICES)
    if FLAGS.table:  # the Markdown table of an earlier (possibly interrupted) --all
        path = FLAGS.json or "benchmarks/results/aot_plan.json"
        if not os.path.exists(path):
            raise SystemExit(f"error: --table: {path} not found (give --json=PLAN.json)")
        with open(path) as f:
            print(markdown_table(with_missing(json.load(f)["rows"], configs, slices)))
        return
    if FLAGS.all:
        extra = [a for a in sys.argv[1:] if a.startswith("--config.")]
        if FLAGS.batch_size:
            extra.append(f"--batch_size={FLAGS.batch_size}")
        rows = run_all(
            configs,
            slices,
            FLAGS.json or "benchmarks/results/aot_plan.json",
            timeout_s=FLAGS.timeout,
            extra_args=extra,
            parallel=FLAGS.parallel,
            resume=FLAGS.resume,
        )
        print()
        print(markdown_table(with_missing(rows, configs, slices)))
        return
    if FLAGS.config is None or not FLAGS.topology:
        sys.exit("error: --config and --topology are required (or --all)")
    config = FLAGS.config
    if FLAGS.batch_size:
        config.batch_size = FLAGS.batch_size
    cfg_name = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--config=")), "")
    try:
        row = plan(config, FLAGS.topology)
    except (ConfigError, ValueError, TopologyUnavailable) as e:
        row = {"error": f"{type(e).__name__}: {e}", "slice": FLAGS.topology}
    except Exception as e:  # noqa: BLE001 - a compile failure is a result, reported as one
        row = {"error": f"{type(e).__name__}: {' '.join(str(e).split())[:500]}"}
        row["slice"] = FLAGS.topology
    row["config"] = cfg_name
    print(format_report(row))
    if FLAGS.json:
        os.makedirs(os.path.dirname(os.path.abspath(FLAGS.json)), exist_ok=True)
        with open(FLAGS.json, "w") as f:
            json.dump(row, f, indent=1)
            f.write("\n")
    if row.get("error"):
        sys.exit(2)


def _define_flags() -> None:
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Pretraining config file (:variants).")
    flags.DEFINE_string("topology", None, "Slice (v4-32, v5e-64, v5p-32) or libtpu name v4:2x2x4.")
    flags.DEFINE_integer("batch_size", 0, "Global batch (default: the config's batch_size).")
    flags.DEFINE_string("json", None, "Write the report (or --all's rows) as JSON here.")
    flags.DEFINE_bool("all", False, "Paper configs x slices -> JSON + Markdown table.")
    flags.DEFINE_list("configs", None, "--all: configs (default: the paper's four).")
    flags.DEFINE_list("slices", None, "--all: slices (default: v4-32, v5e-64, v5p-32).")
    flags.DEFINE_float("timeout", 1800.0, "--all: seconds allowed per (config, slice).")
    flags.DEFINE_integer("parallel", 1, "--all: rows compiled at once (each one process).")
    flags.DEFINE_bool("table", False, "Print the Markdown table of --json (an earlier --all).")
    flags.DEFINE_bool("resume", True, "--all: keep rows already in --json that have no error.")


if __name__ == "__main__":
    _quiet_libtpu_env()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import jax

    # The host only traces; the TPU compiler runs through the compile-only topology client.
    jax.config.update("jax_platforms", "cpu")
    from absl import app

    _define_flags()
    from medssl_jax import cli

    app.run(
        main,
        flags_parser=cli.config_flags_parser(
            "python -m medssl_jax.aot --config=configs/<file>.py[:variants] ..."
        ),
    )
