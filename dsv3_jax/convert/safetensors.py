"""Safetensors files: validated by the `safetensors` package, read by memory map, written streaming.

The format (https://github.com/huggingface/safetensors, "Format"):

  bytes [0, 8)        N, unsigned 64-bit little-endian: the header's length
  bytes [8, 8 + N)    the header: UTF-8 JSON, padded with spaces
                        {"__metadata__": {str: str},                      (optional)
                         "<name>": {"dtype": "BF16", "shape": [d0, d1, ...],
                                    "data_offsets": [begin, end]}, ...}
  bytes [8 + N, ...)  the data section; tensor bytes lie at [begin, end) of it, C order, little-endian.
                      The tensors tile it exactly: sorted by `begin`, each starts where the previous
                      one ends, the last ends at the end of the file (no overlap, no hole, no
                      trailing bytes).

Opening a file runs the `safetensors` package's own header check (`safe_open`), the field's
reference implementation, so a file it refuses (overlapping or out-of-order offsets, holes, offsets
past the end of the file, a truncated file, a header that is not valid JSON, an unknown dtype, a
size that disagrees with the shape) is refused here too, as a `SafetensorsError` naming the file,
the library's reason and, where this module can tell, the tensors involved. The header is then
parsed here as well (duplicate names refused), and its names, dtypes and shapes are checked to be
the ones the library read.

Why reads do not go through the library. `safe_open(path, framework="numpy")` of safetensors 0.8.0
(the version pinned in constraints.txt) cannot return F8_E4M3 or F8_E5M2 tensors: `get_tensor` and
`get_slice(...)[rows]` raise `AttributeError: module 'numpy' has no attribute 'float8_e4m3fn'` (the
same for framework "flax" / "jax"; measured on the installed version), and F8_E4M3 is the dtype
of DeepSeek's released weights. BF16 does read, but only because `ml_dtypes` registers the name
with numpy. So reading keeps one path for every dtype: `numpy.memmap` over exactly one tensor's bytes
(or only the rows asked for), at the offsets the validated header gives. A reader therefore holds in
memory only the pages of the tensors it is using; dropping the returned array unmaps them.

Writing streams (the library's `save_file` needs every tensor in memory at once): the header is
computed from the tensors' names, dtypes and shapes, then each tensor is produced and written in
turn, so a writer holds one tensor at a time. What it writes is a file the library reads back (the
tests check every dtype). Files are written through `files.atomic_file`, so a failed write never
leaves a truncated file under the final name.

This module assumes a little-endian host (x86, ARM), as the format stores little-endian data.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
from typing import Callable, Iterable, Mapping

import ml_dtypes  # also registers "bfloat16" with numpy, which the library's BF16 support needs
import numpy as np
import safetensors

from dsv3_jax.files import atomic_file

# The format's dtype codes and their numpy dtypes (ml_dtypes for the ones numpy lacks).
DTYPES: dict[str, np.dtype] = {code: np.dtype(t) for code, t in {
    "F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
    "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?"}.items()}
_CODES = {dt: code for code, dt in DTYPES.items()}
_MAX_HEADER_BYTES = 100 * 2**20  # the reference implementation's limit
_DAMAGED = "the file is truncated or damaged, or not a safetensors file; download or export it again"


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


# ------------------------------------------------------------------------------------ the header

def _no_duplicates(pairs):
    """json's object_pairs_hook: KeyError(key) for a key named twice (json.loads keeps the last)."""
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        raise KeyError(next(key for key in keys if keys.count(key) > 1))
    return dict(pairs)


