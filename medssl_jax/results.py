"""results.json: the schema fine-tuning and linear evaluation write, its validation (errors
name the file and the field), and loading every run under some folders (for the report)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any, TypedDict

import numpy as np

from medssl_jax import paths
from medssl_jax.paths import Path  # epath: local, gs://, ...

__all__ = [
    "RESULTS_FILENAME",
    "ResultsError",
    "ResultsJson",
    "Run",
    "load_runs",
    "validate_results",
    "write_results",
]

RESULTS_FILENAME = "results.json"
KINDS = ("finetune", "linear_eval", "pretrain")
LABEL_KINDS = ("multiclass", "multilabel")
SHIFT_PREFIX = "test_"  # splits named test_* (e.g. test_shifted) are compared with "test"


class _ResultsRequired(TypedDict):
    kind: str  # one of KINDS
    name: str  # run name
    dataset: str  # e.g. "derm", "chexpert"
    label_kind: str  # one of LABEL_KINDS
    init: str  # pretraining used: "micle", "simclr", "scratch", "imagenet_simclr", ...
    label_fraction: float  # in (0, 1]
    seed: int
    step: int  # training step the metrics were taken at
    class_names: list[str]
    splits: dict[str, dict[str, float]]  # split -> metric name -> value


class ResultsJson(_ResultsRequired, total=False):
    """Schema of results.json written by fine-tuning / linear evaluation.

    `predictions` maps a split to its prediction CSV (see predictions.write_predictions_csv),
    relative to the results folder. Pretraining runs (kind == "pretrain") may carry other keys
    and are skipped by the report.
    """

    predictions: dict[str, str]


# field -> (accepted types, description) for the error messages.
_FIELDS: dict[str, tuple[tuple[type, ...], str]] = {
    "kind": ((str,), f"one of {KINDS}"),
    "name": ((str,), "run name"),
    "dataset": ((str,), "dataset name"),
    "label_kind": ((str,), f"one of {LABEL_KINDS}"),
    "init": ((str,), "pretraining used, e.g. 'micle'"),
    "label_fraction": ((int, float), "number in (0, 1]"),
    "seed": ((int,), "integer"),
    "step": ((int,), "integer >= 0"),
    "class_names": ((list,), "list of class names"),
    "splits": ((dict,), "object split -> {metric: number}"),
}


class ResultsError(ValueError):
    """A results.json (or a prediction CSV it names) is missing, malformed or inconsistent."""


@dataclasses.dataclass(frozen=True)
class Run:
    """One validated results.json and the folder it lives in."""

    source: Path  # the results.json file
    results: ResultsJson

    @property
    def folder(self) -> Path:
        return self.source.parent

    def metric(self, split: str, name: str) -> float | None:
        value = self.results["splits"].get(split, {}).get(name)
        return None if value is None or not math.isfinite(value) else float(value)


def validate_results(obj: object, source: str | os.PathLike) -> ResultsJson:
    """Check a parsed results.json against ResultsJson; errors name the file and the field."""
    if not isinstance(obj, dict):
        raise ResultsError(f"{source}: top level must be a JSON object, got {type(obj).__name__}")
    kind = obj.get("kind")
    if kind not in KINDS:
        raise ResultsError(f"{source}: field 'kind' must be one of {KINDS}, got {kind!r}")
    if kind == "pretrain":
        return obj  # type: ignore[return-value]
    for field, (types, what) in _FIELDS.items():
        if field not in obj:
            raise ResultsError(f"{source}: missing field '{field}' ({what})")
        value = obj[field]
        if isinstance(value, bool) or not isinstance(value, types):
            raise ResultsError(f"{source}: field '{field}' must be {what}, got {value!r}")
    if obj["label_kind"] not in LABEL_KINDS:
        raise ResultsError(f"{source}: field 'label_kind' must be one of {LABEL_KINDS}")
    if not 0 < obj["label_fraction"] <= 1:
        raise ResultsError(f"{source}: field 'label_fraction' must be in (0, 1]")
    names = obj["class_names"]
    if (
        not names
        or not all(isinstance(c, str) and c for c in names)
        or len(set(names)) != len(names)
    ):
        raise ResultsError(f"{source}: field 'class_names' must be unique non-empty strings")
    if not obj["splits"] and stop_reason(obj) == "completed":  # (a stopped run evaluates none)
        raise ResultsError(f"{source}: field 'splits' is empty")
    for split, values in obj["splits"].items():
        if not isinstance(values, dict):
            raise ResultsError(f"{source}: field 'splits.{split}' must be an object")
        for name, v in values.items():
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise ResultsError(f"{source}: field 'splits.{split}.{name}' must be a number")
    preds = obj.get("predictions", {})
    if not isinstance(preds, dict) or not all(isinstance(v, str) for v in preds.values()):
        raise ResultsError(f"{source}: field 'predictions' must map split -> CSV path")
    for split, rel in preds.items():
        if not (paths.path(source).parent / rel).is_file():
            raise ResultsError(f"{source}: field 'predictions.{split}': file {rel!r} not found")
    return obj  # type: ignore[return-value]


def json_text(obj: Any) -> str:
    """Strict JSON of `obj` (sorted keys, indented): NaN and inf become null, which every JSON
    reader parses (Python's NaN token is not JSON); NumPy values become numbers and lists."""

    def clean(o: Any) -> Any:
        if isinstance(o, np.generic | np.ndarray):
            o = o.tolist()
        if isinstance(o, float):
            return o if math.isfinite(o) else None
        if isinstance(o, Mapping):
            return {k: clean(v) for k, v in o.items()}
        if isinstance(o, list | tuple):
            return [clean(v) for v in o]
        return o

    return json.dumps(clean(obj), indent=2, sort_keys=True, allow_nan=False, default=str) + "\n"


def write_results(folder: str | os.PathLike, results: ResultsJson) -> Path:
    """Validate and write `folder/results.json` (the writer side of the schema)."""
    path = paths.path(folder) / RESULTS_FILENAME
    validate_results(results, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json_text(results), encoding="utf-8")
    tmp.replace(path)  # atomic locally; object stores have no partial objects
    return path


def stop_reason(results: Mapping[str, Any]) -> str:
    """Why a run's training stopped: 'completed', 'preempted' (SIGTERM) or 'stop_after_steps'
    (pretraining keeps it at the top level, fine-tuning under 'train')."""
    return (
        results.get("stop_reason")
        or (results.get("train") or {}).get("stop_reason")
        or ("completed")
    )


def finished(folder: str | os.PathLike) -> bool:
    """Whether the run in `folder` trained to its end: its results.json exists and says
    'completed'. An interrupted run also writes results.json (launchers requeue on
    'preempted'); orchestrators rerun it, which resumes from its checkpoint."""
    path = paths.path(folder) / RESULTS_FILENAME
    if not path.exists():
        return False
    try:
        return stop_reason(json.loads(path.read_text(encoding="utf-8"))) == "completed"
    except json.JSONDecodeError:
        return False


class StageStopped(RuntimeError):
    """A stage of a sweep or pipeline stopped before its end (preempted): later stages must not
    start from it; rerunning the same command resumes it."""


def check_finished(results: Mapping[str, Any], workdir: str | os.PathLike) -> None:
    """Raises StageStopped unless `results` (a stage's return value) ran to completion."""
    reason = stop_reason(results)
    if reason != "completed":
        step = results.get("step", (results.get("train") or {}).get("step", "?"))
        raise StageStopped(
            f"{workdir}: stopped ({reason}) at step {step}; checkpoint saved, rerun the same "
            "command to resume"
        )


def load_runs(dirs: Sequence[str | os.PathLike]) -> tuple[list[Run], list[str]]:
    """Find and validate every results.json under dirs; returns (runs, notes for the report)."""
    files: list[Path] = []
    for d in dirs:
        d = paths.path(d)
        if not d.is_dir():
            raise ResultsError(f"{d}: not a directory")
        found = sorted(
            paths.path(root) / RESULTS_FILENAME
            for root, _, names in d.walk()
            if RESULTS_FILENAME in names
        )
        if not found:
            raise ResultsError(f"{d}: no {RESULTS_FILENAME} found (searched recursively)")
        files.extend(found)
    notes: list[str] = []
    by_key: dict[tuple, Run] = {}
    for f in dict.fromkeys(_canonical(p) for p in files):
        try:
            obj = json.loads(f.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ResultsError(f"{f}: invalid JSON ({e})") from None
        res = validate_results(obj, f)
        if res["kind"] == "pretrain":
            notes.append(f"skipped pretraining run `{f}`")
            continue
        if stop_reason(res) != "completed":
            notes.append(f"skipped `{f}`: its training stopped early ({stop_reason(res)})")
            continue
        run = Run(f, res)
        key = (res["dataset"], res["kind"], res["init"], float(res["label_fraction"]), res["seed"])
        if key in by_key:
            old = by_key[key]
            keep, drop = (run, old) if res["step"] > old.results["step"] else (old, run)
            notes.append(f"duplicate run for {key}: kept `{keep.source}`, ignored `{drop.source}`")
            by_key[key] = keep
        else:
            by_key[key] = run
    runs = list(by_key.values())
    return runs, notes


def _canonical(p: Path) -> Path:
    """One name per file (symlinks and `..` resolved) for local paths; URLs as they are."""
    return p if paths.is_remote(p) else paths.path(os.path.realpath(p))
