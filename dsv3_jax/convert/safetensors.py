"""Safetensors files, read and written without the `safetensors` package.

The format (https://github.com/huggingface/safetensors, "Format"):

  bytes [0, 8)        N, unsigned 64-bit little-endian: the header's length
  bytes [8, 8 + N)    the header: UTF-8 JSON, padded with spaces
                        {"__metadata__": {str: str},                      (optional)
                         "<name>": {"dtype": "BF16", "shape": [d0, d1, ...],
                                    "data_offsets": [begin, end]}, ...}
  bytes [8 + N, ...)  the data section; tensor bytes lie at [begin, end) of it, C order, little-endian

Reading maps one tensor at a time (`numpy.memmap` over exactly its bytes), so a reader holds in memory
only the pages of the tensors it is using; dropping the returned array unmaps them. Writing streams:
the header is computed from the tensors' names, dtypes and shapes, then each tensor is produced and
written in turn, so a writer holds one tensor at a time. Files are written under a temporary name and
renamed when complete, so a failed write never leaves a truncated file under the final name.

This module assumes a little-endian host (x86, ARM), as the format stores little-endian data.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
from typing import Callable, Iterable, Mapping

import ml_dtypes
import numpy as np

# The format's dtype codes and their numpy dtypes (ml_dtypes for the ones numpy lacks).
DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_CODES = {dt: code for code, dt in DTYPES.items()}
_MAX_HEADER_BYTES = 100 * 2**20  # the reference implementation's limit


class SafetensorsError(ValueError):
    """A file is not a valid safetensors file, or a tensor cannot be read or written as asked."""


def dtype_code(dtype) -> str:
    """The format's code ("BF16", "F32", ...) for a numpy / ml_dtypes / jax dtype."""
    code = _CODES.get(np.dtype(dtype))
    if code is None:
        raise SafetensorsError(f"dtype {np.dtype(dtype)} has no safetensors code; supported: "
                               f"{sorted(str(d) for d in DTYPES.values())}.")
    return code


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies: `offset` is absolute in the file, `nbytes` its length."""

    name: str
    dtype: str  # the format's code, e.g. "BF16"
    shape: tuple[int, ...]
    offset: int
    nbytes: int


class SafetensorsFile:
    """One safetensors file, its header parsed and checked; tensors are read on demand.

    Every tensor entry is checked against the file: a known dtype code, a shape of non-negative
    integers, and `data_offsets` that lie inside the data section and span exactly
    prod(shape) x itemsize bytes. Errors name the file and the tensor.
    """

    def __init__(self, path: str):
        self.path = os.fspath(path)
        try:
            size = os.path.getsize(self.path)
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise SafetensorsError(f"{self.path} is {size} bytes long, too short for a "
                                           "safetensors file (8-byte header length, then a JSON "
                                           "header); the file is truncated or not safetensors.")
                (n,) = struct.unpack("<Q", head)
                if n > min(size - 8, _MAX_HEADER_BYTES):
                    raise SafetensorsError(
                        f"{self.path}: its first 8 bytes give a header length of {n} bytes but the "
                        f"file holds {size} bytes (and headers are at most {_MAX_HEADER_BYTES}); "
                        "it is truncated or not a safetensors file.")
                raw = f.read(n)
        except OSError as e:
            raise SafetensorsError(f"cannot read {self.path}: {e}") from e
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SafetensorsError(f"{self.path}: the header is not UTF-8 JSON ({e}); the file is "
                                   "damaged or not a safetensors file.") from e
        if not isinstance(header, dict):
            raise SafetensorsError(f"{self.path}: the header is a JSON {type(header).__name__}, "
                                   "expected an object of tensor entries.")
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        data_start, data_size = 8 + n, size - 8 - n
        self._infos: dict[str, TensorInfo] = {}
        for name, entry in header.items():
            self._infos[name] = self._check_entry(name, entry, data_start, data_size)

    def _check_entry(self, name, entry, data_start, data_size) -> TensorInfo:
        where = f"{self.path}: tensor {name!r}"
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
            raise SafetensorsError(f"{where}: header entry {entry!r} needs the keys dtype, shape "
                                   "and data_offsets.")
        code, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if code not in DTYPES:
            raise SafetensorsError(f"{where} has dtype {code!r}, which this reader does not know; "
                                   f"known: {sorted(DTYPES)}.")
        if (not isinstance(shape, list)
                or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
            raise SafetensorsError(f"{where} has shape {shape!r}; expected a list of non-negative "
                                   "integers.")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
            raise SafetensorsError(f"{where} has data_offsets {offsets!r}; expected [begin, end].")
        begin, end = offsets
        nbytes = math.prod(shape) * DTYPES[code].itemsize
        if not 0 <= begin <= end <= data_size or end - begin != nbytes:
            raise SafetensorsError(
                f"{where}: data_offsets [{begin}, {end}] do not hold a {code} tensor of shape "
                f"{shape} ({nbytes} bytes) inside the {data_size}-byte data section; the file is "
                "truncated or damaged.")
        return TensorInfo(name, code, tuple(shape), data_start + begin, nbytes)

    def keys(self) -> list[str]:
        return list(self._infos)

    def __contains__(self, name: str) -> bool:
        return name in self._infos

    def info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise SafetensorsError(f"{self.path} holds no tensor named {name!r}.") from None

    def read(self, name: str, rows: slice | None = None) -> np.ndarray:
        """The tensor, or its rows [start, stop) along the first axis, as a read-only array mapped
        from the file: only those bytes are mapped, and pages load when touched."""
        info = self.info(name)
        dtype = DTYPES[info.dtype]
        shape, offset, nbytes = info.shape, info.offset, info.nbytes
        if rows is not None:
            if not shape:
                raise SafetensorsError(f"{self.path}: tensor {name!r} is a scalar; it has no rows.")
            start, stop, step = rows.indices(shape[0])
            if step != 1:
                raise SafetensorsError(f"read({name!r}, rows={rows}): only contiguous rows can be mapped.")
            stop = max(start, stop)
            row_bytes = math.prod(shape[1:]) * dtype.itemsize
            shape, offset, nbytes = (stop - start,) + shape[1:], offset + start * row_bytes, (stop - start) * row_bytes
        if nbytes == 0:
            return np.zeros(shape, dtype)
        raw = np.memmap(self.path, dtype=np.uint8, mode="r", offset=offset, shape=(nbytes,))
        return raw.view(dtype).reshape(shape)


def read_file(path: str) -> dict[str, np.ndarray]:
    """Every tensor of a file, copied into memory (for small files and tests)."""
    f = SafetensorsFile(path)
    return {name: np.array(f.read(name)) for name in f.keys()}


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """A tensor to write: its name, format dtype code and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype].itemsize


