"""The converted-model layout: the one contract between `moe.convert` and `moe.runtime`.

A model folder holds:

- `manifest.json`: format name and version, architecture, the normalized config
  (see `moe.convert.arch`), the quantization chosen per part, tokenizer facts,
  every tensor's place and encoding, and one record (offset, length, CRC-32)
  per expert of each MoE layer; every tensor also carries
  the CRC-32 of its codes (and scales), so `verify` names the tensor a flipped byte hit.
- `model.bin`: every tensor that is not an expert's (embeddings, attention,
  norms, routers, shared experts, dense MLPs, output head), each aligned to
  TENSOR_ALIGN bytes.
- `experts.bin`: each expert of each MoE layer as one contiguous run aligned to
  EXPERT_ALIGN bytes (16 KiB: Apple-silicon pages), holding its `gate_up`,
  `down` and biases, so bringing in one expert is one sequential read.
- the tokenizer files copied from the source.

Tensor names, kinds and shapes: moe.runtime.tensors (the runtime never sees a Hugging Face name).

Encodings of a 2-D tensor [rows, cols] (1-D tensors are always f32):
  f32, bf16, f16: row-major, little-endian, unchanged values.
  q8: int8 codes [rows, cols_pad], value = code * scale.
  q4: uint8 [rows, cols_pad / 2]; in each chunk of 32 columns, byte b holds
      column b in its low nibble and column b + 16 in its high nibble;
      value = (nibble - 8) * scale.
  q5, q6: uint8 [rows, cols_pad * 5 / 8] or [rows, cols_pad * 3 / 4]: codes c = q + 16 (0..31) or
      q + 32 (0..63), value = q * scale. Each row holds the low four bits of its codes as q4 does
      (cols_pad / 2 bytes), then their high bits, per chunk of 32 columns: q5 4 bytes, whose
      little-endian uint32 holds the high bit of column j at bit q5_bit(j) (columns 4a + b and
      16 + 4a + b, a and b in 0..3, at bits 8b + 4 + a and 8b + a); q6 8 bytes, byte k holding the
      high two bits of columns k, k + 8, k + 16, k + 24 in bits 0-1, 2-3, 4-5, 6-7 (the orders the
      vector kernels unpack with one variable shift per 32 columns).
  Quantized encodings keep one scale per group of `group_size` columns (a multiple of 32), in two
  levels: every SUPER groups of a row share a bfloat16 super-scale D, and each group has an int8 k
  (-127..127), its scale being k * (D / 127) (float32: k times float32(D) * float32(1 / 127)).
  Stored after the codes, as one region: D as uint16 [rows, ceil(groups / SUPER)], then k as int8
  [rows, groups] (groups = cols_pad / group_size). cols_pad rounds cols up to a multiple of
  group_size; padding columns hold zero.

Writing the files: moe.runtime.layout_writer; packing and unpacking the encodings: moe.runtime.codec.
"""

from __future__ import annotations

import math
import mmap
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
from zlib_ng import zlib_ng

from .config import ModelConfig
from .errors import MoeError
from .files import load_json, not_a_file
from .machine import anonymous, drop_cached, open_read, pread, preadv
from .tensors import expert_key, implied

FORMAT = "moe-layout"
FORMAT_VERSION = 2  # 2: two-level scales (bfloat16 per SUPER groups, int8 per group); q5, q6
MANIFEST = "manifest.json"
MODEL_FILE = "model.bin"
EXPERTS_FILE = "experts.bin"
EXPERT_ALIGN = 16384
TENSOR_ALIGN = 64
CHUNK = 32
SUPER = 8  # groups per super-scale: one vector step of the kernels at group size 32 (256 columns)
ENCODINGS = ("f32", "bf16", "f16", "q8", "q6", "q5", "q4")
QUANT_BITS = {"q4": 4, "q5": 5, "q6": 6, "q8": 8}  # bits per code of the quantized encodings
_RAW_DTYPES = {"f32": np.float32, "bf16": np.uint16, "f16": np.float16}


def align(n: int, to: int) -> int:
    return (n + to - 1) // to * to


def padded_cols(cols: int, group_size: int) -> int:
    return align(cols, group_size)


@dataclass
class Packed:
    """One tensor in its stored encoding: `codes` (and `scales` when quantized)."""

    encoding: str
    shape: tuple[int, ...]
    codes: np.ndarray  # f32/uint16(bf16)/f16 values, int8 (q8) or uint8 packed codes (q4, q5, q6)
    scales: np.ndarray | None = None  # int8 k [rows, groups]
    group_size: int = 0
    supers: np.ndarray | None = None  # uint16 bfloat16 D [rows, supers_of(groups)]

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + sum(a.nbytes for a in (self.scales, self.supers) if a is not None)


