"""What `moe info` says about a converted model, computed from its manifest alone."""

from __future__ import annotations

import math

from . import paging
from .home import resolve_model
from .layout import EXPERTS_FILE, MODEL_FILE, Layout, read_layout, stored_nbytes
from .tensors import PARTS, expert_key, part_of


def bytes_per_token(layout: Layout) -> int:
    """Bytes a generated token reads, counted as `moe plan` counts them before conversion: every non-expert tensor
    but the embedding table (one row of it, unless the head shares it), each MoE layer's top-k largest expert
    runs, and linear attention's recurrent states."""
    m, cfg = layout.manifest, layout.config
    weights = sum(stored_nbytes(e) for name, e in m["tensors"].items()
                  if expert_key(name) is None and (name != "embed" or cfg.tie_word_embeddings))
    experts = sum(sum(sorted((r["nbytes"] for r in runs), reverse=True)[: cfg.top_k]) for runs in m["experts"].values())
    return weights + experts + cfg.state_bytes_per_token


def model_info(path) -> dict:
    """Architecture, sizes by part, parameters (total and active per token), bytes read per generated token,
    quantization and RAM needs."""
    folder = resolve_model(str(path))
    layout = read_layout(folder)
    m, cfg = layout.manifest, layout.config
    tensors = m["tensors"]
    size = {p: 0 for p in PARTS}
    encodings = {p: set() for p in PARTS}
    params = {p: 0 for p in PARTS}
    expert_params: dict[tuple[int, int], int] = {}
    for name, e in tensors.items():
        part = part_of(name)
        size[part] += stored_nbytes(e)
        encodings[part].add(e["encoding"])
        n = math.prod(e["shape"])
        params[part] += n
        key = expert_key(name)
        if key is not None:
            expert_params[key[:2]] = expert_params.get(key[:2], 0) + n
    top_k = cfg.top_k
    active_expert_params = 0
    for layer, runs in m["experts"].items():
        per_expert = sorted((expert_params.get((int(layer), j), 0) for j in range(len(runs))), reverse=True)
        active_expert_params += sum(per_expert[:top_k])
    min_budget = paging.min_budget(layout) if m["experts"] else 0  # what the expert cache enforces
    files = {k: v["size"] for k, v in m["files"].items()}
    total = sum(params.values())
    return {
        "path": str(folder),
        "architecture": m.get("architecture"),
        "hf_architecture": m.get("source", {}).get("hf_architecture"),
        "source": m.get("source", {}).get("id"),
        "layers": cfg.num_layers,
        "moe_layers": len(cfg.moe_layers()),
        "experts": cfg.num_experts,
        "top_k": top_k,
        "shared_expert": cfg.shared_expert_intermediate_size > 0,
        "hidden_size": cfg.hidden_size,
        "vocab_size": cfg.vocab_size,
        "total_params": total,
        "active_params": total - params["experts"] + active_expert_params,
        "bytes_per_token": bytes_per_token(layout),  # read by each generated token: weights and recurrent states
        "size_bytes": sum(files.values()),
        "size_by_part": size,
        "quantization_by_part": {p: sorted(encodings[p]) for p in PARTS if encodings[p]},
        "quantization": m.get("quantization", {}),
        # weights only: the KV cache and activations come on top
        "ram_bytes": files[MODEL_FILE] + files[EXPERTS_FILE],
        "min_budget_bytes": min_budget,
        "ram_bytes_min_budget": files[MODEL_FILE] + min_budget,
    }
