"""Read PyTorch `.pth` / `.pth.tar` checkpoints into NumPy arrays without importing torch.

`torch.save` writes either
  * the zip format (torch >= 1.6, the default): `<archive>/data.pkl` is a pickle in which every
    tensor is `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad,
    backward_hooks[, metadata])` and every storage a persistent id
    `('storage', <torch.XStorage class>, key, location, numel)` whose bytes are the record
    `<archive>/data/<key>` (byte order in `<archive>/byteorder`, little when absent); or
  * the legacy format (`_use_new_zipfile_serialization=False`, older releases): five pickles /
    blobs in a row: magic number 0x1950A86A20F9469CFC6C, protocol version 1001, a sys_info
    dict, the object (persistent ids `('storage', type, key, location, numel, view_metadata)`),
    the list of storage keys, then per key an int64 element count and the raw bytes.

Unpickling executes whatever globals a pickle names, so the unpickler here is restricted: its
`find_class` resolves exactly the names a checkpoint of tensors needs (containers, tensor and
parameter rebuild functions, storage types, argparse.Namespace for DINO/SwAV's saved `args`) to
local NumPy-side stand-ins, never to torch, and refuses every other global (`os.system`,
`builtins.eval`, ...) with an error naming it. Strided views become copies via
`as_strided` after a bounds check on the storage (a crafted stride cannot read past it).
The same approach as public torch-free readers (e.g. llama.cpp's lazy unpickler in its
conversion scripts), written for this project.
"""

from __future__ import annotations

import argparse
import collections
import io
import os
import pickle
import zipfile
from collections.abc import Mapping
from typing import Any, BinaryIO

import ml_dtypes
import numpy as np

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001

# torch.<Name>Storage -> NumPy dtype (UntypedStorage holds bytes).
STORAGE_DTYPES: dict[str, np.dtype] = {
    "FloatStorage": np.dtype(np.float32),
    "DoubleStorage": np.dtype(np.float64),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
    "UntypedStorage": np.dtype(np.uint8),
}
# Checkpoint wrappers, in the order they are tried. DINO's full checkpoints hold both 'teacher'
# and 'student': the teacher is the network DINO evaluates and releases, so it comes first.
WRAPPER_KEYS = ("teacher", "state_dict", "model", "student")
PREFIXES = ("module.", "backbone.")  # DDP, then DINO's MultiCropWrapper


class UnsafeCheckpointError(pickle.UnpicklingError, ValueError):
    """The checkpoint's pickle names a global outside the allow-list; nothing was executed.
    A ValueError too, so callers (the convert CLI) report it like any unreadable source."""


class StorageType:
    """Stand-in for a `torch.XStorage` class named in a persistent id."""

    def __init__(self, name: str):
        self.name = name
        self.dtype = STORAGE_DTYPES[name]

    def __repr__(self) -> str:
        return f"torch.{self.name}"


class Storage:
    """A storage of `numel` elements of `dtype`; `data` (1-D array) is filled on first use."""

    def __init__(self, key: str, dtype: np.dtype, numel: int, loader):
        self.key, self.dtype, self.numel = key, dtype, int(numel)
        self._loader = loader
        self._data: np.ndarray | None = None

    @property
    def data(self) -> np.ndarray:
        if self._data is None:
            self._data = self._loader(self)
            if self._data.size < self.numel:
                raise ValueError(
                    f"storage {self.key!r} holds {self._data.size} elements, expected {self.numel}"
                )
        return self._data


class LazyTensor:
    """A tensor view (offset, size, stride in elements) of a storage, materialised later (the
    legacy format stores the bytes after the pickle that references them)."""

    def __init__(self, storage: Storage, offset: int, size, stride):
        if not isinstance(storage, Storage):
            raise pickle.UnpicklingError(
                f"tensor rebuilt from {type(storage).__name__}, not a storage"
            )
        self.storage, self.offset = storage, int(offset)
        self.size = tuple(int(s) for s in size)
        self.stride = tuple(int(s) for s in stride)
        if (
            len(self.size) != len(self.stride)
            or min((*self.size, *self.stride, self.offset, 0)) < 0
        ):
            raise pickle.UnpicklingError(
                f"bad tensor geometry size={self.size} stride={self.stride}"
            )

    def numpy(self) -> np.ndarray:
        data = self.storage.data
        if any(s == 0 for s in self.size):
            return np.zeros(self.size, data.dtype)
        last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride, strict=True))
        if last >= data.size:
            raise ValueError(
                f"tensor (offset {self.offset}, size {self.size}, stride {self.stride}) reads "
                f"past its storage {self.storage.key!r} of {data.size} elements"
            )
        item = data.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(
            data[self.offset :], self.size, [s * item for s in self.stride], writeable=False
        )
        return np.array(view, order="C", copy=True)  # C-contiguous, owns its memory


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, *args):
    """torch._utils._rebuild_tensor_v2 (backward hooks and metadata are dropped)."""
    return LazyTensor(storage, storage_offset, size, stride)


