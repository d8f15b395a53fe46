"""What a planned layout holds and needs: parameters, file sizes, bytes touched per generated token, RAM and the
smallest expert budget, from the plan and its encodings alone (the layout's own size and placement rules)."""

from __future__ import annotations

import math

from ..runtime.budget import kv_cache_bytes
from ..runtime.layout import EXPERT_ALIGN, EXPERTS_FILE, MODEL_FILE, align, kv_cache_dtype, tensor_nbytes
from ..runtime.model import DEFAULT_MAX_CONTEXT
from ..runtime.tensors import EXPERTS, kind_of
from .arch.common import Plan, Run, outs_of
from .encoding import place

RUNTIME_BYTES = 300 * 10**6  # Python, numpy, numba and the kernels' buffers: peak RSS of a tiny model's decode


def sizes(plan: Plan, encodings: dict[str, str], group_size: int) -> dict:
    """Parameters, the layout's size, bytes touched per generated token, RAM needs and the smallest budget.

    Bytes touched per token: every non-expert tensor but the embedding table (one row of it), each MoE layer's
    top-k largest experts, and linear attention's recurrent states (f32, two passes over each: decay and read,
    then update and read out); the KV cache read by attention comes on top.
    """
    cfg = plan.config
    placed = place(plan, encodings, group_size)

    def stored(name: str, shape) -> int:
        return sum(tensor_nbytes(encodings[name], shape, group_size))

    params = expert_params = 0
    touched: dict[str, int] = {}  # bytes touched per token, by encoding
    layer_experts: dict[int, list[tuple[int, int, dict[str, int]]]] = {}  # layer -> [(params, run bytes, by enc)]
    for item in plan.items:
        outs = outs_of(item)
        n = sum(math.prod(o.shape) for o in outs)
        params += n
        if isinstance(item, Run):
            expert_params += n
            by_enc = {}
            for o in outs:
                by_enc[encodings[o.name]] = by_enc.get(encodings[o.name], 0) + stored(o.name, o.shape)
            layer_experts.setdefault(item.layer, []).append((n, placed.runs[(item.layer, item.expert)][1], by_enc))
        elif item.name != "embed" or cfg.tie_word_embeddings:
            touched[encodings[item.name]] = touched.get(encodings[item.name], 0) + stored(item.name, item.shape)
    states = cfg.state_bytes_per_token
    if states:
        touched["f32"] = touched.get("f32", 0) + states
    active_expert_params = active_expert_bytes = 0
    for experts in layer_experts.values():
        for n, run, by_enc in sorted(experts, key=lambda e: -e[1])[: cfg.top_k]:
            active_expert_params += n
            active_expert_bytes += run
            for enc, b in by_enc.items():
                touched[enc] = touched.get(enc, 0) + b
    run_bytes = [nbytes for _, nbytes in placed.runs.values()]
    slot = max(align(r, EXPERT_ALIGN) for r in run_bytes)
    files = placed.file_sizes()
    context = min(cfg.max_position_embeddings, DEFAULT_MAX_CONTEXT)
    kv = kv_cache_bytes(cfg, context, kv_cache_dtype(e for n, e in encodings.items() if kind_of(n) != EXPERTS))
    layout_bytes = sum(files.values())
    return {
        "layers": cfg.num_layers,
        "moe_layers": len(cfg.moe_layers()),
        "experts": cfg.num_experts,
        "top_k": cfg.top_k,
        "total_params": params,
        "expert_params": expert_params,
        "active_params": params - expert_params + active_expert_params,
        "layout_bytes": layout_bytes,
        "model_bin_bytes": files[MODEL_FILE],
        "experts_bin_bytes": files[EXPERTS_FILE],
        "expert_run_bytes": max(run_bytes),
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
        "ram_bytes_at_min_budget": files[MODEL_FILE] + cfg.top_k * slot + kv + RUNTIME_BYTES,
        "quantization": {kind: sorted({e for n, e in encodings.items() if kind_of(n) == kind})
                         for kind in sorted({kind_of(n) for n in encodings})},
    }
