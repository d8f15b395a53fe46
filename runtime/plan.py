"""`moe plan`: what a checkpoint becomes and needs, from its config.json and safetensors headers alone.

No weight is read or downloaded. A local folder's headers come from its files; a Hub id's through
huggingface_hub: config.json and the shard index are downloaded, each shard's header is fetched by
an HTTP range request (`HfApi.get_safetensors_metadata`). Sizes are the converter's own: the
architecture's plan, its encoding choice per tensor, and the layout writer's placement rules, so
`layout_bytes` equals the converted model's model.bin + experts.bin to the byte.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from ..convert import arch as arch_registry
from ..convert.arch.common import Plan, Run
from ..convert.converter import check_options, check_plan, encoding_for, read_json
from ..convert.hub import check_weights, hub_errors, local_folder
from ..convert.safetensors_io import DTYPES, INDEX, Checkpoint, TensorInfo
from .errors import MoeError
from .tensors import kind_of
from .layout import EXPERT_ALIGN, EXPERTS_FILE, MODEL_FILE, TENSOR_ALIGN, align, expected_nbytes
from .model import DEFAULT_MAX_CONTEXT

RUNTIME_BYTES = 300 * 10**6  # Python, numpy, numba and the kernels' buffers: peak RSS of a tiny model's decode
F32 = 4


@dataclass
class Headers:
    """A checkpoint known by its headers only: what planning asks of safetensors_io.Checkpoint."""

    folder: str  # the folder or Hub id, for messages
    tensors: dict[str, TensorInfo]
    source_id: str = ""
    revision: str | None = None

    def names(self) -> list[str]:
        return list(self.tensors)

    def info(self, name: str) -> TensorInfo:
        return self.tensors[name]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


@dataclass
class Placement:
    """Where the converter would put every tensor: file sizes and each expert run's length."""

    model_bytes: int  # model.bin
    experts_bytes: int  # experts.bin, padded to a whole page
    runs: dict[tuple[int, int], int] = field(default_factory=dict)  # (layer, expert) -> run bytes


def read_source(src: str, revision: str | None = None) -> tuple[dict, Headers]:
    """(config.json, headers) of a local Hub-layout folder or a Hub id; no weight is read."""
    path = local_folder(src, revision)
    if path is not None:
        return read_json(path / "config.json", required=True), _local_headers(path, str(path.resolve()), None)
    return _hub(src, revision)


def _local_headers(folder: Path, source_id: str, revision: str | None) -> Headers:
    check_weights(folder, source_id)
    with Checkpoint(folder) as ckpt:  # maps the files; reads their headers only
        return Headers(str(folder), dict(ckpt.tensors), source_id, revision)


def _hub(repo_id: str, revision: str | None) -> tuple[dict, Headers]:
    from huggingface_hub import HfApi, errors, hf_hub_download
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except errors.HFValidationError:
        raise MoeError(f"{repo_id}: no such folder, and not a Hub id (org/name); check the path") from None
    with hub_errors(repo_id, revision):
        snapshot = Path(hf_hub_download(repo_id, "config.json", revision=revision)).parent
        config = read_json(snapshot / "config.json", required=True)
        commit = snapshot.name  # snapshots/<commit>/config.json
        if _has_weights(snapshot):  # converted before: the weights are in the cache already
            return config, _local_headers(snapshot, repo_id, commit)
        meta = HfApi().get_safetensors_metadata(repo_id, revision=commit)
    tensors = {}
    for fname, f in meta.files_metadata.items():
        for name, t in f.tensors.items():
            begin, end = t.data_offsets
            if t.dtype not in DTYPES or end - begin != math.prod(t.shape) * DTYPES[t.dtype][1]:
                raise MoeError(f"{repo_id}: {fname}: tensor {name} has a bad header ({t.dtype} {list(t.shape)}, "
                               f"{end - begin} bytes); the repo is damaged")
            tensors[name] = TensorInfo(name, t.dtype, tuple(t.shape), begin, end, Path(fname))
    return config, Headers(repo_id, tensors, repo_id, commit)


def _has_weights(snapshot: Path) -> bool:
    if (snapshot / INDEX).is_file():
        index = read_json(snapshot / INDEX) or {}
        files = set((index.get("weight_map") or {}).values())
        return bool(files) and all((snapshot / f).is_file() for f in files)
    return (snapshot / "model.safetensors").is_file()


