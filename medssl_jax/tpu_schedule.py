"""XLA:TPU scheduler settings a config asks for (`sharding.low_memory_schedule`), put into
libtpu's environment (LIBTPU_INIT_ARGS) before libtpu starts: it reads them once per process.

Why: XLA:TPU's latency-hiding scheduler keeps buffers alive past their last use so that
collectives overlap compute. For R152-3x-SK at 448 px on v4-32 that puts later stages'
gradients and activations next to stage 1's backward and the step needs 35 GiB of HBM per
chip; with these settings it needs 28.8 of 32 (`python -m medssl_jax.aot`, README). The price
is less overlap of communication with compute, so it is opt-in, for configs that do not fit.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping
from typing import Any

ENV = "LIBTPU_INIT_ARGS"

# Schedule for memory, not for overlapping collectives with compute. Measured alone and with
# memory-pressure tracking and 32 MiB collective-combiner limits: the same 28.8 GiB; those two
# without it: 33.3 GiB. So this one flag.
LOW_MEMORY_FLAGS = ("--xla_tpu_enable_latency_hiding_scheduler=false",)


def flags_for(config: Any) -> tuple[str, ...]:
    """The libtpu flags `config` asks for (none unless sharding.low_memory_schedule)."""
    section = config.get("sharding") or {}
    return LOW_MEMORY_FLAGS if bool(section.get("low_memory_schedule", False)) else ()


def _name(flag: str) -> str:
    return flag.split("=", 1)[0].lstrip("-")


def merged(args: str, flags: tuple[str, ...]) -> tuple[str, tuple[str, ...]]:
    """(`args` + those of `flags` whose names `args` does not set, the flags added)."""
    have = args.split()
    names = {_name(f) for f in have}
    added = tuple(f for f in flags if _name(f) not in names)
    return " ".join([*have, *added]), added


def apply(config: Any, environ: MutableMapping[str, str] = os.environ) -> tuple[str, ...]:
    """Appends `flags_for(config)` to LIBTPU_INIT_ARGS, except flags the user already set there
    (theirs win). Returns the flags added. Must run before libtpu starts in this process."""
    args, added = merged(environ.get(ENV, ""), flags_for(config))
    if added:
        environ[ENV] = args
    return added
