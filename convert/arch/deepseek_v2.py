"""DeepSeek-V2 (`DeepseekV2ForCausalLM`, DeepSeek-V2-Lite, Moonlight's predecessor layout): DeepSeek-V3's latent
attention and layers, routed as OLMoE is (softmax over the experts, the top-k probabilities, not renormalized),
times `routed_scaling_factor`; no correction bias. Its RoPE always rotates pairs (x0, x1). The `group_limited_greedy`
top-k of the full DeepSeek-V2 is not supported (V2-Lite's is `greedy`)."""

from __future__ import annotations

from dataclasses import replace

from ...runtime.config import ModelConfig
from ...runtime.errors import MoeError
from . import common, deepseek_v3

NAME = "deepseek_v2"
HF_ARCHITECTURES = ("DeepseekV2ForCausalLM",)
MODEL_TYPES = ("deepseek_v2",)


def model_config(hf: dict) -> ModelConfig:
    method = hf.get("topk_method") or "greedy"
    if method != "greedy":
        raise MoeError(f"config.json: topk_method {method!r} is not supported (moe knows greedy)")
    if hf.get("mlp_bias"):
        raise MoeError("config.json: mlp_bias is not supported (no DeepSeek-V2 model has it)")
    v3 = deepseek_v3.model_config({**hf, "rope_interleave": True, "n_group": 1, "topk_group": 1,
                                   "first_k_dense_replace": hf.get("first_k_dense_replace") or 0})
    return replace(v3, architecture=NAME, router="softmax_topk", norm_topk_prob=False,
                   num_experts=int(common.get(hf, "n_routed_experts", default=64)))


plan = deepseek_v3.plan
