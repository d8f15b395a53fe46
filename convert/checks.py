"""The checks a conversion makes before writing: its options, its output, and the plan against the config and
the checkpoint's headers (every tensor present with the shape and dtype the config implies, none left over)."""

from __future__ import annotations

import dataclasses
import math
import shutil
from pathlib import Path

from ..runtime.config import ModelConfig
from ..runtime.errors import MoeError
from ..runtime.layout import MANIFEST, QUANT_BITS, padded_cols
from ..runtime.units import format_sizes
from . import fp8
from .arch.common import Out, Plan, Run, Src
from .safetensors_io import Checkpoint

BITS = (4, 8, 16)


def check_options(bits: int, group_size: int) -> None:
    if bits not in BITS:
        raise MoeError(f"--bits {bits}: must be 4, 8 or 16")
    if not isinstance(group_size, int) or group_size <= 0 or group_size % 32:
        raise MoeError(f"--group-size {group_size}: must be a positive multiple of 32 (32, 64, 128...)")


def check_group_size(group_size: int, plan: Plan, encodings: dict[str, str]) -> None:
    """Rows are padded to whole groups: a group size may pad no quantized row more than 32 does (4096 on the
    demo wrote 62 MB from a 12 MB source)."""
    widths = sorted({o.shape[-1] for o in plan.outs() if encodings[o.name] in QUANT_BITS})
    allowed = [g for g in range(32, max(widths, default=0) + 1, 32)
               if all(padded_cols(w, g) == padded_cols(w, 32) for w in widths)]
    if widths and group_size not in allowed:  # no widths: nothing quantized (--bits 16)
        raise MoeError(f"--group-size {group_size}: pads this model's rows ({', '.join(map(str, widths))} columns) "
                       f"more than --group-size 32 does; give one of {', '.join(map(str, allowed))}")


def check_output(out: Path, force: bool) -> None:
    if not out.exists() and not out.is_symlink():
        return
    if not force:
        raise MoeError(f"{out}: already exists; pass --force to replace it, or choose another output with -o")
    if out.is_dir() and not (out / MANIFEST).is_file() and any(out.iterdir()):
        raise MoeError(f"{out}: exists and is not a converted model; refusing to replace it even with --force")
    if not out.is_dir():
        raise MoeError(f"{out}: exists and is not a folder; refusing to replace it even with --force")


def check_space(out: Path, need: int) -> None:
    parent = next((p for p in (out.parent, *out.parent.parents) if p.exists()), Path("/"))
    free = shutil.disk_usage(parent).free
    if free < need:
        has, needs = format_sizes(free, need)
        raise MoeError(f"{parent}: {has} free, the converted model needs {needs}; free some space or choose another "
                       "output with -o", 1)


def plan_for(arch, hf: dict, ckpt: Checkpoint, config_json: Path) -> Plan:
    """The architecture's plan for config.json, once its config is sound and its counts fit the weights."""
    try:
        cfg = arch.model_config(hf)
        check_config(cfg, config_json)
        check_counts(cfg, ckpt, config_json)
        plan = arch.plan(cfg, set(ckpt.names()))
    except (KeyError, TypeError, ValueError, ArithmeticError) as exc:
        raise MoeError(f"{config_json}: malformed ({type(exc).__name__}: {exc}); re-download the model") from None
    return with_fp8_scales(plan, hf, ckpt, config_json)


def with_fp8_scales(plan: Plan, hf: dict, ckpt, config_json) -> Plan:
    """The plan with every piece stored as FP8 (one beside a `<name>_scale_inv`) marked with the block size of
    config.json's quantization_config; the plan itself when the checkpoint (a Checkpoint or plan.Headers) holds
    no FP8."""
    names = ckpt.names()
    scaled = {n.removesuffix(fp8.SCALE_SUFFIX) for n in names if n.endswith(fp8.SCALE_SUFFIX)}
    if not scaled and not any(ckpt.info(n).dtype.startswith("F8_") for n in names):
        return plan
    block = fp8.block_size(hf, config_json)

    def marked(o: Out) -> Out:
        srcs = tuple(dataclasses.replace(s, fp8_block=block) if s.name in scaled else s for s in o.srcs)
        return dataclasses.replace(o, srcs=srcs)

    items = [dataclasses.replace(item, outs=tuple(map(marked, item.outs))) if isinstance(item, Run) else marked(item)
             for item in plan.items]
    return dataclasses.replace(plan, items=items)


def check_config(cfg: ModelConfig, config_json: Path) -> None:
    try:
        cfg.check()
    except MoeError as exc:
        raise MoeError(f"{config_json}: {exc.message.removeprefix('config: ')}; fix or re-download it") from None


def check_counts(cfg: ModelConfig, ckpt: Checkpoint, config_json: Path) -> None:
    """No more layers and experts than the weights can hold, before a plan of that many entries is built: each
    layer has tensors of its own, each expert of each layer a tensor or a slice of a fused [E, ...] tensor."""
    slots = len(ckpt.tensors) + sum(t.shape[0] for t in ckpt.tensors.values() if len(t.shape) >= 3)
    runs = len(cfg.moe_layers()) * cfg.num_experts
    if cfg.num_layers > len(ckpt.tensors) or runs > slots:
        raise MoeError(f"{config_json}: {cfg.num_layers} layers of {cfg.num_experts} experts, more than the "
                       f"{len(ckpt.tensors)} tensors of the weights can hold; config.json does not match the weights")