def _read_header(path: str) -> tuple[int, dict, int]:
    """(N, the parsed header, the file size); SafetensorsError naming what is wrong otherwise."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise SafetensorsError(f"{path} is {size} bytes long, too short for a safetensors "
                                       f"file (8-byte header length, then a JSON header); {_DAMAGED}.")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, _MAX_HEADER_BYTES):
                raise SafetensorsError(
                    f"{path}: its first 8 bytes give a header length of {n} bytes but the file "
                    f"holds {size} bytes (and headers are at most {_MAX_HEADER_BYTES}); {_DAMAGED}.")
            raw = f.read(n)
    except OSError as e:
        raise SafetensorsError(f"cannot read {path}: {e}") from e
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except KeyError as e:
        raise SafetensorsError(f"{path}: the header names tensor {e.args[0]!r} twice; {_DAMAGED}.") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SafetensorsError(f"{path}: the header is not UTF-8 JSON ({e}); {_DAMAGED}.") from e
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: the header is a JSON {type(header).__name__}, expected "
                               f"an object of tensor entries; {_DAMAGED}.")
    return n, header, size


def _entry(path: str, name: str, entry) -> tuple[str, tuple[int, ...], int, int]:
    """(dtype code, shape, begin, end) of one header entry, its types checked."""
    where = f"{path}: tensor {name!r}"
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
        raise SafetensorsError(f"{where}: header entry {entry!r} needs the keys dtype, shape and "
                               f"data_offsets; {_DAMAGED}.")
    code, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if code not in DTYPES:
        raise SafetensorsError(f"{where} has dtype {code!r}, which this reader does not know; "
                               f"known: {sorted(DTYPES)}.")
    if (not isinstance(shape, list)
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise SafetensorsError(f"{where} has shape {shape!r}; expected a list of non-negative "
                               f"integers; {_DAMAGED}.")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)):
        raise SafetensorsError(f"{where} has data_offsets {offsets!r}; expected [begin, end] with "
                               f"0 <= begin <= end; {_DAMAGED}.")
    return code, tuple(shape), offsets[0], offsets[1]


def _layout_problem(path: str, header: dict, data_size: int) -> str | None:
    """What is wrong with where the tensors lie, in words, or None: each entry's size against its
    dtype and shape, then, in order of `begin`, overlaps, holes, the end of the file."""
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        code, shape, begin, end = _entry(path, name, entry)
        nbytes = math.prod(shape) * DTYPES[code].itemsize
        if end - begin != nbytes:
            return (f"tensor {name!r} has data_offsets [{begin}, {end}] ({end - begin} bytes), but "
                    f"a {code} tensor of shape {list(shape)} takes {nbytes} bytes")
        spans.append((begin, end, name))
    spans.sort()
    cursor, previous = 0, None
    for begin, end, name in spans:
        if begin < cursor:
            return (f"tensors {previous[2]!r} (data_offsets [{previous[0]}, {previous[1]}]) and "
                    f"{name!r} ([{begin}, {end}]) overlap: reading one would return bytes of the other")
        if begin > cursor:
            after = f" (after {previous[2]!r})" if previous else ""
            return (f"bytes [{cursor}, {begin}) of the data section belong to no tensor{after}: "
                    f"tensor {name!r} starts at {begin}, leaving a hole")
        if end > data_size:
            return (f"tensor {name!r}: data_offsets [{begin}, {end}] run past the end of the "
                    f"{data_size}-byte data section")
        cursor, previous = end, (begin, end, name)
    if cursor != data_size:
        return (f"the data section holds {data_size} bytes but the tensors cover only {cursor}: "
                f"{data_size - cursor} trailing bytes belong to no tensor")
    return None


def _diagnose(path: str) -> str:
    """Best effort, for an error message: what this module's own parse finds wrong with the file."""
    try:
        n, header, size = _read_header(path)
        problem = _layout_problem(path, header, size - 8 - n)
    except SafetensorsError as e:
        message = str(e).split(f"; {_DAMAGED}")[0].rstrip(".")
        if message.startswith(f"{path}: "):
            return message[len(path) + 2:]
        return message.replace(f"{path} ", "the file ", 1) if message.startswith(path) else message
    except Exception:  # the diagnosis must never hide the library's refusal
        return ""
    return problem or ""