def converter_plan(hf: dict, headers: Headers) -> Plan:
    """The converter's plan for this config, checked against the headers as conversion would."""
    arch = arch_registry.for_config(hf)
    try:
        plan = arch.plan(arch.model_config(hf), set(headers.names()))
    except (KeyError, TypeError, ValueError) as exc:
        raise MoeError(f"{headers.folder}: config.json is malformed ({type(exc).__name__}: {exc})") from None
    plan.config.check()
    check_plan(plan, headers, headers.folder)
    return plan


def place(plan: Plan, encodings: dict[str, str], group_size: int) -> Placement:
    """LayoutWriter's placement, replayed: codes and scales each TENSOR_ALIGN-aligned, every expert run
    EXPERT_ALIGN-aligned, experts.bin padded to a whole page."""
    pos = {MODEL_FILE: 0, EXPERTS_FILE: 0}
    runs = {}

    def put(name: str, shape: tuple[int, ...], fname: str) -> None:
        codes, scales = expected_nbytes({"encoding": encodings[name], "shape": list(shape), "group_size": group_size})
        end = align(pos[fname], TENSOR_ALIGN) + codes
        pos[fname] = align(end, TENSOR_ALIGN) + scales if scales else end

    for item in plan.items:
        if isinstance(item, Run):
            start = pos[EXPERTS_FILE] = align(pos[EXPERTS_FILE], EXPERT_ALIGN)
            for o in item.outs:
                put(o.name, o.shape, EXPERTS_FILE)
            runs[(item.layer, item.expert)] = pos[EXPERTS_FILE] - start
        else:
            put(item.name, item.shape, MODEL_FILE)
    return Placement(pos[MODEL_FILE], align(pos[EXPERTS_FILE], EXPERT_ALIGN), runs)


def kv_cache_bytes(cfg, context: int) -> int:
    """f32 keys and values of every layer for `context` tokens."""
    return 2 * F32 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * context


def figures(hf: dict, headers: Headers, bits: int = 4, group_size: int = 32) -> dict:
    """What the checkpoint becomes at `bits` (see `sizes`), with where it comes from."""
    check_options(bits, group_size)
    plan = converter_plan(hf, headers)
    encodings = {o.name: encoding_for(o, headers, bits) for o in plan.outs()}
    return {
        "source": headers.source_id or headers.folder,
        "revision": headers.revision,
        "architecture": plan.config.architecture,
        "hf_architecture": (hf.get("architectures") or [None])[0],
        "bits": bits,
        "source_bytes": headers.nbytes,
        **sizes(plan, encodings, group_size),
    }


