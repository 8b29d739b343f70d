"""A small GGUF reader: metadata, tensor descriptions, and tensor bytes mapped from the file.

`gguf.GGUFReader` builds numpy views for every part of every metadata value; on the
bundled SmolLM2 file (49K tokenizer strings, 48K merges) that took ~10 s of a 13 s load on
the 2-core CI machine, and every worker and the router pay it. This reader decodes the
metadata with `struct` from one read of the header region and maps tensor data lazily.

Format (GGUF v2/v3, little-endian): magic "GGUF", uint32 version, uint64 tensor count,
uint64 metadata count; metadata entries (string key, uint32 type, value); tensor entries
(string name, uint32 n_dims, uint64 dims innermost first, uint32 ggml type, uint64 offset
from the data section); the data section starts at the next multiple of
`general.alignment` (default 32). Strings are a uint64 length and UTF-8 bytes.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from engine.errors import UnsupportedModel

# metadata value types -> struct format (scalars); 8 = string, 9 = array
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
# ggml types stored as plain numpy elements (everything else: blocks of bytes)
_T = GGMLQuantizationType
_PLAIN = {_T.F32: np.float32, _T.F16: np.float16, _T.I8: np.int8, _T.I16: np.int16,
          _T.I32: np.int32, _T.I64: np.int64, _T.F64: np.float64}


@dataclass
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # innermost first, as GGUF stores it
    tensor_type: GGMLQuantizationType
    offset: int  # absolute byte offset in the file
    num_bytes: int
    _file: GGUFFile

    @property
    def data(self) -> np.ndarray:
        """A read-only view of the tensor in the file: plain types as [outer .. inner]
        elements, block-quantized ones as uint8 rows of their inner dimension's bytes (the
        layout `gguf.quants.dequantize` takes)."""
        dims = tuple(reversed(self.shape))
        dtype = _PLAIN.get(self.tensor_type)
        if dtype is not None:
            return np.frombuffer(self._file.buffer, dtype, int(np.prod(dims)), self.offset).reshape(dims)
        raw = np.frombuffer(self._file.buffer, np.uint8, self.num_bytes, self.offset)
        return raw.reshape(*dims[:-1], -1)


class _Cursor:
    def __init__(self, buf, pos: int = 0) -> None:
        self.buf, self.pos = buf, pos

    def take(self, fmt: str):
        (value,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return value

    def string(self) -> str:
        n = self.take("Q")
        s = bytes(self.buf[self.pos : self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def value(self, vtype: int):
        if vtype in _SCALARS:
            return self.take(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.take("I"), self.take("Q")
            if etype in _SCALARS:  # one unpack for the whole array
                fmt = f"<{count}{_SCALARS[etype]}"
                values = list(struct.unpack_from(fmt, self.buf, self.pos))
                self.pos += struct.calcsize(fmt)
                return values
            return [self.value(etype) for _ in range(count)]
        raise UnsupportedModel(f"GGUF: unknown metadata value type {vtype} at byte {self.pos}")


class GGUFFile:
    """fields: metadata key -> Python value (arrays as lists); tensors: in file order."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as f:
            if not f.seek(0, 2):
                raise UnsupportedModel(f"{self.path}: empty file, not a GGUF model")
            self.buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            self._parse()
        except UnsupportedModel:
            raise  # already says what is wrong (it is a ValueError too: not wrapped again)
        except (struct.error, ValueError, ZeroDivisionError) as e:  # truncated or garbled
            raise UnsupportedModel(f"{self.path}: not a readable GGUF file ({e})") from e

    def _parse(self) -> None:
        buf = self.buffer
        if buf[:4] != b"GGUF":
            raise UnsupportedModel(f"{self.path}: not a GGUF file (magic {bytes(buf[:4])!r})")
        cur = _Cursor(buf, 4)
        self.version = cur.take("I")
        if self.version not in (2, 3):
            raise UnsupportedModel(
                f"{self.path}: GGUF version {self.version} is not supported (2 or 3; "
                "a big-endian file also reads as another version)"
            )
        n_tensors, n_fields = cur.take("Q"), cur.take("Q")
        self.fields: dict[str, object] = {}
        for _ in range(n_fields):
            key = cur.string()
            self.fields[key] = cur.value(cur.take("I"))
        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            dims = tuple(cur.take("Q") for _ in range(cur.take("I")))
            infos.append((name, dims, cur.take("I"), cur.take("Q")))
        align = int(self.fields.get("general.alignment", 32))
        start = -(-cur.pos // align) * align
        self.tensors = []
        for name, dims, type_id, off in infos:
            ttype, num_bytes = _tensor_type_bytes(name, dims, type_id)
            self.tensors.append(GGUFTensor(name, dims, ttype, start + off, num_bytes, self))
        for t in self.tensors:
            if t.offset + t.num_bytes > len(buf):
                raise UnsupportedModel(f"{self.path}: tensor {t.name} runs past the end of the file")


def _tensor_type_bytes(name: str, dims: tuple[int, ...], type_id: int) -> tuple[GGMLQuantizationType, int]:
    """-> (the tensor's ggml type, its size in bytes); unknown types raise UnsupportedModel."""
    try:
        ttype = GGMLQuantizationType(type_id)
        block, size = GGML_QUANT_SIZES[ttype]
    except (ValueError, KeyError) as e:
        raise UnsupportedModel(f"GGUF tensor {name}: unknown ggml type {type_id}") from e
    n = int(np.prod(dims)) if dims else 1
    if dims and dims[0] % block:
        raise UnsupportedModel(f"GGUF tensor {name}: inner dim {dims[0]} is not a multiple of {block}")
    return ttype, n // block * size
