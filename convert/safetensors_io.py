"""A distrustful reader of safetensors files over mmap: every header checked before any tensor is read.

Format: 8-byte little-endian header length N, N bytes of JSON {name: {dtype, shape,
data_offsets: [begin, end]}, "__metadata__": {...}}, then the data; offsets are relative
to the end of the header. Tensors come back as numpy views of the map (bf16 as its raw
uint16 words and FP8 as its uint8 codes: numpy has neither); `release` drops a tensor's
pages from this process once it has been used, so reading a whole checkpoint never holds
it in RSS.
"""

from __future__ import annotations

import math
import mmap
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..runtime.errors import MoeError
from ..runtime.files import load_json, parse_json

MAX_HEADER = 100 << 20  # the format's own limit on the JSON header
MAX_DIMS, MAX_DIM = 8, 1 << 48  # far beyond any checkpoint, within numpy's limits (an empty tensor may claim any)
INDEX = "model.safetensors.index.json"
# safetensors dtype -> (numpy dtype of the raw view, bytes per element); only READABLE ones can be converted (FP8
# as its codes; F8_E5M2 is known so that its checkpoints get a clear error rather than "not a valid file")
DTYPES = {
    "BF16": (np.uint16, 2), "F16": (np.float16, 2), "F32": (np.float32, 4), "U8": (np.uint8, 1),
    "F8_E4M3": (np.uint8, 1), "F8_E5M2": (np.uint8, 1),
    "F64": (np.float64, 8), "I64": (np.int64, 8), "I32": (np.int32, 4), "I16": (np.int16, 2),
    "I8": (np.int8, 1), "BOOL": (np.bool_, 1), "U16": (np.uint16, 2), "U32": (np.uint32, 4), "U64": (np.uint64, 8),
}
READABLE = ("BF16", "F16", "F32", "U8", "F8_E4M3")
_PAGE = mmap.PAGESIZE
# madvise(MADV_DONTNEED) drops a file mapping's pages from the process on Linux; macOS only deactivates them
# (they stay resident, and in peak RSS, until memory runs short), and Windows has no madvise.
DONTNEED_DROPS = hasattr(mmap, "MADV_DONTNEED") and sys.platform != "darwin"


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors dtype: BF16, F16, F32, U8, ...
    shape: tuple[int, ...]
    begin: int  # absolute byte offsets in the file
    end: int
    path: Path

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def raw_to_f32(raw: np.ndarray, dtype: str) -> np.ndarray:
    """float32 copy of a raw view: bf16 words shifted into the high half, f16 converted, f32 copied."""
    if dtype == "BF16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(np.float32)