def piece_shape(ckpt: Checkpoint, s: Src) -> tuple[int, ...]:
    """The shape of one source piece after slicing, decoding and transposing, from the headers alone."""
    if s.mxfp4:
        blocks, scales = ckpt.info(s.name + "_blocks").shape, ckpt.info(s.name + "_scales").shape
        if len(blocks) < 3 or blocks[-1] != 16 or blocks[:-1] != scales:
            raise MoeError(f"{ckpt.folder}: {s.name}_blocks {list(blocks)} and _scales {list(scales)} are not MXFP4 "
                           "(blocks [..., G, 16], scales [..., G])")
        shape = (*blocks[:-2], blocks[-2] * 32)
    elif s.fp8_block:
        shape, scales = ckpt.info(s.name).shape, ckpt.info(s.name + fp8.SCALE_SUFFIX).shape
        if len(shape) != (2 if s.expert is None else 3):  # a matrix, or a fused [E, rows, cols] of experts
            raise MoeError(f"{ckpt.folder}: tensor {s.name} {list(shape)} has FP8 scales but is not the matrix "
                           "config.json implies; moe dequantizes FP8 matrices only")
        if scales != fp8.scale_shape(shape, s.fp8_block):
            raise MoeError(f"{ckpt.folder}: {s.name}{fp8.SCALE_SUFFIX} {list(scales)} does not scale {s.name} "
                           f"{list(shape)} in blocks of {list(s.fp8_block)} (which takes "
                           f"{list(fp8.scale_shape(shape, s.fp8_block))}); config.json's weight_block_size does not "
                           "match the weights")
    else:
        shape = ckpt.info(s.name).shape
    if s.expert is not None:
        if len(shape) < 2 or s.expert >= shape[0]:
            raise MoeError(f"{ckpt.folder}: {s.name} {list(shape)} has no expert {s.expert}; "
                           "config.json does not match the weights")
        shape = shape[1:]
    if s.transpose:
        shape = shape[::-1]
    if s.flatten and shape:
        shape = (shape[0], math.prod(shape[1:]))
    if not shape:
        return shape
    starts = range(s.start, shape[0], s.step)  # blocks of s.block rows; those that would run past the end are cut
    whole = len(range(s.start, max(s.start, shape[0] - s.block + 1), s.step))
    return (whole * s.block + sum(shape[0] - r for r in starts[whole:]), *shape[1:])


def check_dtype(s: Src, name: str, dtype: str, folder) -> None:
    """Source `name` of piece `s` has a dtype its decoding reads."""
    weight = name == s.name
    if s.mxfp4:
        accepted = ("U8",)
    elif s.fp8_block:
        accepted = (fp8.DTYPE,) if weight else fp8.SCALE_DTYPES
    else:
        accepted = ("BF16", "F16", "F32")
    if dtype in accepted:
        return
    if dtype == fp8.DTYPE and not s.fp8_block:
        raise MoeError(f"{folder}: tensor {name} is FP8 ({dtype}) but its scales {name}{fp8.SCALE_SUFFIX} are "
                       "missing; the checkpoint is incomplete: re-download it")
    if dtype.startswith("F8_") or (s.fp8_block and weight):
        raise MoeError(f"{folder}: tensor {name} has dtype {dtype}; moe converts FP8 weights stored as {fp8.DTYPE} "
                       f"(float8_e4m3fn) beside their {fp8.SCALE_SUFFIX} scales only")
    raise MoeError(f"{folder}: tensor {name} has dtype {dtype}, which moe cannot convert"
                   + (f" as FP8 scales (it reads {', '.join(accepted)})" if s.fp8_block else ""))


def check_plan(plan: Plan, ckpt: Checkpoint, folder: Path) -> None:
    """Every tensor the plan needs exists with the shape config.json implies, and every tensor is used or skipped."""
    names = set(ckpt.names())
    for o in plan.outs():
        shapes = []
        for s in o.srcs:
            for n in s.sources():
                if n not in names:
                    raise MoeError(f"{folder}: tensor {n} is missing; the checkpoint is incomplete or its config.json "
                                   "describes another model")
                check_dtype(s, n, ckpt.info(n).dtype, folder)
            shapes.append(piece_shape(ckpt, s))
        trailing = {sh[1:] for sh in shapes}
        got = (sum(sh[0] for sh in shapes), *shapes[0][1:]) if len(trailing) == 1 and shapes[0] else None
        if got != tuple(o.shape):
            pieces = ", ".join(f"{s.name} {list(sh)}" for s, sh in zip(o.srcs, shapes, strict=True))
            raise MoeError(f"{folder}: config.json implies {list(o.shape)} for {o.name}, the weights give {pieces}; "
                           "config.json does not match the weights")
    leftover = sorted(names - plan.used() - plan.skipped)
    if leftover:
        more = f" and {len(leftover) - 1} more" if len(leftover) > 1 else ""
        raise MoeError(f"{folder}: tensor {leftover[0]}{more} not expected for a {plan.config.architecture} model "
                       "with this config.json; the weights and config do not match")
