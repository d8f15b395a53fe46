"""A miniature of a planned model, for the fixed costs `moe plan` predicts with: the same architecture, layers,
experts and top-k, every width shrunk to a few dozen, random weights in the converter's encodings, written as a
converted layout that moe.runtime.speed times."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from ..runtime import speed
from ..runtime.config import ModelConfig
from ..runtime.layout_writer import LayoutWriter
from . import arch as arch_registry
from .arch.common import Run, outs_of
from .encoding import encoding_for
from .sizes import sizes

HIDDEN, HEAD_DIM, VOCAB, MLP = 64, 16, 256, 32  # the miniature's widths
SMALL_MODEL_BYTES = 64 << 20  # a layout up to this size is its own miniature (random weights, full widths)


def mini_config(hf: dict, shrink: bool = True) -> ModelConfig:
    """The typed config of config.json `hf` with every width shrunk; layers, heads, experts and top-k unchanged.
    shrink=False keeps the widths: a small model is timed at its own size, where narrow rows cost more per byte
    than the bandwidth figures say."""
    cfg = arch_registry.for_config(hf).model_config(hf)
    if not shrink:
        return cfg
    mlps = {name: MLP for name in ("expert_intermediate_size", "shared_expert_intermediate_size",
                                   "dense_intermediate_size") if getattr(cfg, name)}
    heads = {name: HEAD_DIM for name in ("linear_key_head_dim", "linear_value_head_dim") if getattr(cfg, name)}
    return dataclasses.replace(cfg, hidden_size=HIDDEN, head_dim=HEAD_DIM, vocab_size=VOCAB, **mlps, **heads)


def overhead(hf: dict, bits: int, group_size: int = 32, remeasure: bool = False, say=None,
             layout_bytes: int | None = None) -> dict:
    """speed.time_miniature of this model's miniature (the model itself when its layout is small), cached by
    its config, bits and group size."""
    cfg = mini_config(hf, shrink=layout_bytes is None or layout_bytes > SMALL_MODEL_BYTES)
    key = {"config": cfg.to_dict(), "bits": bits, "group_size": group_size}
    return speed.time_miniature(key, lambda folder: write_miniature(cfg, bits, group_size, folder), remeasure, say)


def write_miniature(cfg: ModelConfig, bits: int, group_size: int, folder: Path) -> dict:
    """A converted layout of random weights for `cfg`, in the encodings of a bf16 checkpoint; its sizes."""
    plan = arch_registry.get(cfg.architecture).plan(cfg, set())
    encodings = {o.name: encoding_for(o.name, o.shape, ["BF16"], bits) for o in plan.outs()}
    rng = np.random.default_rng(0)
    writer = LayoutWriter(folder)
    try:
        for item in plan.items:
            if isinstance(item, Run):
                writer.begin_expert(item.layer, item.expert)
            for o in outs_of(item):
                writer.add(o.name, speed.random_packed(encodings[o.name], o.shape, group_size, rng))
            if isinstance(item, Run):
                writer.end_expert()
        writer.finish({"architecture": plan.config.architecture, "config": plan.config.to_dict()})
    except BaseException:
        writer.abort()
        raise
    return sizes(plan, encodings, group_size)
