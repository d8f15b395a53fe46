"""`convert()`: a Hugging Face checkpoint into the layout, streamed one tensor (or one block of rows) at a time.

Sources are read through the safetensors memory maps layer by layer; each tensor's pages are
dropped from the process once written, so peak RSS stays at a few tensors whatever the
model's size. The checks before writing: moe.convert.checks; the encoding of each tensor:
moe.convert.encoding; the temporary folder it is written into: moe.convert.output.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ..runtime import home
from ..runtime.errors import MoeError
from ..runtime.files import load_json
from ..runtime.layout import MANIFEST, QUANT_BITS, Packed
from ..runtime.layout_writer import LayoutWriter
from ..runtime.tensors import EXPERTS, kind_of
from . import arch as arch_registry
from . import fp8, hub, mxfp4
from .arch.common import Out, Plan, Run, Src, eos_ids, outs_of
from .checks import (
    check_config,
    check_group_size,
    check_options,
    check_output,
    check_plan,
    check_space,
    plan_for,
)
from .encoding import encodings_for, place, quantization_info
from .output import Progress, partial_folder
from .quant import QuantError, quantize
from .safetensors_io import Checkpoint, raw_to_f32
from .tokenizer_facts import copy_tokenizer_file, tokenizer_info

# large tensors (embeddings, heads, FP8 matrices) are converted this many bytes of source values at a time (FP8 codes
# counted as the float32 they decode to)
ROW_BLOCK_BYTES = 32 << 20


def convert(src, out=None, bits: int = 4, group_size: int = 32, revision: str | None = None,
            force: bool = False) -> Path:
    """Convert `src` (a Hub-layout folder or a Hub id) into the layout at `out`; returns the output folder.

    Experts take `bits` (4, 8 or 16), the other tensors what encoding.encoding_for chooses at those bits.
    `group_size` columns share one scale (layout: two-level scales).
    """
    check_options(bits, group_size)
    started = time.perf_counter()
    out = Path(out).expanduser() if out else home.default_output(str(src), bits)
    check_output(out, force)  # before any download
    source = hub.resolve(str(src), revision)
    hf = hub.read_json(source.folder / "config.json", required=True)
    generation = hub.read_json(source.folder / "generation_config.json") or {}
    arch = arch_registry.for_config(hf)
    with Checkpoint(source.folder) as ckpt:
        plan = plan_for(arch, hf, ckpt, source.folder / "config.json")
        cfg = plan.config
        cfg.eos_token_ids = eos_ids(cfg.eos_token_ids, generation.get("eos_token_id"))
        if cfg.bos_token_id is None and isinstance(generation.get("bos_token_id"), int):
            cfg.bos_token_id = generation["bos_token_id"]
        check_config(cfg, source.folder / "config.json")
        check_plan(plan, ckpt, source.folder)
        tokenizer = tokenizer_info(source.folder)
        encodings = encodings_for(plan, ckpt, bits)
        check_group_size(group_size, plan, encodings)
        check_space(out, output_bytes(plan, encodings, group_size, source.folder, tokenizer))
        manifest = {
            "architecture": cfg.architecture,
            "config": cfg.to_dict(),
            "quantization": quantization_info(bits, group_size, encodings),
            "source": {"id": source.id, "revision": source.revision,
                       "hf_architecture": first_architecture(hf)},
            "tokenizer": tokenizer,
        }
        write_layout(out, force, plan, ckpt, encodings, group_size, manifest, source.folder, started)
    return out


# A manifest record (one tensor's or one expert run's place, encoding and checksums) takes less than this.
MANIFEST_RECORD_BYTES = 256


def output_bytes(plan: Plan, encodings: dict[str, str], group_size: int, folder: Path, tokenizer: dict) -> int:
    """The most the converted folder takes: the layout's two files exactly (the writer's placement), the
    tokenizer files as the source has them (tokenizer.json is written without its indentation) and the
    manifest's records, with the chat template it holds."""
    layout = sum(place(plan, encodings, group_size).file_sizes().values())
    tokenizer_files = sum((folder / f).stat().st_size for f in tokenizer["files"])
    records = len(encodings) + sum(isinstance(item, Run) for item in plan.items)
    return layout + tokenizer_files + MANIFEST_RECORD_BYTES * records + len(tokenizer["chat_template"] or "")


def first_architecture(hf: dict) -> str | None:
    archs = hf.get("architectures")
    return archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else None


# ---- reading