def _rebuild_tensor(storage, storage_offset, size, stride):
    """torch._utils._rebuild_tensor (very old checkpoints)."""
    return LazyTensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *state):
    """torch._utils._rebuild_parameter(_with_state): a Parameter is its data here."""
    return data


ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("argparse", "Namespace"): argparse.Namespace,
    **{("torch", name): StorageType(name) for name in STORAGE_DTYPES},
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler resolving only ALLOWED_GLOBALS; storages come from `load_storage`."""

    def __init__(self, file: BinaryIO, load_storage, what: str):
        super().__init__(file)
        self._load_storage = load_storage
        self._what = what
        self.storages: dict[str, Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafeCheckpointError(
                f"{self._what}: refusing to load global '{module}.{name}': only tensors, "
                "storages and plain containers are allowed in a checkpoint (nothing was run)"
            ) from None

    def persistent_load(self, pid: Any) -> Storage:
        if (
            not isinstance(pid, tuple)
            or len(pid) not in (5, 6)
            or pid[0] not in ("storage", b"storage")
            or not isinstance(pid[1], StorageType)
        ):
            raise pickle.UnpicklingError(f"{self._what}: unsupported persistent id {pid!r:.100}")
        _, stype, key, _location, numel, *view = pid
        if view and view[0] is not None:
            raise pickle.UnpicklingError(f"{self._what}: storage views are not supported")
        key = key.decode() if isinstance(key, bytes) else str(key)
        if key not in self.storages:
            self.storages[key] = Storage(key, stype.dtype, numel, self._load_storage)
        return self.storages[key]


def _frombuffer(raw: bytes, dtype: np.dtype, big_endian: bool) -> np.ndarray:
    """1-D array of `dtype` from raw bytes in the file's byte order."""
    if big_endian and dtype.itemsize > 1:
        swapped = np.frombuffer(raw, f">u{dtype.itemsize}").astype(f"<u{dtype.itemsize}")
        return swapped.view(dtype)
    return np.frombuffer(raw, dtype)


def _materialise(obj: Any) -> Any:
    """Replace every LazyTensor in nested containers by its NumPy array."""
    if isinstance(obj, LazyTensor):
        return obj.numpy()
    if isinstance(obj, dict):
        return type(obj)((k, _materialise(v)) for k, v in obj.items())
    if isinstance(obj, list | tuple):
        return type(obj)(_materialise(v) for v in obj)
    if isinstance(obj, argparse.Namespace):
        return argparse.Namespace(**{k: _materialise(v) for k, v in vars(obj).items()})
    return obj


def _load_zip(path: str) -> Any:
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        pkl = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pkl) != 1:
            raise ValueError(
                f"{path}: a zip without exactly one <archive>/data.pkl: not a torch.save file"
            )
        root = pkl[0].rsplit("/", 1)[0]
        order = f"{root}/byteorder"
        big = order in names and z.read(order).strip() == b"big"

        def load(storage: Storage) -> np.ndarray:
            raw = z.read(f"{root}/data/{storage.key}")
            return _frombuffer(raw, storage.dtype, big)

        unpickler = RestrictedUnpickler(io.BytesIO(z.read(pkl[0])), load, path)
        return _materialise(unpickler.load())


