"""`convert()`: a Hugging Face checkpoint into the layout, streamed one tensor (or one block of rows) at a time.

Sources are read through the safetensors memory maps layer by layer; each tensor's pages are
dropped from the process once written, so peak RSS stays at a few tensors whatever the
model's size. The layout is written into a temporary folder beside OUT and renamed into
place only when complete; any error, Ctrl-C or SIGTERM removes it.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ..runtime import home
from ..runtime.config import ModelConfig
from ..runtime.errors import MoeError
from ..runtime.files import MAX_JSON, decode_text, load_json, not_a_file, read_bounded
from ..runtime.layout import (
    EXPERT_ALIGN,
    MANIFEST,
    QUANT_BITS,
    TENSOR_ALIGN,
    Packed,
    padded_cols,
    stored_nbytes,
)
from ..runtime.layout_writer import LayoutWriter
from ..runtime.tensors import kind_of
from ..runtime.units import format_sizes
from . import arch as arch_registry
from . import hub, mxfp4
from .arch.common import Out, Plan, Run, Src, eos_ids
from .quant import QuantError, quantize
from .safetensors_io import Checkpoint, widen

BITS = (4, 8, 16)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json",
                   "chat_template.jinja")
ROW_BLOCK_BYTES = 32 << 20  # large tensors (embeddings, heads) are converted this many source bytes at a time
_SIXTEEN_BIT = {"BF16": "bf16", "F16": "f16", "F32": "f32", "U8": "bf16"}  # U8: MXFP4 decodes exactly to bf16


def convert(src, out=None, bits: int = 4, group_size: int = 32, revision: str | None = None,
            force: bool = False) -> Path:
    """Convert `src` (a Hub-layout folder or a Hub id) into the layout at `out`; returns the output folder.

    Experts take `bits` (4, 8 or 16); with 4 bits the other matrices get AT_4_BITS' precision, with 8
    bits q8; with 16 bits 2-D tensors keep their source encoding, as routers always do. 1-D tensors are
    always f32. `group_size` columns share one scale (layout: two-level scales).
    """
    check_options(bits, group_size)
    started = time.perf_counter()
    out = Path(out).expanduser() if out else home.default_output(str(src), bits)
    check_output(out, force)  # before any download
    source = hub.resolve(str(src), revision)
    hf = read_json(source.folder / "config.json", required=True)
    generation = read_json(source.folder / "generation_config.json") or {}
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
        encodings = {o.name: encoding_for(o, ckpt, bits) for o in plan.outs()}
        check_group_size(group_size, plan, encodings)
        check_space(out, layout_bytes(plan, encodings, group_size))
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


def read_json(path: Path, required: bool = False) -> dict | None:
    if not_a_file(path) == "missing":
        if required:
            raise MoeError(f"{path}: missing; a Hugging Face checkpoint folder needs its config.json")
        return None
    data = load_json(path, "re-download the model")
    if not isinstance(data, dict):
        raise MoeError(f"{path}: not a JSON object; re-download the model")
    return data


def check_output(out: Path, force: bool) -> None:
    if not out.exists() and not out.is_symlink():
        return
    if not force:
        raise MoeError(f"{out}: already exists; pass --force to replace it, or choose another output with -o")
    if out.is_dir() and not (out / MANIFEST).is_file() and any(out.iterdir()):
        raise MoeError(f"{out}: exists and is not a converted model; refusing to replace it even with --force")
    if not out.is_dir():
        raise MoeError(f"{out}: exists and is not a folder; refusing to replace it even with --force")


# ---- the plan against the checkpoint


def plan_for(arch, hf: dict, ckpt: Checkpoint, config_json: Path) -> Plan:
    """The architecture's plan for config.json, once its config is sound and its counts fit the weights."""
    try:
        cfg = arch.model_config(hf)
        check_config(cfg, config_json)
        check_counts(cfg, ckpt, config_json)
        return arch.plan(cfg, set(ckpt.names()))
    except (KeyError, TypeError, ValueError, ArithmeticError) as exc:
        raise MoeError(f"{config_json}: malformed ({type(exc).__name__}: {exc}); re-download the model") from None


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


def first_architecture(hf: dict) -> str | None:
    archs = hf.get("architectures")
    return archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else None