def piece(ckpt: Checkpoint, s: Src) -> tuple[np.ndarray, str]:
    """One source piece as raw values (bf16 as uint16 words) and its safetensors dtype; views where possible."""
    if s.mxfp4:
        blocks, scales = ckpt.raw(s.name + "_blocks"), ckpt.raw(s.name + "_scales")
        if s.expert is not None:
            blocks, scales = blocks[s.expert], scales[s.expert]
        a, dtype = mxfp4.decode_bf16(blocks, scales), "BF16"  # (out, in)
    elif s.fp8_block:
        a, dtype = fp8_rows(ckpt, s), "F32"  # (out, in)
    else:
        a, dtype = ckpt.raw(s.name), ckpt.info(s.name).dtype
        if s.expert is not None:
            a = a[s.expert]
    if s.transpose:
        a = a.T
    if s.flatten:
        a = a.reshape(a.shape[0], -1)
    if s.block > 1:
        return np.concatenate([a[r: r + s.block] for r in range(s.start, a.shape[0], s.step)]), dtype
    return (a[s.start::s.step] if s.step != 1 or s.start else a), dtype


def fp8_rows(ckpt: Checkpoint, s: Src, r0: int = 0, r1: int | None = None) -> np.ndarray:
    """Rows r0..r1 of FP8 piece `s` (of its expert's slice), dequantized to float32 as stored (out, in)."""
    codes, scales = ckpt.raw(s.name), ckpt.raw(s.name + fp8.SCALE_SUFFIX)
    if s.expert is not None:
        codes, scales = codes[s.expert], scales[s.expert]
    codes = codes[r0:r1]
    values = fp8.dequantize(codes, raw_to_f32(scales, ckpt.info(s.name + fp8.SCALE_SUFFIX).dtype), s.fp8_block, r0)
    if not np.isfinite(values).all():
        where = f"tensor {s.name}" + ("" if s.expert is None else f" (expert {s.expert})")
        nans = fp8.nan_codes(codes)
        what = (f"{nans} FP8 NaN code{'s' * (nans > 1)}" if nans else
                f"values that overflow or are NaN through their scales in {s.name}{fp8.SCALE_SUFFIX}")
        raise MoeError(f"{ckpt.folder}: {where} holds {what}; the checkpoint is corrupt: re-download it")
    return values


def source_ranges(ckpt: Checkpoint, s: Src):
    """(tensor, first byte, end byte) of what piece `s` reads: a whole tensor, or its expert's slice."""
    for name in s.sources():
        t = ckpt.info(name)
        per = t.nbytes // t.shape[0] if s.expert is not None else t.nbytes
        first = s.expert * per if s.expert is not None else 0
        yield name, first, first + per


def gather(ckpt: Checkpoint, o: Out) -> tuple[np.ndarray, str]:
    """The layout tensor's source values: its pieces stacked by rows (widened to f32 if their dtypes differ)."""
    pieces = [piece(ckpt, s) for s in o.srcs]
    if len(pieces) == 1:
        return pieces[0]
    if len({d for _, d in pieces}) > 1:
        pieces = [(raw_to_f32(a, d), "F32") for a, d in pieces]
    return np.concatenate([a for a, _ in pieces]), pieces[0][1]


def encode(raw: np.ndarray, dtype: str, encoding: str, group_size: int, err: QuantError) -> Packed:
    if encoding in QUANT_BITS:
        packed, e = quantize(raw, dtype, QUANT_BITS[encoding], group_size)
        err.add(e)
        return packed
    if encoding == "f32":
        values = raw if dtype == "F32" else raw_to_f32(raw, dtype)
        return Packed("f32", raw.shape, values)
    return Packed(encoding, raw.shape, raw)  # bf16 / f16 words unchanged