def _header_bytes(specs: list[TensorSpec], metadata: Mapping[str, str] | None) -> bytes:
    header: dict = {}
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise SafetensorsError(f"safetensors metadata must map strings to strings; got {metadata!r}.")
        header["__metadata__"] = dict(metadata)
    offset = 0
    for spec in specs:
        header[spec.name] = {"dtype": spec.dtype, "shape": list(spec.shape),
                             "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw


def write_file(path: str, specs: Iterable[TensorSpec], produce: Callable[[TensorSpec], np.ndarray],
               metadata: Mapping[str, str] | None = None) -> int:
    """Writes a file tensor by tensor; returns its size in bytes.

    Args:
      path: the file to write (created under `path + ".partial"`, then renamed).
      specs: the tensors in the order they are laid out; names must be unique.
      produce: called once per spec, in order; returns an array of exactly that shape, whose
        values are cast to the spec's dtype (the caller does any rounding it wants first).
      metadata: the header's `__metadata__` (transformers expects {"format": "pt"}).
    """
    specs = list(specs)
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise SafetensorsError(f"{path}: tensor names must be unique; repeated: {dup[:5]}.")
    for s in specs:
        if s.dtype not in DTYPES:
            raise SafetensorsError(f"{path}: tensor {s.name!r} has dtype {s.dtype!r}; known: {sorted(DTYPES)}.")
    partial = path + ".partial"
    try:
        with open(partial, "wb") as f:
            f.write(_header_bytes(specs, metadata))
            for spec in specs:
                array = np.asarray(produce(spec))
                if tuple(array.shape) != tuple(spec.shape):
                    raise SafetensorsError(f"{path}: tensor {spec.name!r} was produced with shape "
                                           f"{tuple(array.shape)}, but its header says {spec.shape}.")
                array = np.ascontiguousarray(array, dtype=DTYPES[spec.dtype])
                f.write(memoryview(array.reshape(-1).view(np.uint8)))
        os.replace(partial, path)
    except BaseException:
        if os.path.exists(partial):
            os.remove(partial)
        raise
    return os.path.getsize(path)


def save_file(tensors: Mapping[str, np.ndarray], path: str,
              metadata: Mapping[str, str] | None = None) -> int:
    """Writes in-memory arrays (dtype kept) in the given order; returns the file size."""
    arrays = {name: np.asarray(a) for name, a in tensors.items()}
    specs = [TensorSpec(name, dtype_code(a.dtype), tuple(a.shape)) for name, a in arrays.items()]
    return write_file(path, specs, lambda spec: arrays[spec.name], metadata)
