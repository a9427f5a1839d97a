"""Command-line parsing shared by main.py and the `python -m medssl_jax.<tool>` entry points:
config mistakes (unknown field or variant, bad value, missing config file) as one line."""

from __future__ import annotations

import re
import sys
from collections.abc import Callable

from absl import flags


def one_line(error: BaseException) -> str:
    """The error's message on one line; a traceback folded into it (ml_collections wraps the
    config file's own error that way) keeps only its last line."""
    text = " ".join(str(error).replace("\\n", " ").split()).strip("'\"")
    head, sep, trace = text.partition("Traceback (most recent call last):")
    if sep:
        last = re.split(r"\b[A-Za-z_]*(?:Error|Exception): ", trace)[-1]
        text = f"{head.strip()} {last.strip()}"
    return text


def config_flags_parser(usage: str) -> Callable[[list[str]], list[str]]:
    """An absl `flags_parser` that also loads --config (ml_collections reads the file only
    when FLAGS.config is first used) and exits with `error: ...` and `usage` on a mistake."""

    def parse(argv: list[str]) -> list[str]:
        try:
            rest = flags.FLAGS(argv)
            if "config" in flags.FLAGS and flags.FLAGS["config"].present:
                flags.FLAGS.config.get("method")  # a missing or broken config file fails here
            return rest
        except (flags.Error, AttributeError, KeyError, TypeError, ValueError, OSError) as e:
            sys.exit(f"error: {one_line(e)}\nUsage: {usage}")

    return parse
