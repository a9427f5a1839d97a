"""The path library every file the project reads or writes goes through: `etils.epath`.

`epath.Path` speaks local paths and gs:// (also s3://, az://, hf://) through tf.io.gfile (or
fsspec), so a gs:// workdir or data_dir works for every stage. Importing this module also
teaches epath the filesystems that only TensorFlow knows, so far `ram://` (TensorFlow's
in-memory filesystem, which the tests use as an offline non-local workdir): without it,
`epath.Path('ram://x')` raises, and pathlib would write a local folder named `ram:`.

Orbax checkpoints are the one exception: their array bytes go through TensorStore, which
writes local folders or gs:// only (see `checkpoint.orbax_path`).
"""

from __future__ import annotations

import os
import posixpath
import sys
from typing import Any

from etils import epath
from etils.epath import backend as _backend
from etils.epath import gpath as _gpath

__all__ = ["TF_ONLY_SCHEMES", "Path", "PathLike", "TfPath", "is_remote", "path"]

Path = epath.Path
PathLike = epath.PathLike

# Schemes served by tf.io.gfile only; epath maps `ram://a/b` to the parts ('/', _ROOT + 'ram',
# 'a', 'b') so pathlib's joins keep the `//`.
TF_ONLY_SCHEMES = ("ram",)
_ROOT = "__tf_"


def _tf_parts(*parts: Any) -> tuple[Any, ...]:
    full = "/".join(os.fspath(p) for p in parts)
    scheme, sep, rest = full.partition("://")
    if sep and scheme in TF_ONLY_SCHEMES:
        return (f"/{_ROOT}{scheme}/{rest}",)
    return parts


@epath.register_path_cls([f"{s}://" for s in TF_ONLY_SCHEMES])
class TfPath(_gpath.PosixGPath):
    """An epath for a filesystem only tf.io.gfile knows (e.g. `ram://`)."""

    if sys.version_info < (3, 12):  # pathlib builds paths in __new__, later in __init__

        def __new__(cls, *parts: PathLike) -> TfPath:
            return super().__new__(cls, *_tf_parts(*parts))

    else:

        def __init__(self, *parts: PathLike) -> None:
            super().__init__(*_tf_parts(*parts))

    @property
    def _uri_scheme(self) -> str | None:
        parts = self.parts
        if len(parts) >= 2 and parts[0] == "/" and parts[1].startswith(_ROOT):
            return parts[1][len(_ROOT) :]
        return None

    @property
    def _backend(self) -> _backend.Backend:
        if self._uri_scheme is None:
            return _backend.os_backend
        return _backend.tf_backend

    @property
    def _path_str(self) -> str:
        scheme = self._uri_scheme
        if scheme:
            return posixpath.join(f"{scheme}://", *self.parts[2:])
        return posixpath.join(*self.parts) if self.parts else "."


def path(p: PathLike) -> epath.Path:
    """`p` as an epath (local, gs://, ram://, ...)."""
    return epath.Path(p)


def absolute(p: str) -> str:
    """Local paths made absolute; URLs (gs://...) left alone."""
    return p if "://" in p else os.path.abspath(p)


def is_remote(p: PathLike) -> bool:
    """Whether `p` names a non-local filesystem (gs://, ram://, ...)."""
    return "://" in os.fspath(p)