class SafetensorsFile:
    """One .safetensors file, validated and mapped read-only."""

    def __init__(self, path):
        self.path = Path(path)
        try:
            self._file = open(self.path, "rb")
        except OSError as exc:
            raise MoeError(f"{self.path}: cannot open ({exc.strerror}); check the file exists and is readable") from None
        try:
            self.size = os.fstat(self._file.fileno()).st_size
            self.tensors = self._read_header()
            self._map = self._mapped()
        except BaseException:
            self._file.close()
            raise

    def _mapped(self) -> mmap.mmap | None:
        if not self.size:
            return None
        m = mmap.mmap(self._file.fileno(), self.size, access=mmap.ACCESS_READ)
        if hasattr(mmap, "MADV_SEQUENTIAL"):
            m.madvise(mmap.MADV_SEQUENTIAL)
        return m

    def _bad(self, what: str) -> MoeError:
        return MoeError(f"{self.path}: not a valid safetensors file ({what}); re-download or re-export it")

    def _read_header(self) -> dict[str, TensorInfo]:
        if self.size < 8:
            raise self._bad(f"{self.size} bytes, too short for a header")
        n = int.from_bytes(self._file.read(8), "little")
        if n > MAX_HEADER or n > self.size - 8:
            raise self._bad(f"header length {n} exceeds {'the file' if n <= MAX_HEADER else 'the 100 MB limit'}; "
                            "the file is truncated or corrupt")
        try:
            header = parse_json(self._file.read(n), "header", "")
        except MoeError:  # not UTF-8, not JSON, or nested past what Python parses
            raise self._bad("header is not valid JSON") from None
        if not isinstance(header, dict):
            raise self._bad("header is not a JSON object")
        header.pop("__metadata__", None)
        data_start, data_len = 8 + n, self.size - 8 - n
        tensors = {name: self._entry(name, e, data_start, data_len) for name, e in header.items()}
        spans = sorted((t.begin, t.end, t.name) for t in tensors.values() if t.end > t.begin)
        for (_, end, a), (begin, _, b) in zip(spans, spans[1:], strict=False):
            if begin < end:
                raise self._bad(f"tensors {a} and {b} overlap")
        return tensors

    def _entry(self, name: str, e, data_start: int, data_len: int) -> TensorInfo:
        if not isinstance(e, dict):
            raise self._bad(f"tensor {name}: entry is not an object")
        dtype, shape, offsets = e.get("dtype"), e.get("shape"), e.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise self._bad(f"tensor {name}: unknown dtype {dtype!r}")
        if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(_is_count(s) and s <= MAX_DIM for s in shape):
            raise self._bad(f"tensor {name}: bad shape {shape!r}")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
            raise self._bad(f"tensor {name}: bad data_offsets {offsets!r}")
        begin, end = offsets
        if not begin <= end <= data_len:
            raise self._bad(f"tensor {name}: bytes {begin}..{end} lie outside the {data_len} bytes of data; "
                            "the file is truncated")
        if end - begin != math.prod(shape) * DTYPES[dtype][1]:
            raise self._bad(f"tensor {name}: {end - begin} bytes for shape {shape} of {dtype}")
        return TensorInfo(name, dtype, tuple(shape), data_start + begin, data_start + end, self.path)

    def raw(self, name: str) -> np.ndarray:
        """A read-only view of the tensor's stored values (BF16 as uint16 words, F8_E4M3 as uint8 codes)."""
        t = self.tensors[name]
        if t.dtype not in READABLE:
            raise MoeError(f"{self.path}: tensor {name} has dtype {t.dtype}, which moe cannot convert "
                           f"(it reads {', '.join(READABLE)})")
        np_dtype = DTYPES[t.dtype][0]
        if t.nbytes == 0:
            return np.zeros(t.shape, dtype=np_dtype)
        return np.frombuffer(self._map, dtype=np_dtype, count=math.prod(t.shape), offset=t.begin).reshape(t.shape)

    def release(self, begin: int, end: int) -> None:
        """Drop the pages of bytes begin..end from this process (they stay in the page cache). Where madvise
        cannot (DONTNEED_DROPS), the file is mapped anew: the old map is unmapped, with every page it holds,
        when its last view goes."""
        if self._map is None:
            return
        if not DONTNEED_DROPS:
            self._map = self._mapped()
            return
        self._advise(mmap.MADV_DONTNEED, begin, end)

    def prefetch(self, begin: int, end: int) -> None:
        """Start reading bytes begin..end into the page cache, without waiting (where madvise can)."""
        if self._map is not None and hasattr(mmap, "MADV_WILLNEED"):
            self._advise(mmap.MADV_WILLNEED, begin, end)

    def _advise(self, advice: int, begin: int, end: int) -> None:
        start = begin // _PAGE * _PAGE
        stop = min(-(-end // _PAGE) * _PAGE, self.size)
        if stop > start:
            self._map.madvise(advice, start, stop - start)

    def close(self) -> None:
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:
                pass  # a view is still alive; the map closes when it goes
        self._file.close()


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


class Checkpoint:
    """The safetensors weights of a Hub-layout folder: one file, or shards listed by the index."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self.files: dict[str, SafetensorsFile] = {}
        self.tensors: dict[str, TensorInfo] = {}
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    def _open(self) -> None:
        index = self.folder / INDEX
        if index.is_file():
            names = self._index_files(index)
        else:
            names = sorted(p.name for p in self.folder.glob("*.safetensors"))
        if not names:
            raise MoeError(f"{self.folder}: no *.safetensors weights; moe reads only safetensors checkpoints")
        for fname in names:
            path = self.folder / fname
            if not path.is_file():
                raise MoeError(f"{index}: lists {fname}, which is missing from {self.folder}; re-download the model")
            f = self.files[fname] = SafetensorsFile(path)
            for name, t in f.tensors.items():
                if name in self.tensors:
                    raise MoeError(f"{path}: tensor {name} is also in {self.tensors[name].path.name}; "
                                   "the checkpoint is inconsistent")
                self.tensors[name] = t
        if index.is_file():
            self._check_index(index)

    def _index_files(self, index: Path) -> list[str]:
        data = load_json(index, "re-download the model")
        try:
            weight_map = data["weight_map"]
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise TypeError
        except (KeyError, TypeError):
            raise MoeError(f"{index}: not a valid index (needs a weight_map of tensor -> file); "
                           "re-download the model") from None
        self._weight_map = weight_map
        files = sorted(set(weight_map.values()))
        for fname in files:
            if Path(fname).name != fname or not fname.endswith(".safetensors"):
                raise MoeError(f"{index}: names {fname!r}, which is not a .safetensors file in this folder")
        return files

    def _check_index(self, index: Path) -> None:
        for name, fname in self._weight_map.items():
            t = self.tensors.get(name)
            if t is None or t.path.name != fname:
                raise MoeError(f"{index}: tensor {name} should be in {fname} but is not; re-download the model")

    def names(self) -> list[str]:
        return list(self.tensors)

    def info(self, name: str) -> TensorInfo:
        return self.tensors[name]

    def raw(self, name: str) -> np.ndarray:
        return self.files[self.tensors[name].path.name].raw(name)

    def release(self, name: str, begin: int = 0, end: int | None = None) -> None:
        """Drop the pages of tensor `name` (or of its bytes begin..end) from this process."""
        t = self.tensors[name]
        self.files[t.path.name].release(t.begin + begin, t.end if end is None else t.begin + end)

    def prefetch(self, name: str, begin: int = 0, end: int | None = None) -> None:
        """Start reading tensor `name` (or its bytes begin..end) from storage, so that it is there when needed."""
        t = self.tensors[name]
        self.files[t.path.name].prefetch(t.begin + begin, t.end if end is None else t.begin + end)

    @property
    def nbytes(self) -> int:
        return sum(f.size for f in self.files.values())

    def close(self) -> None:
        for f in self.files.values():
            f.close()
        self.files.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
