"""DeepSeek-V2 (`DeepseekV2ForCausalLM`, DeepSeek-V2-Lite, Moonlight's predecessor layout): DeepSeek-V3's latent
attention and layers, routed by the softmax over the experts, the top-k probabilities not renormalized (transformers
ignores `norm_topk_prob`, false in every DeepSeek-V2 config), times `routed_scaling_factor`; no correction bias.
`topk_method` `greedy` (V2-Lite) takes the top-k of all experts, as OLMoE; `group_limited_greedy` (DeepSeek-V2,
V2-Chat) only of the `topk_group` best of `n_group` groups, each rated by its best probability. Its RoPE always
rotates pairs (x0, x1)."""

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
    if method == "greedy":
        router = dict(router="softmax_topk")
    elif method == "group_limited_greedy":
        router = dict(router="softmax_group_topk", n_group=int(common.need(hf, "n_group")),
                      topk_group=int(common.need(hf, "topk_group")))
    else:
        raise MoeError(f"config.json: topk_method {method!r} is not supported (moe knows greedy and "
                       "group_limited_greedy)")
    if hf.get("mlp_bias"):
        raise MoeError("config.json: mlp_bias is not supported (no DeepSeek-V2 model has it)")
    v3 = deepseek_v3.model_config({**hf, "rope_interleave": True, "n_group": 1, "topk_group": 1,
                                   "first_k_dense_replace": hf.get("first_k_dense_replace") or 0})
    return replace(v3, architecture=NAME, norm_topk_prob=False,
                   num_experts=int(common.get(hf, "n_routed_experts", default=64)), **router)


plan = deepseek_v3.plan
