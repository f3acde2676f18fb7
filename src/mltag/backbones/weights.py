"""Read a legacy (non-zip) ``torch.save`` state dict with numpy alone.

Legacy layout: pickled magic number, protocol version, sys info, then the state
dict pickled with persistent ids naming storages, then the list of storage keys,
then each storage's raw bytes prefixed by an 8-byte little-endian element count.
Only the classes a state dict needs are accepted; anything else is an error, so a
crafted file cannot run code.
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
from pathlib import Path

import numpy as np

from mltag.errors import MltagError

MAGIC = 0x1950A86A20F9469CFC6C
PROTOCOL = 1001

_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class _StorageType:
    def __init__(self, name: str):
        self.dtype = np.dtype(_STORAGE_DTYPES[name])


class _TensorRef:
    """A tensor whose storage bytes come later in the file."""

    def __init__(self, storage, offset, size, stride):
        self.key, self.dtype = storage
        self.offset, self.size, self.stride = int(offset), tuple(size), tuple(stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, *_):
    return _TensorRef(storage, storage_offset, size, stride)


class _Unpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_v2
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not part of a state dict")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        storage_type, key = pid[1], pid[2]
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"unexpected storage type {storage_type!r}")
        return (str(key), storage_type.dtype)


def load_legacy_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Return ``{name: ndarray}`` from a legacy torch.save file."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(2)
        f.seek(0)
        if head == b"PK":
            raise MltagError("this is a zip-format torch file; only the legacy format is supported", path)
        try:
            return _load(f)
        except (pickle.UnpicklingError, EOFError, struct.error, ValueError) as e:
            raise MltagError(f"not a legacy torch state dict: {e}", path) from None


def _load(f: io.BufferedReader) -> dict[str, np.ndarray]:
    # Every pickle in the file goes through the restricted unpickler, the magic number and the
    # protocol version too: a plain pickle.load of the first one would run whatever it names.
    if _Unpickler(f).load() != MAGIC:
        raise pickle.UnpicklingError("bad magic number")
    if _Unpickler(f).load() != PROTOCOL:
        raise pickle.UnpicklingError("unsupported protocol version")
    _sys_info = _Unpickler(f).load()
    state = _Unpickler(f).load()
    keys = _Unpickler(f).load()
    if not isinstance(state, dict):
        raise pickle.UnpicklingError(f"expected a state dict, got {type(state).__name__}")
    dtypes = {}
    for ref in state.values():
        if isinstance(ref, _TensorRef):
            dtypes[ref.key] = ref.dtype
    storages = {}
    for key in keys:
        (count,) = struct.unpack("<q", f.read(8))
        dtype = np.dtype(dtypes.get(str(key), np.uint8))
        buf = f.read(count * dtype.itemsize)
        if len(buf) != count * dtype.itemsize:
            raise EOFError(f"storage {key} is truncated")
        storages[str(key)] = np.frombuffer(buf, dtype=dtype)
    out = {}
    for name, ref in state.items():
        if not isinstance(ref, _TensorRef):
            continue
        flat = storages[ref.key]
        item = flat.dtype.itemsize
        arr = np.lib.stride_tricks.as_strided(
            flat[ref.offset :], shape=ref.size, strides=tuple(s * item for s in ref.stride)
        )
        out[name] = np.array(arr)  # own the memory, drop the strides
    return out