def piece_shape(ckpt: Checkpoint, s: Src) -> tuple[int, ...]:
    """The shape of one source piece after slicing, decoding and transposing, from the headers alone."""
    if s.mxfp4:
        blocks, scales = ckpt.info(s.name + "_blocks").shape, ckpt.info(s.name + "_scales").shape
        if len(blocks) < 3 or blocks[-1] != 16 or blocks[:-1] != scales:
            raise MoeError(f"{ckpt.folder}: {s.name}_blocks {list(blocks)} and _scales {list(scales)} are not MXFP4 "
                           "(blocks [..., G, 16], scales [..., G])")
        shape = (*blocks[:-2], blocks[-2] * 32)
    else:
        shape = ckpt.info(s.name).shape
    if s.expert is not None:
        if len(shape) < 2 or s.expert >= shape[0]:
            raise MoeError(f"{ckpt.folder}: {s.name} {list(shape)} has no expert {s.expert}; "
                           "config.json does not match the weights")
        shape = shape[1:]
    if s.transpose:
        shape = shape[::-1]
    return (len(range(s.start, shape[0], s.step)), *shape[1:]) if shape else shape


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
                dtype = ckpt.info(n).dtype
                if dtype not in (("U8",) if s.mxfp4 else ("BF16", "F16", "F32")):
                    raise MoeError(f"{folder}: tensor {n} has dtype {dtype}, which moe cannot convert")
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


# With --bits 4 every matrix besides the experts (attention, the head, embeddings, shared and dense MLPs) is q5,
# but attention's output projection, which costs the most per byte, q6: the trade that kept 4-bit/16-bit
# perplexity at or below llama.cpp's Q4_K_M on three of the four trained models of ../shared/models, their
# folders within its files on three, and attention and the head near Q4_0's bytes per token on OLMoE (README:
# the 4-bit scheme). With --bits 8 they are q8. Routers keep their source encoding (exact), 1-D tensors f32.
AT_4_BITS = {"attention": "q5", "attention_output": "q6", "lm_head": "q5", "embeddings": "q5",
             "shared_expert": "q5", "dense_mlp": "q5"}


def encoding_for(o: Out, ckpt: Checkpoint, bits: int) -> str:
    if len(o.shape) == 1:
        return "f32"
    kind = kind_of(o.name)
    if bits == 16 or kind == "router":
        found = {_SIXTEEN_BIT[ckpt.info(s.sources()[0]).dtype] for s in o.srcs}
        return found.pop() if len(found) == 1 else "f32"
    if kind == "experts":
        return f"q{bits}"
    if bits == 8:
        return "q8"
    return AT_4_BITS.get(kind, "q8")


def quantization_info(bits: int, group_size: int, encodings: dict[str, str]) -> dict:
    """The encodings chosen, by tensor kind (experts, attention, router, ...), as the manifest states them."""
    by_kind: dict[str, set[str]] = {}
    for name, enc in encodings.items():
        by_kind.setdefault(kind_of(name), set()).add(enc)
    info = {"bits": bits, "group_size": group_size if bits != 16 else None,
            "scheme": "symmetric, one scale per group of group_size columns: int8 times a bfloat16 per 8 groups"
            if bits != 16 else
            "16-bit source values unchanged"}
    info.update({k: ", ".join(sorted(v)) for k, v in sorted(by_kind.items())})
    return info


def layout_bytes(plan: Plan, encodings: dict[str, str], group_size: int) -> int:
    """What the layout's two files will take (within alignment padding)."""
    def nbytes(o: Out) -> int:
        entry = {"encoding": encodings[o.name], "shape": list(o.shape), "group_size": group_size}
        return stored_nbytes(entry) + 2 * TENSOR_ALIGN

    total = 0
    for item in plan.items:
        if isinstance(item, Run):
            total += -(-sum(nbytes(o) for o in item.outs) // EXPERT_ALIGN) * EXPERT_ALIGN
        else:
            total += nbytes(item)
    return total


def check_space(out: Path, need: int) -> None:
    parent = next((p for p in (out.parent, *out.parent.parents) if p.exists()), Path("/"))
    free = shutil.disk_usage(parent).free
    if free < need:
        has, needs = format_sizes(free, need)
        raise MoeError(f"{parent}: {has} free, the converted model needs {needs}; free some space or choose another "
                       "output with -o", 1)


# ---- reading and encoding


def tokenizer_info(folder: Path) -> dict:
    if not (folder / "tokenizer.json").is_file():
        raise MoeError(f"{folder}: no tokenizer.json; moe needs the Hugging Face (fast) tokenizer file next to the weights")
    config = read_json(folder / "tokenizer_config.json") or {}
    special = read_json(folder / "special_tokens_map.json") or {}
    template = config.get("chat_template")
    if (folder / "chat_template.jinja").is_file():
        path = folder / "chat_template.jinja"
        template = decode_text(read_bounded(path, MAX_JSON, "re-download the model"), str(path))  # the manifest holds it
    elif isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t["name"]: t.get("template") for t in template if isinstance(t, dict) and isinstance(t.get("name"), str)}
        template = named.get("default", next(iter(named.values()), None))
    bos = _token_text(config.get("bos_token", special.get("bos_token")))
    add_bos = config.get("add_bos_token")
    if not isinstance(add_bos, bool):
        add_bos = bos is not None and _post_processor_adds(folder / "tokenizer.json", bos)
    return {
        "files": [f for f in TOKENIZER_FILES if (folder / f).is_file()],
        "chat_template": template if isinstance(template, str) else None,
        "bos_token": bos,
        "eos_token": _token_text(config.get("eos_token", special.get("eos_token"))),
        "add_bos_token": add_bos,
    }