def blocks_of(ckpt: Checkpoint, o: Out, encoding: str, group_size: int, err: QuantError):
    """The Packed row blocks of one layout tensor; a large tensor of one whole source, stored as it is or as FP8, is
    read ROW_BLOCK_BYTES at a time."""
    s = o.srcs[0]
    plain = len(o.srcs) == 1 and s == Src(s.name, fp8_block=s.fp8_block)
    widen = 4 if s.fp8_block else 1  # an FP8 code decodes to a float32
    if not plain or ckpt.info(s.name).nbytes * widen <= ROW_BLOCK_BYTES:
        raw, dtype = gather(ckpt, o)
        yield encode(raw, dtype, encoding, group_size, err)
        return
    t = ckpt.info(s.name)
    rows = t.shape[0]
    row_bytes = t.nbytes // rows
    step = max(1, ROW_BLOCK_BYTES // (row_bytes * widen))
    for r0 in range(0, rows, step):
        if s.fp8_block:
            raw, dtype = fp8_rows(ckpt, s, r0, r0 + step), "F32"
        else:
            raw, dtype = ckpt.raw(s.name)[r0: r0 + step], t.dtype
        yield encode(raw, dtype, encoding, group_size, err)
        ckpt.release(s.name, r0 * row_bytes, min(r0 + step, rows) * row_bytes)


# ---- writing


def _source_nbytes(ckpt: Checkpoint, o: Out) -> int:
    total = 0
    for s in o.srcs:
        for name in s.sources():
            t = ckpt.info(name)
            total += (t.nbytes // t.shape[0] if s.expert is not None else t.nbytes) * s.block // s.step
    return total


def write_layout(out: Path, force: bool, plan: Plan, ckpt: Checkpoint, encodings: dict[str, str], group_size: int,
                 manifest: dict, folder: Path, started: float) -> None:
    progress = Progress(sum(_source_nbytes(ckpt, o) for o in plan.outs()))
    try:
        with partial_folder(out, force) as tmp:
            writer = LayoutWriter(tmp)
            try:
                errors = _write_tensors(writer, plan, ckpt, encodings, group_size, progress)
                for f in manifest["tokenizer"]["files"]:
                    copy_tokenizer_file(folder / f, tmp / f)
                manifest["stats"] = _stats(ckpt, errors, time.perf_counter() - started)
                writer.finish(manifest)
            except BaseException:
                writer.abort()
                raise
    finally:
        progress.close()


def _write_tensors(writer: LayoutWriter, plan: Plan, ckpt: Checkpoint, encodings: dict[str, str], group_size: int,
                   progress: Progress) -> dict[str, QuantError]:
    errors: dict[str, QuantError] = {}

    def write(o: Out) -> None:
        enc = encodings[o.name]
        err = errors[o.name] = QuantError()
        writer.add_rows(o.name, enc, o.shape, blocks_of(ckpt, o, enc, group_size, err), group_size)
        for s in o.srcs:
            for name, first, end in source_ranges(ckpt, s):
                ckpt.release(name, first, end)
        progress.advance(_source_nbytes(ckpt, o), o.name)

    for item, following in zip(plan.items, [*plan.items[1:], None], strict=True):
        for o in outs_of(following) if following is not None else ():
            for s in o.srcs:  # the next item's source read from storage while this one is quantized
                for name, first, end in source_ranges(ckpt, s):
                    ckpt.prefetch(name, first, end)
        if isinstance(item, Run):
            writer.begin_expert(item.layer, item.expert)
            for o in item.outs:
                write(o)
            writer.end_expert()
        else:
            write(item)
    return {name: e for name, e in errors.items() if e.sum_x2 > 0}


def _stats(ckpt: Checkpoint, errors: dict[str, QuantError], seconds: float) -> dict:
    """Source size, time, and quantization error: overall for experts and the rest, and the worst tensor."""
    groups = {"experts": QuantError(), "other": QuantError()}
    for name, e in errors.items():
        groups["experts" if kind_of(name) == EXPERTS else "other"].add(e)
    worst = max(errors.items(), key=lambda kv: kv[1].rel_rms, default=None)
    return {
        "source_bytes": ckpt.nbytes,
        "seconds": round(seconds, 3),
        "quant_error": {k: {"rel_rms": g.rel_rms, "max_abs": g.max_abs} for k, g in groups.items() if g.sum_x2},
        "worst": None if worst is None else {"tensor": worst[0], "rel_rms": worst[1].rel_rms,
                                             "max_abs": worst[1].max_abs},
    }


def summary(model: Path) -> str:
    """One line on a finished conversion: size before and after, time, worst quantization error."""
    m = load_json(Path(model) / MANIFEST, "reconvert the model")
    stats = m.get("stats", {})
    after = sum(f["size"] for f in m["files"].values())
    line = (f"{m['source']['id']} -> {model}: {_human(stats.get('source_bytes', 0))} -> {_human(after)} "
            f"in {stats.get('seconds', 0):.1f} s")
    worst = stats.get("worst")
    if worst:
        line += f"; worst quantization error {worst['rel_rms']:.2%} RMS ({worst['tensor']})"
    return line


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"