def _library_view(path: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{name: (dtype code, shape)} as the safetensors package reads `path`, after its own checks;
    what it refuses becomes a SafetensorsError with its reason and this module's diagnosis."""
    try:
        with safetensors.safe_open(path, framework="numpy") as f:
            view = {}
            for name in f.keys():
                tensor = f.get_slice(name)  # metadata only: nothing is read
                view[name] = (tensor.get_dtype(), tuple(tensor.get_shape()))
            return view
    except OSError as e:  # missing, unreadable
        raise SafetensorsError(f"cannot read {path}: {e}") from None
    except Exception as e:  # the library's SafetensorError, or anything else: never raised raw
        reason = str(e).removeprefix("Error while deserializing header: ")
        detail = _diagnose(path)
        raise SafetensorsError(f"{path} is not a valid safetensors file (the safetensors library "
                               f"refuses it: {reason})" + (f": {detail}" if detail else "")
                               + f"; {_DAMAGED}.") from None


class SafetensorsFile:
    """One safetensors file, its header validated (by the safetensors library, then parsed here);
    tensors are read on demand, mapped from the file."""

    def __init__(self, path: str):
        self.path = os.fspath(path)
        theirs = _library_view(self.path)
        n, header, size = _read_header(self.path)
        problem = _layout_problem(self.path, header, size - 8 - n)
        if problem:
            raise SafetensorsError(f"{self.path}: {problem}; {_DAMAGED}.")
        header.pop("__metadata__", None)  # the library checked it: {str: str}
        data_start = 8 + n
        self._infos: dict[str, TensorInfo] = {}
        for name, entry in header.items():
            code, shape, begin, end = _entry(self.path, name, entry)
            if theirs.get(name) != (code, shape):
                raise SafetensorsError(
                    f"{self.path}: tensor {name!r} reads as {code} {list(shape)} here but as "
                    f"{theirs.get(name, '<absent>')} in the safetensors library; {_DAMAGED}.")
            self._infos[name] = TensorInfo(name, code, shape, data_start + begin, end - begin)
        extra = sorted(set(theirs) - set(self._infos))
        if extra:
            raise SafetensorsError(f"{self.path}: the safetensors library reads tensor(s) {extra[:5]} "
                                   f"that this module's parse lacks; {_DAMAGED}.")

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
        try:
            raw = np.memmap(self.path, dtype=np.uint8, mode="r", offset=offset, shape=(nbytes,))
        except (OSError, ValueError) as e:  # e.g. the file was truncated or removed since it was opened
            raise SafetensorsError(f"{self.path}: cannot map tensor {name!r} (bytes [{offset}, "
                                   f"{offset + nbytes}) of the file): {e}; the file changed after it "
                                   "was opened, or is damaged.") from e
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
      path: the file to write.
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
    with atomic_file(path) as f:
        f.write(_header_bytes(specs, metadata))
        for spec in specs:
            array = np.asarray(produce(spec))
            if tuple(array.shape) != tuple(spec.shape):
                raise SafetensorsError(f"{path}: tensor {spec.name!r} was produced with shape "
                                       f"{tuple(array.shape)}, but its header says {spec.shape}.")
            array = np.ascontiguousarray(array, dtype=DTYPES[spec.dtype])
            f.write(memoryview(array.reshape(-1).view(np.uint8)))
    return os.path.getsize(path)


def save_file(tensors: Mapping[str, np.ndarray], path: str,
              metadata: Mapping[str, str] | None = None) -> int:
    """Writes in-memory arrays (dtype kept) in the given order; returns the file size."""
    arrays = {name: np.asarray(a) for name, a in tensors.items()}
    specs = [TensorSpec(name, dtype_code(a.dtype), tuple(a.shape)) for name, a in arrays.items()]
    return write_file(path, specs, lambda spec: arrays[spec.name], metadata)