def _token_text(token) -> str | None:
    if isinstance(token, dict):  # a serialized AddedToken
        token = token.get("content")
    return token if isinstance(token, str) else None


def _copy_tokenizer_file(src: Path, dst: Path) -> None:
    """Copy src; tokenizer.json without its indentation (Hub files are pretty-printed: 257 kB of the
    trained models' becomes 101 kB, which is a tenth of such a model's whole layout)."""
    if src.name != "tokenizer.json":
        shutil.copyfile(src, dst)
        return
    data = load_json(src, "use the tokenizer.json the model was published with")
    dst.write_text(json.dumps(data, ensure_ascii=False, separators=(",", ":")), encoding="utf-8")


def _post_processor_adds(tokenizer_json: Path, token: str) -> bool:
    """Whether tokenizer.json's post-processor puts `token` first (Llama 3 / 4 style BOS), absent add_bos_token."""
    data = load_json(tokenizer_json, "re-download the model")
    try:
        post = data.get("post_processor") or {}
        processors = post.get("processors", [post]) if post.get("type") == "Sequence" else [post]
        for p in processors:
            single = p.get("single") if p.get("type") == "TemplateProcessing" else None
            if single and single[0].get("SpecialToken", {}).get("id") == token:
                return True
    except (AttributeError, TypeError, KeyError, IndexError):
        raise MoeError(f"{tokenizer_json}: not a valid tokenizer file (JSON with a post_processor object); "
                       "re-download the model") from None
    return False


def piece(ckpt: Checkpoint, s: Src) -> tuple[np.ndarray, str]:
    """One source piece as raw values (bf16 as uint16 words) and its safetensors dtype; views where possible."""
    if s.mxfp4:
        blocks, scales = ckpt.raw(s.name + "_blocks"), ckpt.raw(s.name + "_scales")
        if s.expert is not None:
            blocks, scales = blocks[s.expert], scales[s.expert]
        a, dtype = mxfp4.decode_bf16(blocks, scales), "BF16"  # (out, in)
    else:
        a, dtype = ckpt.raw(s.name), ckpt.info(s.name).dtype
        if s.expert is not None:
            a = a[s.expert]
    if s.transpose:
        a = a.T
    return (a[s.start::s.step] if s.step != 1 or s.start else a), dtype


def release(ckpt: Checkpoint, s: Src) -> None:
    for name in s.sources():
        t = ckpt.info(name)
        if s.expert is None:
            ckpt.release(name)
        else:
            per = t.nbytes // t.shape[0]
            ckpt.release(name, s.expert * per, (s.expert + 1) * per)


def gather(ckpt: Checkpoint, o: Out) -> tuple[np.ndarray, str]:
    """The layout tensor's source values: its pieces stacked by rows (widened to f32 if their dtypes differ)."""
    pieces = [piece(ckpt, s) for s in o.srcs]
    if len(pieces) == 1:
        return pieces[0]
    if len({d for _, d in pieces}) > 1:
        pieces = [(widen(a, d), "F32") for a, d in pieces]
    return np.concatenate([a for a, _ in pieces]), pieces[0][1]


def encode(raw: np.ndarray, dtype: str, encoding: str, group_size: int, err: QuantError) -> Packed:
    if encoding in QUANT_BITS:
        packed, e = quantize(raw, dtype, QUANT_BITS[encoding], group_size)
        err.add(e)
        return packed
    if encoding == "f32":
        values = raw if dtype == "F32" else widen(raw, dtype)
        return Packed("f32", raw.shape, values)
    return Packed(encoding, raw.shape, raw)  # bf16 / f16 words unchanged