def _load_legacy(path: str) -> Any:
    with open(path, "rb") as f:
        head = RestrictedUnpickler(f, None, path)
        try:
            magic = head.load()
        except UnsafeCheckpointError:
            raise
        except Exception as e:
            raise ValueError(f"{path}: neither a zip nor a legacy torch.save file ({e})") from None
        if magic != LEGACY_MAGIC:
            raise ValueError(f"{path}: neither a zip nor a legacy torch.save file (bad magic)")
        protocol = RestrictedUnpickler(f, None, path).load()
        if protocol != LEGACY_PROTOCOL:
            raise ValueError(f"{path}: unsupported legacy protocol version {protocol!r}")
        sys_info = RestrictedUnpickler(f, None, path).load()
        big = isinstance(sys_info, Mapping) and sys_info.get("little_endian") is False
        blobs: dict[str, np.ndarray] = {}
        unpickler = RestrictedUnpickler(f, lambda s: blobs[s.key], path)
        obj = unpickler.load()
        keys = RestrictedUnpickler(f, None, path).load()
        for key in keys:
            storage = unpickler.storages.get(str(key))
            if storage is None:
                raise ValueError(f"{path}: storage {key!r} listed but never referenced")
            head = f.read(8)
            if len(head) != 8:
                raise ValueError(f"{path}: truncated before storage {key!r}")
            count = int(np.frombuffer(head, ">i8" if big else "<i8")[0])
            raw = f.read(count * storage.dtype.itemsize)
            if len(raw) != count * storage.dtype.itemsize:
                raise ValueError(f"{path}: truncated storage {key!r}")
            blobs[storage.key] = _frombuffer(raw, storage.dtype, big)
        missing = sorted(set(unpickler.storages) - set(blobs))
        if missing:
            raise ValueError(f"{path}: storages {missing} referenced but not stored")
        return _materialise(obj)


def load(path: str) -> Any:
    """The object `torch.save` wrote to `path`, with every tensor as a NumPy array (bfloat16 as
    ml_dtypes.bfloat16) and Parameters as their data. Refuses unknown globals."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such checkpoint file: {path!r}")
    try:
        return _load_zip(path) if zipfile.is_zipfile(path) else _load_legacy(path)
    except UnsafeCheckpointError:
        raise
    except (pickle.UnpicklingError, EOFError, KeyError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: unreadable torch checkpoint ({type(e).__name__}: {e})") from e


def extract_state_dict(obj: Any, key: str | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """(flat name -> array, info) from a loaded checkpoint.

    `key` picks a top-level entry; by default the first of WRAPPER_KEYS present is taken
    ('teacher' before 'student' for DINO full checkpoints), or the object itself when it already
    maps names to arrays. Then a `module.` prefix (DDP) and a `backbone.` prefix (DINO's
    MultiCropWrapper) are removed from every key carrying them. `info` records the entry chosen
    and the prefixes removed.
    """
    info: dict[str, Any] = {}
    if not isinstance(obj, Mapping):
        raise ValueError(f"checkpoint holds a {type(obj).__name__}, not a dict of tensors")
    if key is not None:
        if key not in obj:
            raise ValueError(f"checkpoint has no entry {key!r}; it has {sorted(map(str, obj))}")
        obj, info["checkpoint_key"] = obj[key], key
    else:
        for k in WRAPPER_KEYS:
            if isinstance(obj.get(k), Mapping):
                obj, info["checkpoint_key"] = obj[k], k
                break
        else:
            if not any(isinstance(v, np.ndarray) for v in obj.values()):
                raise ValueError(
                    f"no state dict found: none of {list(WRAPPER_KEYS)} and no tensors among "
                    f"the top-level entries {sorted(map(str, obj))[:10]}"
                )
    state = {str(k): v for k, v in obj.items() if isinstance(v, np.ndarray)}
    others = sorted(str(k) for k, v in obj.items() if not isinstance(v, np.ndarray))
    if others:
        raise ValueError(f"state dict entries that are not tensors: {others[:10]}")
    stripped = []
    for prefix in PREFIXES:
        if any(k.startswith(prefix) for k in state):
            renamed = {k.removeprefix(prefix): v for k, v in state.items()}
            if len(renamed) != len(state):
                raise ValueError(f"removing the prefix {prefix!r} makes two entries collide")
            state = renamed
            stripped.append(prefix)
    if stripped:
        info["stripped_prefixes"] = stripped
    return state, info


def load_state_dict(path: str, key: str | None = None) -> dict[str, np.ndarray]:
    """Flat name -> NumPy array of the state dict in a `.pth` / `.pth.tar` file (see `load`
    and `extract_state_dict`): wrappers unwrapped, `module.` / `backbone.` prefixes removed."""
    return extract_state_dict(load(path), key)[0]