def supers_of(groups: int) -> int:
    return -(-groups // SUPER)


def crc32(buf, start: int = 0) -> int:
    """CRC-32 (zlib's) of buf, continuing from `start`: zlib-ng's, much faster than the system zlib's, as every
    expert is checked the first time the router picks it (tests/bench/README.md)."""
    return zlib_ng.crc32(buf, start) & 0xFFFFFFFF


def crc32_each(buffers: list) -> list[int]:
    """crc32 of each buffer, side by side (zlib-ng releases the GIL): over mapped runs not yet in memory, their
    page faults then wait on the disk together rather than one after another."""
    if len(buffers) < 2:
        return [crc32(b) for b in buffers]
    with ThreadPoolExecutor(min(len(buffers), os.cpu_count() or 1)) as pool:
        return list(pool.map(crc32, buffers))


# The KV cache's forms (`--kv-cache`): float32; bfloat16 bits; q8, int8 codes with a float32 scale per row.
KV_CACHE_KINDS = {"f32": np.dtype(np.float32), "bf16": np.dtype(np.uint16), "q8": np.dtype(np.int8)}


def kv_cache_dtype(encodings, kind: str = "auto") -> np.dtype:
    """How the KV cache holds keys and values: as `kind` says (KV_CACHE_KINDS), or for "auto" from the encodings of
    the model's non-expert tensors: as bfloat16 bits when they are quantized, which halves the bytes attention reads
    per token at the precision Hub models run in; as float32 when they are 16-bit, so that such a model's logits
    stay transformers' in float32."""
    if kind != "auto":
        if kind not in KV_CACHE_KINDS:
            raise MoeError(f"unknown KV cache {kind!r}; choose auto, {', '.join(KV_CACHE_KINDS)}")
        return KV_CACHE_KINDS[kind]
    return KV_CACHE_KINDS["bf16" if any(e in QUANT_BITS for e in encodings) else "f32"]


@dataclass
class Layout:
    """A converted model opened for reading: the validated manifest, its config parsed once, and its
    memory-mapped files (none when only read by read_layout)."""

    folder: Path
    manifest: dict
    config: ModelConfig
    maps: dict[str, mmap.mmap] = field(default_factory=dict)
    _by_expert: dict[tuple[int, int], dict[str, dict]] = field(default_factory=dict)

    def has(self, name: str) -> bool:
        return name in self.manifest["tensors"]

    def kv_cache_dtype(self, kind: str = "auto") -> np.dtype:
        return kv_cache_dtype((e["encoding"] for e in self.manifest["tensors"].values()), kind)

    def entry(self, name: str) -> dict:
        try:
            return self.manifest["tensors"][name]
        except KeyError:
            raise MoeError(f"{self.folder / MANIFEST}: tensor {name} is missing; reconvert the model") from None

    def packed(self, name: str) -> Packed:
        """Views into the memory map (no copy) of one tensor's codes and scales."""
        e = self.entry(name)
        buf = self.maps[e["file"]]
        return _view(buf, e, base=0)

    def expert_record(self, layer: int, expert: int) -> dict:
        return self.manifest["experts"][str(layer)][expert]

    def expert_run(self, layer: int, expert: int) -> memoryview:
        """The expert's run in the memory-mapped experts.bin (no copy)."""
        r = self.expert_record(layer, expert)
        return memoryview(self.maps[EXPERTS_FILE])[r["offset"]: r["offset"] + r["nbytes"]]

    def check_tensors(self) -> None:
        """Every tensor outside the expert runs against its CRC-32s, through the memory map (the runs are
        checked as their experts are first used): a mismatch is a damaged file, a runtime failure."""
        spans = [(name, e, *span) for name, e in self.manifest["tensors"].items() if expert_key(name) is None
                 for span in _checked_spans(e)]
        views = [memoryview(self.maps[e["file"]])[off: off + n] for _, e, off, n, _, _ in spans]
        for (name, e, _, _, key, what), crc in zip(spans, crc32_each(views), strict=True):
            if crc != e[key]:
                raise MoeError(f"{self.folder / e['file']}: tensor {name}{what} fails its checksum; the file is "
                               "damaged, run `moe verify` and reconvert", 1)

    def expert_tensors(self, layer: int, expert: int) -> dict[str, dict]:
        """The entries of one expert's tensors, keyed by their short name (gate_up, down, ...)."""
        if not self._by_expert:
            for name, e in self.manifest["tensors"].items():
                key = expert_key(name)
                if key is not None:
                    self._by_expert.setdefault(key[:2], {})[key[2]] = e
        return self._by_expert.get((layer, expert), {})

    def hold(self, fname: str) -> None:
        """Copy a mapped file into private anonymous memory and use the copy: its pages are then the process's own,
        never the page cache's to evict when the expert reads of a model larger than RAM churn it. Call before any
        view of the file is taken."""
        size = len(self.maps[fname])
        if not size:
            return
        held = anonymous(size)
        fd = open_read(self.folder / fname)
        try:
            got = 0
            while got < size:
                n = preadv(fd, [memoryview(held)[got:]], got)
                if n <= 0:
                    raise MoeError(f"{self.folder / fname}: the file ended after {got} of {size} bytes; reconvert the "
                                   "model", 1)
                got += n
            drop_cached(fd)  # read once into the copy: a second copy in the page cache would only crowd it
        finally:
            os.close(fd)
        self.maps[fname].close()
        self.maps[fname] = held

    def close(self) -> None:
        for m in self.maps.values():
            try:
                m.close()
            except BufferError:
                pass  # numpy views still alive; the map closes when they go
        self.maps.clear()


def view_in(buf, entry: dict, base: int) -> Packed:
    """A Packed view of `entry` in `buf`, whose byte 0 is at file offset `base` (an expert slot)."""
    return _view(buf, entry, base)


def _view(buf, e: dict, base: int) -> Packed:
    enc = e["encoding"]
    shape = tuple(e["shape"])
    if enc in _RAW_DTYPES:
        codes = np.frombuffer(buf, dtype=_RAW_DTYPES[enc], count=math.prod(shape), offset=e["offset"] - base)
        return Packed(enc, shape, codes.reshape(shape))
    rows, cols = shape
    gs = e["group_size"]
    cp = padded_cols(cols, gs)
    width = cp * QUANT_BITS[enc] // 8
    codes = np.frombuffer(buf, dtype=np.int8 if enc == "q8" else np.uint8, count=rows * width, offset=e["offset"] - base)
    groups = cp // gs
    nsup = supers_of(groups)
    supers = np.frombuffer(buf, dtype=np.uint16, count=rows * nsup, offset=e["scales_offset"] - base)
    scales = np.frombuffer(buf, dtype=np.int8, count=rows * groups, offset=e["scales_offset"] - base + 2 * rows * nsup)
    return Packed(enc, shape, codes.reshape(rows, width), scales.reshape(rows, groups), gs, supers.reshape(rows, nsup))


def _checked_spans(e: dict) -> list[tuple[int, int, str, str]]:
    """(offset, length, checksum key, what) of a tensor's codes and, when quantized, of its scales."""
    nbytes, snbytes = expected_nbytes(e)
    return [(e["offset"], nbytes, "crc32", "")] + ([(e["scales_offset"], snbytes, "scales_crc32", " scales")] if snbytes else [])


def tensor_nbytes(encoding: str, shape, group_size: int = 0) -> tuple[int, int]:
    """(codes bytes, scales bytes) of a tensor of `shape` stored in `encoding`: the layout's one size formula."""
    if encoding in _RAW_DTYPES:
        return math.prod(shape) * np.dtype(_RAW_DTYPES[encoding]).itemsize, 0
    rows, cols = shape
    cp = padded_cols(cols, group_size)
    groups = cp // group_size
    return rows * cp * QUANT_BITS[encoding] // 8, rows * (2 * supers_of(groups) + groups)


def expected_nbytes(e: dict) -> tuple[int, int]:
    """(codes bytes, scales bytes) of a tensor entry."""
    return tensor_nbytes(e["encoding"], e["shape"], e.get("group_size", 0))


def stored_nbytes(entry: dict) -> int:
    """Bytes a tensor's codes and scales take in its file (alignment padding excluded)."""
    return sum(expected_nbytes(entry))


class Place(NamedTuple):
    file: str
    offset: int
    scales_offset: int | None  # None: not quantized, no scales


class Placement:
    """Where the layout puts each part, in the order written: a tensor's codes, then its scales, each at the next
    TENSOR_ALIGN boundary of its file (experts.bin inside an expert run, else model.bin); each expert run at the
    next EXPERT_ALIGN boundary of experts.bin, which ends padded to one. LayoutWriter writes by it; `moe plan`
    and the converter's disk-space check follow it without writing."""

    def __init__(self):
        self.ends = {MODEL_FILE: 0, EXPERTS_FILE: 0}  # bytes placed so far in each file
        self.runs: dict[tuple[int, int], tuple[int, int]] = {}  # (layer, expert) -> (offset, nbytes) of its run
        self._run: tuple[int, int, int] | None = None  # (layer, expert, offset) of the open run

    def tensor(self, encoding: str, shape, group_size: int = 0) -> Place:
        fname = MODEL_FILE if self._run is None else EXPERTS_FILE
        codes, scales = tensor_nbytes(encoding, shape, group_size)
        offset = align(self.ends[fname], TENSOR_ALIGN)
        self.ends[fname] = offset + codes
        scales_offset = None
        if scales:
            scales_offset = align(self.ends[fname], TENSOR_ALIGN)
            self.ends[fname] = scales_offset + scales
        return Place(fname, offset, scales_offset)

    def begin_run(self, layer: int, expert: int) -> int:
        """Open an expert's run; its offset."""
        start = self.ends[EXPERTS_FILE] = align(self.ends[EXPERTS_FILE], EXPERT_ALIGN)
        self._run = (layer, expert, start)
        return start

    def end_run(self) -> tuple[int, int, int, int]:
        """Close the open run; its (layer, expert, offset, nbytes)."""
        layer, expert, start = self._run
        self.runs[(layer, expert)] = (start, self.ends[EXPERTS_FILE] - start)
        self._run = None
        return layer, expert, start, self.ends[EXPERTS_FILE] - start

    def file_sizes(self) -> dict[str, int]:
        return {MODEL_FILE: self.ends[MODEL_FILE], EXPERTS_FILE: align(self.ends[EXPERTS_FILE], EXPERT_ALIGN)}


def read_manifest(folder: Path) -> dict:
    """Parse and validate manifest.json; every offset and length must lie inside its file."""
    return read_layout(folder).manifest


def read_layout(folder: Path) -> Layout:
    """The validated manifest (read_manifest) and its typed config, no file mapped."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.is_dir():
        raise MoeError(f"{folder}: no such model folder; convert one with `moe convert SRC` or list them with `moe list`")
    if not_a_file(path) == "missing":
        raise MoeError(f"{path}: missing; this folder is not a converted model (convert it with `moe convert`)")
    m = load_json(path, "reconvert the model")
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise MoeError(f"{path}: not a moe manifest; reconvert the model")
    version = m.get("format_version")
    if not isinstance(version, int):
        raise MoeError(f"{path}: format_version is missing; reconvert the model")
    if version > FORMAT_VERSION:
        raise MoeError(
            f"{path}: layout format {version} is newer than this moe understands ({FORMAT_VERSION}); upgrade moe"
        )
    if version < FORMAT_VERSION:
        raise MoeError(f"{path}: layout format {version} is older than {FORMAT_VERSION}; reconvert the model")
    try:
        _validate(folder, m)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise MoeError(f"{path}: malformed manifest ({type(exc).__name__}: {exc}); reconvert the model") from None
    return Layout(folder, m, _check_config(path, m))


def _check_int(v, what: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise ValueError(f"{what} must be a non-negative integer")
    return v


def _validate(folder: Path, m: dict) -> None:
    path = folder / MANIFEST
    if not isinstance(m["config"], dict):
        raise ValueError("config must be an object")
    if set(m["files"]) != {MODEL_FILE, EXPERTS_FILE}:
        raise ValueError(f"files must be {MODEL_FILE} and {EXPERTS_FILE}")
    sizes = {}
    for fname in (MODEL_FILE, EXPERTS_FILE):
        declared = _check_int(m["files"][fname]["size"], f"files.{fname}.size")
        # damage on disk is a runtime failure (exit 1), as a checksum mismatch is
        problem = not_a_file(folder / fname)
        if problem:
            raise MoeError(f"{folder / fname}: {problem}; reconvert the model", 1)
        actual = (folder / fname).stat().st_size
        if actual != declared:
            raise MoeError(f"{folder / fname}: {actual} bytes, the manifest says {declared}; the file is truncated or "
                           "altered, reconvert", 1)
        sizes[fname] = actual
    for name, e in m["tensors"].items():
        if e["file"] not in sizes:
            raise ValueError(f"tensor {name}: unknown file {e['file']!r}")
        if e["encoding"] not in ENCODINGS:
            raise ValueError(f"tensor {name}: unknown encoding {e['encoding']!r}")
        shape = e["shape"]
        if not isinstance(shape, list) or not 1 <= len(shape) <= 2 or any(_check_int(s, "shape") == 0 for s in shape):
            raise ValueError(f"tensor {name}: bad shape {shape!r}")
        if e["encoding"] in QUANT_BITS:
            gs = _check_int(e["group_size"], f"tensor {name} group_size")
            if len(shape) != 2 or gs == 0 or gs % CHUNK:
                raise ValueError(f"tensor {name}: bad group size {gs}")
        for off, n, checksum, _ in _checked_spans(e):
            _check_int(off, f"tensor {name} offset")
            _check_int(e[checksum], f"tensor {name} {checksum}")
            if off % TENSOR_ALIGN or off + n > sizes[e["file"]]:
                raise MoeError(f"{path}: tensor {name} lies outside {e['file']} or is misaligned; reconvert the model")
    runs = {}
    for layer, records in m["experts"].items():
        for j, r in enumerate(records):
            off = _check_int(r["offset"], "expert offset")
            n = _check_int(r["nbytes"], "expert nbytes")
            _check_int(r["crc32"], "expert crc32")
            if off % EXPERT_ALIGN or off + n > sizes[EXPERTS_FILE]:
                raise MoeError(f"{path}: expert {j} of layer {layer} lies outside {EXPERTS_FILE} or is misaligned; reconvert")
            runs[(layer, j)] = (off, off + n)
    for name, e in m["tensors"].items():
        key = expert_key(name)
        if key is None:
            continue
        spans = [(off, off + n) for off, n, _, _ in _checked_spans(e)]
        start, end = runs.get((str(key[0]), key[1]), (None, None))
        if start is None or e["file"] != EXPERTS_FILE or min(a for a, _ in spans) < start or max(b for _, b in spans) > end:
            raise MoeError(f"{path}: tensor {name} lies outside its expert's run; reconvert the model")


def _check_config(path: Path, m: dict) -> ModelConfig:
    """The tensors and expert runs are exactly those the manifest's config implies, 1-D tensors f32: the runtime
    sizes its buffers from the config, so a tensor of another shape would be read past its end."""
    try:
        cfg = ModelConfig.from_dict(m["config"])
    except MoeError as exc:
        raise MoeError(f"{path}: {exc.message}; reconvert the model") from None
    runs = {str(i): cfg.num_experts for i in cfg.moe_layers()}  # first: the records bound the expert count
    if {layer: len(records) for layer, records in m["experts"].items()} != runs:
        raise MoeError(f"{path}: expert runs do not match the config's {cfg.num_experts} experts in layers "
                       f"{', '.join(runs)}; reconvert the model")
    want, have = implied(cfg), m["tensors"]
    odd = sorted(want.keys() ^ have.keys())
    if odd:
        what = "is missing" if odd[0] in want else "is not one the config implies"
        raise MoeError(f"{path}: tensor {odd[0]} {what}; reconvert the model")
    for name, shape in want.items():
        e = have[name]
        if tuple(e["shape"]) != shape or (len(shape) == 1 and e["encoding"] != "f32"):
            raise MoeError(f"{path}: tensor {name} is {e['encoding']} {e['shape']}, the config implies "
                           f"{list(shape)}{' f32' if len(shape) == 1 else ''}; reconvert the model")
    return cfg


def open_layout(folder) -> Layout:
    """Validate the manifest and map model.bin and experts.bin read-only."""
    folder = Path(folder)
    layout = read_layout(folder)
    for fname in (MODEL_FILE, EXPERTS_FILE):
        with open(folder / fname, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            layout.maps[fname] = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ) if size else b""
    return layout


def verify(folder) -> list[str]:
    """Check every tensor's and every expert run's CRC-32; one line per mismatch, naming layer, expert and tensor.

    Reads with positioned reads rather than through the memory map, so checking a model bigger than
    RAM does not make it all resident.
    """
    folder = Path(folder)
    m = read_manifest(folder)
    problems = []
    fds = {fname: open_read(folder / fname) for fname in (MODEL_FILE, EXPERTS_FILE)}
    try:
        for name, e in m["tensors"].items():
            for off, n, key, what in _checked_spans(e):
                if crc32(pread(fds[e["file"]], n, off)) != e[key]:
                    problems.append(f"{_where(name)}: checksum mismatch in tensor {name}{what}")
        for layer, runs in m["experts"].items():
            for j, r in enumerate(runs):
                if crc32(pread(fds[EXPERTS_FILE], r["nbytes"], r["offset"])) != r["crc32"]:
                    if not any(p.startswith(f"layer {layer} expert {j}:") for p in problems):
                        problems.append(f"layer {layer} expert {j}: checksum mismatch in the run's padding")
    finally:
        for fd in fds.values():
            os.close(fd)
    return problems


def _where(name: str) -> str:
    key = expert_key(name)
    if key is not None:
        return f"layer {key[0]} expert {key[1]}"
    parts = name.split(".")
    if parts[0] == "layers":
        return f"layer {parts[1]}"
    return "model"
