"""What every checkpoint converter shares: the target variables of a variant, a complete
one-to-one assignment of source arrays to them, and the Orbax checkpoint it writes.

A converted checkpoint is a folder `OUT/checkpoints/0/state` holding {'params', 'batch_stats'}
in this project's SimCLRModel layout (so `--config.init_checkpoint=OUT` works in every stage
through `checkpoint.load_variables`) plus `OUT/converted.json`: source file, format, variant,
the parts it holds and the input normalisation and max-pool padding the source network used.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

INFO_FILE = "converted.json"
PARTS = ("backbone", "projection_head", "supervised_head", "method_head")


class ConversionError(ValueError):
    """A source checkpoint that does not map onto the requested variant; the message lists
    what did not match (unused source names, unfilled targets, shapes)."""


def flatten(tree: Mapping[str, Any], prefix: str = "", sep: str = "/") -> dict[str, Any]:
    """{'a': {'b': x}} -> {'a/b': x}; a key holding `sep` is an error (names would clash)."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if sep in str(k):
            raise ValueError(f"variable name {prefix}{k!r} contains {sep!r}: cannot name it")
        name = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, name + sep, sep))
        else:
            out[name] = v
    return out


def unflatten(flat: Mapping[str, Any], sep: str = "/") -> dict[str, Any]:
    """{'a/b': x} -> {'a': {'b': x}}."""
    out: dict[str, Any] = {}
    for name, v in flat.items():
        *path, leaf = name.split(sep)
        d = out
        for p in path:
            d = d.setdefault(p, {})
        d[leaf] = v
    return out


def target_shapes(model: Any, image_size: int = 64) -> dict[str, tuple[int, ...]]:
    """'params/backbone/.../kernel' -> shape for every variable of `model` (nothing allocated)."""
    x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), np.float32)
    abstract = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
    return {k: tuple(v.shape) for k, v in flatten(abstract).items()}


class Assignment:
    """Fills target variables from named source arrays, each source used exactly once.

    `put(target, source_name, transform)` records one mapping; `finish()` raises a
    ConversionError listing every unused source array, unfilled target, duplicate and shape
    mismatch at once (not the first only), then returns (params, batch_stats) as NumPy trees.
    """

    def __init__(
        self,
        source: Mapping[str, np.ndarray],
        targets: Mapping[str, tuple[int, ...]],
        *,
        ignore: Callable[[str], bool] = lambda name: False,
        what: str = "source",
    ):
        self.source = dict(source)
        self.targets = dict(targets)
        self.ignored = {n for n in self.source if ignore(n)}
        self.what = what
        self.used: dict[str, str] = {}  # source name -> target
        self.filled: dict[str, np.ndarray] = {}
        self.errors: list[str] = []

    def has(self, source_name: str) -> bool:
        return source_name in self.source

    def put(
        self,
        target: str,
        source_name: str,
        transform: Callable[[np.ndarray], np.ndarray] = lambda a: a,
    ) -> None:
        if source_name not in self.source:
            self.errors.append(f"missing in {self.what}: {source_name!r} (for {target})")
            return
        if source_name in self.used:
            self.errors.append(f"{source_name!r} used twice ({self.used[source_name]}, {target})")
            return
        self.used[source_name] = target
        if target not in self.targets:
            self.errors.append(f"no model variable {target!r} (from {source_name!r})")
            return
        if target in self.filled:
            self.errors.append(f"model variable {target!r} filled twice")
            return
        value = np.asarray(transform(np.asarray(self.source[source_name])), dtype=np.float32)
        if tuple(value.shape) != tuple(self.targets[target]):
            self.errors.append(
                f"{source_name!r} {tuple(value.shape)} -> {target} expects "
                f"{tuple(self.targets[target])}"
            )
            return
        self.filled[target] = value

    def finish(self) -> tuple[dict, dict]:
        unused = sorted(set(self.source) - set(self.used) - self.ignored)
        unfilled = sorted(set(self.targets) - set(self.filled))
        problems = list(self.errors)
        if unused:
            problems.append(f"{len(unused)} {self.what} array(s) not used: {_some(unused)}")
        if unfilled:
            problems.append(f"{len(unfilled)} model variable(s) not filled: {_some(unfilled)}")
        if problems:
            raise ConversionError(
                f"the {self.what} does not match the requested variant:\n  - "
                + "\n  - ".join(problems[:20])
                + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
            )
        tree = unflatten(self.filled)
        return dict(tree.get("params", {})), dict(tree.get("batch_stats", {}))


def _some(names: list[str], n: int = 8) -> str:
    return ", ".join(names[:n]) + (f", ... ({len(names) - n} more)" if len(names) > n else "")


@dataclasses.dataclass
class Converted:
    """The result of a converter: variables in our layout and what describes them."""

    params: dict
    batch_stats: dict
    variant: str
    source: str
    format: str
    input_norm: str = "none"
    torch_maxpool: bool = False
    notes: dict = dataclasses.field(default_factory=dict)

    def parts(self) -> list[str]:
        return [p for p in PARTS if p in self.params]

    def info(self) -> dict:
        return {
            "source": os.path.abspath(self.source) if "://" not in self.source else self.source,
            "format": self.format,
            "variant": self.variant,
            "parts": self.parts(),
            "input_norm": self.input_norm,
            "torch_maxpool": self.torch_maxpool,
            "num_params": int(sum(np.size(x) for x in jax.tree.leaves(self.params))),
            **self.notes,
        }


def write(converted: Converted, out: str) -> str:
    """Write `converted` as an Orbax checkpoint (step 0) plus converted.json under `out`."""
    import orbax.checkpoint as ocp

    from medssl_jax.checkpoint import orbax_path

    root = orbax_path(out)
    if (root / "checkpoints").exists():
        raise FileExistsError(f"{out!r} already holds checkpoints/: choose an empty --out")
    root.mkdir(parents=True, exist_ok=True)
    state = {"params": converted.params, "batch_stats": converted.batch_stats}
    with ocp.CheckpointManager(root / "checkpoints", item_names=("state",)) as mngr:
        mngr.save(0, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
        mngr.wait_until_finished()
    (root / INFO_FILE).write_text(json.dumps(converted.info(), indent=2) + "\n")
    return str(root)


def read_info(path: str) -> dict | None:
    """converted.json of an init checkpoint folder, or None for a run's workdir."""
    from etils import epath

    p = epath.Path(path) / INFO_FILE
    return json.loads(p.read_text()) if p.exists() else None
