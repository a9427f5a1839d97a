"""The training benchmark's console table: one row per sweep entry (bench_train.py)."""

from __future__ import annotations

from typing import Any


def print_table(results: list[dict[str, Any]]) -> None:
    """One row per sweep entry."""
    cols = [
        ("method", lambda r: r.get("label", r.get("method", "?"))),
        ("variant", lambda r: r["variant"]),
        ("px", lambda r: str(r["image_size"])),
        ("batch", lambda r: str(r["batch_size"])),
        ("dtype", lambda r: r["dtype"]),
        ("1x1", lambda r: "dot" if r.get("conv1x1_as_dot") else "conv"),
        ("dev", lambda r: str(r["num_devices"])),
        ("params", lambda r: f"{r['params'] / 1e6:.2f}M"),
        ("compile s", lambda r: f"{r['compile_total_s']:.1f}"),
        ("step s", lambda r: f"{r['step_s_median']:.3f}"),
        ("img/s", lambda r: f"{r['images_per_s']:.1f}"),
        ("img/s/dev", lambda r: f"{r['images_per_s_per_device']:.1f}"),
        ("MFU", lambda r: f"{100 * r['mfu']:.1f}%"),
        ("peak MiB", lambda r: f"{r['peak_memory_bytes'] / 2**20:.0f}"),
        (
            "pipe img/s",
            lambda r: f"{r['pipeline_images_per_s']:.0f}" if "pipeline_images_per_s" in r else "-",
        ),
        (
            "pipe/train",
            lambda r: (
                f"{r['pipeline_to_train_ratio']:.2f}" if "pipeline_to_train_ratio" in r else "-"
            ),
        ),
    ]
    rows = [[name for name, _ in cols]] + [[f(r) for _, f in cols] for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(cols))]
    for j, row in enumerate(rows):
        print(
            "  ".join(
                v.rjust(w) if i else v.ljust(w)
                for i, (v, w) in enumerate(zip(row, widths, strict=True))
            )
        )
        if j == 0:
            print("  ".join("-" * w for w in widths))
    if results:
        crops = sorted({r.get("images_per_example", 2) for r in results})
        what = "/".join(str(c) for c in crops)
        print(f"(images = {what} crops x batch; peak memory: {results[0]['peak_memory_source']})")