def blocks_of(ckpt: Checkpoint, o: Out, encoding: str, group_size: int, err: QuantError):
    """The Packed row blocks of one layout tensor; a large plain tensor is read ROW_BLOCK_BYTES at a time."""
    s = o.srcs[0]
    plain = len(o.srcs) == 1 and s == Src(s.name)
    if not plain or ckpt.info(s.name).nbytes <= ROW_BLOCK_BYTES:
        raw, dtype = gather(ckpt, o)
        yield encode(raw, dtype, encoding, group_size, err)
        return
    raw, dtype = piece(ckpt, s)
    row_bytes = raw[0].nbytes
    step = max(1, ROW_BLOCK_BYTES // row_bytes)
    for r0 in range(0, raw.shape[0], step):
        yield encode(raw[r0: r0 + step], dtype, encoding, group_size, err)
        ckpt.release(s.name, r0 * row_bytes, min(r0 + step, raw.shape[0]) * row_bytes)


# ---- writing


class _Progress:
    """Bytes of source converted, per tensor: a rich bar on stderr when it is a terminal, else nothing."""

    def __init__(self, total: int):
        self.bar = None
        if sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self.bar = Progress(TextColumn("{task.description:<28}"), BarColumn(), DownloadColumn(),
                                TransferSpeedColumn(), TimeRemainingColumn(), console=Console(stderr=True),
                                transient=True)
            self.task = self.bar.add_task("converting", total=total)
            self.bar.start()

    def advance(self, nbytes: int, name: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, advance=nbytes, description=name)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _source_nbytes(ckpt: Checkpoint, o: Out) -> int:
    total = 0
    for s in o.srcs:
        for name in s.sources():
            t = ckpt.info(name)
            total += (t.nbytes // t.shape[0] if s.expert is not None else t.nbytes) // s.step
    return total


@contextmanager
def _sigterm_as_exit():
    """SIGTERM raises SystemExit (so cleanup runs) instead of killing the process outright; a handler already
    in place (the CLI's, which says "terminated") is kept."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def write_layout(out: Path, force: bool, plan: Plan, ckpt: Checkpoint, encodings: dict[str, str], group_size: int,
                 manifest: dict, folder: Path, started: float) -> None:
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    writer = None
    progress = _Progress(sum(_source_nbytes(ckpt, o) for o in plan.outs()))
    try:
        with _sigterm_as_exit():
            out.parent.mkdir(parents=True, exist_ok=True)
            _remove_stale_partials(out)
            tmp.mkdir()
            writer = LayoutWriter(tmp)
            errors = _write_tensors(writer, plan, ckpt, encodings, group_size, progress)
            for f in manifest["tokenizer"]["files"]:
                _copy_tokenizer_file(folder / f, tmp / f)
            manifest["stats"] = _stats(ckpt, errors, time.perf_counter() - started)
            writer.finish(manifest)
            writer = None
            _move_into_place(tmp, out, force)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            raise MoeError(f"{out.parent}: no space left for the converted model ({exc.strerror}); free some space "
                           "or choose another output with -o", 1) from None
        raise MoeError(f"{exc.filename or out}: cannot write the converted model ({exc.strerror})", 1) from None
    finally:
        progress.close()
        if writer is not None:
            writer.abort()
        shutil.rmtree(tmp, ignore_errors=True)


def _remove_stale_partials(out: Path) -> None:
    """Temporary folders of conversions into `out` whose process is gone (killed outright, or the machine
    stopped), and this process's own from an earlier call."""
    for partial in out.parent.glob(f".{out.name}.partial-*"):
        pid = partial.name.rsplit("-", 1)[1]
        if pid.isdigit() and int(pid) < 2**31 and (int(pid) == os.getpid() or not _running(int(pid))):
            shutil.rmtree(partial, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _write_tensors(writer: LayoutWriter, plan: Plan, ckpt: Checkpoint, encodings: dict[str, str], group_size: int,
                   progress: _Progress) -> dict[str, QuantError]:
    errors: dict[str, QuantError] = {}

    def write(o: Out) -> None:
        enc = encodings[o.name]
        err = errors[o.name] = QuantError()
        writer.add_rows(o.name, enc, o.shape, blocks_of(ckpt, o, enc, group_size, err), group_size)
        for s in o.srcs:
            release(ckpt, s)
        progress.advance(_source_nbytes(ckpt, o), o.name)

    for item in plan.items:
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
        groups["experts" if kind_of(name) == "experts" else "other"].add(e)
    worst = max(errors.items(), key=lambda kv: kv[1].rel_rms, default=None)
    return {
        "source_bytes": ckpt.nbytes,
        "seconds": round(seconds, 3),
        "quant_error": {k: {"rel_rms": g.rel_rms, "max_abs": g.max_abs} for k, g in groups.items() if g.sum_x2},
        "worst": None if worst is None else {"tensor": worst[0], "rel_rms": worst[1].rel_rms,
                                             "max_abs": worst[1].max_abs},
    }


def _move_into_place(tmp: Path, out: Path, force: bool) -> None:
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if force and (out.exists() or out.is_symlink()):
        os.replace(out, old) if not out.is_symlink() else out.unlink()
    try:
        os.rename(tmp, out)
    except OSError as exc:
        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise MoeError(f"{out}: appeared while converting; pass --force to replace it", 2) from None
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


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
