"""The report of one ahead-of-time plan (`medssl_jax.aot`) and the `--all` table: each
(config, slice) compiled in its own process with a time limit, rows written as they finish
and kept on resume, Markdown with a 'not computed' row for every pair not done yet."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from typing import Any

from medssl_jax.aot import CHIPS, GIB, parse_oom, parse_topology


def _gib(b: float) -> str:
    return f"{b / GIB:.2f} GiB" if b >= GIB / 10 else f"{b / 2**20:.1f} MiB"


def _needed(row: dict[str, Any]) -> tuple[float | None, float | None, str]:
    """(needed, usable, what) HBM bytes of a row the compiler refused; rows written before the
    'temporaries' form was parsed are read again from their stored message."""
    used, usable = row.get("hbm_used_bytes"), row.get("hbm_usable_bytes_compiler")
    what = row.get("hbm_needed_what", "total")
    oom = parse_oom(row.get("compile_error", "")) if used is None else None
    if oom and not math.isnan(oom["used"]):
        used, usable, what = oom["used"], oom["usable"], oom["what"]
    return used, usable, what


def format_report(row: dict[str, Any]) -> str:
    if row.get("error"):
        return f"{row.get('config', '')} on {row.get('slice', '')}: ERROR {row['error']}"
    cap = row["hbm_capacity_bytes"]
    verdict = "FITS" if row["fits"] else "DOES NOT FIT"
    head = (
        f"{row.get('config', row['variant'])} ({row['method']}, {row['variant']}, "
        f"{row['params'] / 1e6:.1f}M params, {row['dtype']}) on {row['slice']} "
        f"({row['topology']}, {row['chips']} chips)\n"
        f"  batch {row['batch_size']} ({row['batch_per_chip']}/chip) x "
        f"{row['images_per_example']} views at {row['image_size']} px"
    )
    if row.get("compile_error"):
        used, usable, what = _needed(row)
        what = " (temporaries alone)" if what == "temporaries" else ""
        lines = [
            head,
            f"  lowered in {row['lower_seconds']} s; XLA:TPU refused it after "
            f"{row['compile_seconds']} s: out of HBM",
            f"  HBM per chip: {_gib(used) if used else '?'} needed{what}, "
            f"{_gib(usable) if usable else '?'} usable of {_gib(cap)} -> {verdict}",
        ]
        if row.get("flops_per_step"):
            lines.append(f"  FLOPs per step: {row['flops_per_step']:.3e} (lowered HLO)")
        return "\n".join(lines)
    lines = [
        head,
        f"  lowered in {row['lower_seconds']} s, compiled in {row['compile_seconds']} s",
        "  HBM per chip: arguments "
        f"{_gib(row['hbm_argument_bytes'])} + outputs {_gib(row['hbm_output_bytes'])} - aliased "
        f"{_gib(row['hbm_alias_bytes'])} + temporaries {_gib(row['hbm_temp_bytes'])} + code "
        f"{_gib(row['hbm_code_bytes'])}",
        f"    = {_gib(row['hbm_used_bytes'])} of {_gib(cap)} "
        f"({100 * row['hbm_used_fraction']:.0f}%) -> {verdict}",
        f"  FLOPs per step: {row['flops_per_step']:.3e} ({row['flops_per_chip']:.3e} per chip); "
        f"HBM traffic {row['hbm_bytes_accessed_per_chip'] / 1e9:.1f} GB per chip",
        f"  step time >= {1e3 * row['roofline_seconds']:.1f} ms (roofline, "
        f"{row['roofline_bound']}-bound): {row['roofline_examples_per_second']:.0f} examples/s, "
        f"MFU <= {100 * row['roofline_mfu']:.0f}%",
    ]
    if row.get("xla_estimate_seconds"):
        lines.append(
            f"  step time ~ {1e3 * row['xla_estimate_seconds']:.1f} ms (XLA TPU cost model): "
            f"{row['xla_examples_per_second']:.0f} examples/s, MFU ~ {100 * row['xla_mfu']:.0f}%"
        )
    return "\n".join(lines)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| config | slice (chips) | batch/chip | HBM per chip (of capacity) | fits | "
        "FLOPs/step | roofline step, MFU | XLA estimate step, MFU | compile |\n"
        "|---|---|---|---|---|---|---|---|---|"
    )
    out = [head]
    for r in rows:
        name = r.get("config", r.get("variant", "?")).replace("configs/", "")
        name = name.replace(" --config.model.remat=True", " + remat")
        name = name.replace(" --config.sharding.fsdp=True", " + fsdp")
        name = name.replace(" --config.sharding.low_memory_schedule=True", " + low-memory schedule")
        where = f"{r.get('slice', '?')} ({r.get('chips', '?')})"
        if r.get("error"):
            err = " ".join(str(r["error"]).split())[:120].replace("|", "/")
            err = err if err.startswith("not computed") else f"not computed: {err}"
            out.append(f"| {name} | {where} | | {err} | | | | | |")
            continue
        if r.get("compile_error"):
            used, _, what = _needed(r)
            what = " of temporaries" if what == "temporaries" else ""
            flops = f"{r['flops_per_step']:.2e}" if r.get("flops_per_step") else "-"
            out.append(
                f"| {name} | {where} | {r['batch_per_chip']} | "
                f"{f'{used / GIB:.1f} GiB' if used else '?'}{what} needed (compiler: out of HBM, "
                f"{r['hbm_capacity_bytes'] / GIB:.0f} GiB chip) | **no** | {flops} | - | - | "
                f"{r['compile_seconds']:.0f} s |"
            )
            continue
        xla = (
            f"{1e3 * r['xla_estimate_seconds']:.0f} ms, {100 * r['xla_mfu']:.0f}%"
            if r.get("xla_estimate_seconds")
            else "-"
        )
        out.append(
            f"| {name} | {where} | {r['batch_per_chip']} | {r['hbm_used_bytes'] / GIB:.1f} GiB "
            f"({100 * r['hbm_used_fraction']:.0f}% of {r['hbm_capacity_bytes'] / GIB:.0f}) | "
            f"{'yes' if r['fits'] else '**no**'} | {r['flops_per_step']:.2e} | "
            f"{1e3 * r['roofline_seconds']:.0f} ms, {100 * r['roofline_mfu']:.0f}% | {xla} | "
            f"{r['compile_seconds']:.0f} s |"
        )
    return "\n".join(out)


def _run_row(cfg: str, sl: str, tmp: str, timeout_s: float, extra_args: list[str]) -> dict:
    """One (config, slice) in its own process; a failure, crash or time-out becomes the row."""
    if os.path.exists(tmp):
        os.remove(tmp)
    path, *overrides = cfg.split()  # 'configs/x.py:variant --config.model.remat=True ...'
    cmd = [sys.executable, "-m", "medssl_jax.aot", f"--config={path}", f"--topology={sl}"]
    cmd += [f"--json={tmp}", *overrides, *extra_args]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    except subprocess.TimeoutExpired:
        proc, tail = None, [f"compile did not finish within {timeout_s:.0f} s"]
    if proc is not None and os.path.exists(tmp):
        with open(tmp) as f:
            row = json.load(f)
        os.remove(tmp)
    else:
        topo = parse_topology(sl)
        row = {"slice": sl, "topology": topo.name, "chips": topo.num_chips}
        row["error"] = " ".join(tail) or f"exit status {proc.returncode}"
    row["config"] = cfg
    row["wall_seconds"] = round(time.perf_counter() - t0, 1)
    return row


def run_all(
    configs: list[str],
    slices: list[str],
    out_path: str,
    *,
    timeout_s: float,
    extra_args: list[str] = (),
    parallel: int = 1,
    resume: bool = True,
) -> list[dict[str, Any]]:
    """Every config x slice, each in its own process (`parallel` at a time, with a time limit).
    Rows are written to `out_path` as they finish; with `resume`, rows already there without an
    error are kept and not recompiled (an interrupted run continues). Rows of other pairs in
    `out_path` (an earlier run over more configs or slices) are kept too."""
    from concurrent.futures import ThreadPoolExecutor

    tasks = [(c, s) for c in configs for s in slices]
    done: dict[tuple[str, str], dict[str, Any]] = {}
    others: list[dict[str, Any]] = []  # rows of pairs this run does not compute: kept as they are
    if os.path.exists(out_path):
        with open(out_path) as f:
            for r in json.load(f).get("rows", []):
                key = (r.get("config"), r.get("slice"))
                if key not in tasks:
                    others.append(r)
                elif resume and not r.get("error"):
                    done[key] = r
    results: dict[tuple[str, str], dict[str, Any]] = {t: done[t] for t in tasks if t in done}

    def rows_in_order() -> list[dict[str, Any]]:
        return others + [results[t] for t in tasks if t in results]

    todo = [t for t in tasks if t not in results]
    with ThreadPoolExecutor(max(parallel, 1)) as pool:
        futures = {
            pool.submit(_run_row, c, s, f"{out_path}.{i}.row.json", timeout_s, list(extra_args)): (
                c,
                s,
            )
            for i, (c, s) in enumerate(todo)
        }
        from concurrent.futures import as_completed

        for fut in as_completed(futures):
            row = fut.result()
            results[futures[fut]] = row
            print(format_report(row), flush=True)
            _write(out_path, rows_in_order())
    rows = rows_in_order()
    _write(out_path, rows)
    return rows


def with_missing(rows: list[dict], configs: list[str], slices: list[str]) -> list[dict]:
    """`rows` in config x slice order, with a 'not computed' row for each pair they lack."""
    have = {(r.get("config"), r.get("slice")): r for r in rows}
    out = []
    for c in configs:
        for s in slices:
            topo = parse_topology(s)
            missing = {"config": c, "slice": s, "chips": topo.num_chips}
            missing["error"] = "not computed (no finished compile in the JSON yet)"
            out.append(have.get((c, s), missing))
    return out


def _write(path: str, rows: list[dict[str, Any]]) -> None:
    import jax

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        from importlib.metadata import version

        libtpu = version("libtpu")
    except Exception:  # noqa: BLE001 - not installed
        libtpu = None
    doc = {
        "command": "python -m medssl_jax.aot --all",
        "jax": jax.__version__,
        "libtpu": libtpu,
        "chips": {k: dataclasses.asdict(v) for k, v in CHIPS.items()},
        "rows": rows,
    }
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
