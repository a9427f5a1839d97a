"""What is live at a compiled step's memory peak, by pass and network stage, from an XLA dump.

  XLA_FLAGS="--xla_dump_to=/tmp/xdump --xla_dump_hlo_module_re=.*step.*" \
      python -m medssl_jax.aot --config=configs/micle.py:r152_3x_sk1 --topology=v4-32 \
      --config.model.remat=True --config.sharding.fsdp=True --batch_size=256
  python benchmarks/hbm_peak.py /tmp/xdump [--top 20]

Reads the `*after_optimizations-live-range.txt` XLA writes for a program it compiled (libtpu
included; a program the compiler refuses writes none, so compile a smaller batch), takes its
'Stack trace breakdown for peak usage' and sums the buffers live at the peak by (forward /
backward / other, stem or groupN of the ResNet). Tells whether a peak is the kept activations,
the backward's working set or buffers the scheduler keeps alive longer than the math needs.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re

_TOP = re.compile(r"^      [├└]── (.*?) \(([\d.]+)%, total: ([\d ]+) bytes")


def peak_breakdown(text: str) -> tuple[int, dict[tuple[str, str], tuple[int, int]]]:
    """(peak bytes, {(pass, stage): (bytes, buffers)}) from a live-range dump's text."""
    head = re.search(r"Stack trace breakdown for peak usage: ([\d ]+) bytes", text)
    if head is None:
        raise ValueError("no 'Stack trace breakdown for peak usage' section in the dump")
    peak = int(head.group(1).replace(" ", ""))
    sums: dict[tuple[str, str], list[int]] = collections.defaultdict(lambda: [0, 0])
    for line in text[head.end() :].splitlines():
        m = _TOP.match(line)
        if not m:
            continue
        name, size = m.group(1), int(m.group(3).replace(" ", ""))
        kind = "backward" if "transpose(" in name else "forward" if "jvp(" in name else "other"
        stage = re.search(r"\b(stem|group\d)", name)
        where = stage.group(1) if stage else re.sub(r"[\d.]+", "", name.split("/")[0])[:40]
        sums[kind, where][0] += size
        sums[kind, where][1] += 1
    return peak, {k: (v[0], v[1]) for k, v in sums.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("dump_dir")
    p.add_argument("--top", type=int, default=20)
    args = p.parse_args()
    files = sorted(glob.glob(os.path.join(args.dump_dir, "*after_optimizations-live-range.txt")))
    if not files:
        raise SystemExit(f"{args.dump_dir}: no *after_optimizations-live-range.txt (see --help)")
    for path in files:
        with open(path) as f:
            peak, sums = peak_breakdown(f.read())
        print(f"{os.path.basename(path)}: peak {peak / 2**30:.2f} GiB")
        for (kind, where), (size, n) in sorted(sums.items(), key=lambda kv: -kv[1][0])[: args.top]:
            print(f"  {size / 2**30:7.2f} GiB  {n:5d} buffers  {kind:8s} {where}")


if __name__ == "__main__":
    main()