def sizes(plan: Plan, encodings: dict[str, str], group_size: int) -> dict:
    """Parameters, the layout's size, bytes touched per generated token, RAM needs and the smallest budget.

    Bytes touched per token: every non-expert tensor but the embedding table (one row of it), and
    each MoE layer's top-k largest experts; the KV cache read by attention comes on top.
    """
    cfg = plan.config
    placed = place(plan, encodings, group_size)

    def stored(name: str, shape) -> int:
        return sum(expected_nbytes({"encoding": encodings[name], "shape": list(shape), "group_size": group_size}))

    params = expert_params = 0
    touched: dict[str, int] = {}  # bytes touched per token, by encoding
    layer_experts: dict[int, list[tuple[int, int, dict[str, int]]]] = {}  # layer -> [(params, run bytes, by enc)]
    for item in plan.items:
        outs = item.outs if isinstance(item, Run) else (item,)
        n = sum(math.prod(o.shape) for o in outs)
        params += n
        if isinstance(item, Run):
            expert_params += n
            by_enc = {}
            for o in outs:
                by_enc[encodings[o.name]] = by_enc.get(encodings[o.name], 0) + stored(o.name, o.shape)
            layer_experts.setdefault(item.layer, []).append((n, placed.runs[(item.layer, item.expert)], by_enc))
        elif item.name != "embed" or cfg.tie_word_embeddings:
            touched[encodings[item.name]] = touched.get(encodings[item.name], 0) + stored(item.name, item.shape)
    active_expert_params = active_expert_bytes = 0
    for experts in layer_experts.values():
        for n, run, by_enc in sorted(experts, key=lambda e: -e[1])[: cfg.top_k]:
            active_expert_params += n
            active_expert_bytes += run
            for enc, b in by_enc.items():
                touched[enc] = touched.get(enc, 0) + b
    slot = max(align(r, EXPERT_ALIGN) for r in placed.runs.values())
    context = min(cfg.max_position_embeddings, DEFAULT_MAX_CONTEXT)
    kv = kv_cache_bytes(cfg, context)
    layout_bytes = placed.model_bytes + placed.experts_bytes
    return {
        "layers": cfg.num_layers,
        "moe_layers": len(cfg.moe_layers()),
        "experts": cfg.num_experts,
        "top_k": cfg.top_k,
        "total_params": params,
        "expert_params": expert_params,
        "active_params": params - expert_params + active_expert_params,
        "layout_bytes": layout_bytes,
        "model_bin_bytes": placed.model_bytes,
        "experts_bin_bytes": placed.experts_bytes,
        "expert_run_bytes": max(placed.runs.values()),
        "slot_bytes": slot,
        "bytes_per_token": sum(touched.values()),
        "bytes_per_token_by_encoding": touched,
        "expert_bytes_per_token": active_expert_bytes,
        "context": context,
        "kv_cache_bytes": kv,
        "runtime_bytes": RUNTIME_BYTES,
        # what a run needs: the weights, the KV cache at full context, and the runtime itself
        "ram_bytes": layout_bytes + kv + RUNTIME_BYTES,
        "min_budget_bytes": cfg.top_k * slot,  # paging's minimum: one layer's top-k experts in slots
        "ram_bytes_at_min_budget": placed.model_bytes + cfg.top_k * slot + kv + RUNTIME_BYTES,
        "quantization": {kind: sorted({e for n, e in encodings.items() if kind_of(n) == kind})
                         for kind in sorted({kind_of(n) for n in encodings})},
    }


def assess(src: str, memory: int | None = None, bits: int = 4, revision: str | None = None,
           remeasure: bool = False, say=None) -> dict:
    """figures() plus this machine's rates, predicted decode speeds and the verdict.

    memory: the RAM moe may use (default: what is available now). What is left of it after the
    non-expert weights, the KV cache and the runtime is the expert budget it allows.
    """
    from . import speed
    from .machine import available_ram, use_threads

    use_threads()  # measured at the thread count a run uses by default
    hf, headers = read_source(src, revision)
    fig = figures(hf, headers, bits)
    rates = speed.machine(remeasure, say)
    mini = speed.overhead(hf, bits, remeasure=remeasure, say=say, layout_bytes=fig["layout_bytes"])
    available = available_ram()
    memory = available if memory is None else memory
    in_ram = speed.predict(fig, rates, mini)
    fixed = fig["ram_bytes"] - fig["experts_bin_bytes"]  # everything but the experts
    budget = min(memory - fixed, fig["experts_bin_bytes"])
    at_budget = None
    if fig["ram_bytes"] <= memory:
        verdict, predicted = "fits in RAM", in_ram["decode_tok_s"]
    elif budget >= fig["min_budget_bytes"]:
        at_budget = speed.predict(fig, rates, mini, budget, available)
        predicted = at_budget["decode_tok_s"]
        verdict = f"runs with paging at about {tok_s_text(predicted)} tok/s"
    else:
        verdict, predicted = "does not run", None
    return {
        **fig,
        "memory_bytes": memory,
        "available_ram_bytes": available,
        "budget_bytes": budget if at_budget else None,
        "predicted_decode_tok_s": predicted,
        "predicted_in_ram_tok_s": in_ram["decode_tok_s"],
        "predicted_at_budget": at_budget,
        "hit_rate_model": f"hit = 1 - (1 - f)^{speed.HIT_EXPONENT}, f = expert slots / all experts",
        "machine": {k: rates[k] for k in ("memory_bandwidth", "matvec", "cached_read", "disk_read", "threads",
                                          "measured_at")},
        "verdict": verdict,
    }


def tok_s_text(tok_s: float) -> str:
    """0.37, 4.2, 31, 452: two significant figures below 10, whole numbers above."""
    return f"{tok_s:.2g}" if tok_s < 10 else f"{tok_s:.0f}"
