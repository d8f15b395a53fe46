"""What a plan becomes in the layout: each tensor's encoding, a pure function of its name, shape, source dtypes
and the bits asked for, and each tensor's place (moe.runtime.layout.Placement)."""

from __future__ import annotations

from ..runtime import tensors
from ..runtime.layout import Placement
from .arch.common import Out, Plan, Run, outs_of

# With --bits 4, the matrices besides the experts; attention's output projection, which costs the most per
# byte, one bit more (the measurements behind this trade: tests/bench/README.md, the 4-bit scheme).
AT_4_BITS = {tensors.ATTENTION: "q5", tensors.ATTENTION_OUTPUT: "q6", tensors.LM_HEAD: "q5",
             tensors.EMBEDDINGS: "q5", tensors.SHARED_EXPERT: "q5", tensors.DENSE_MLP: "q5"}
# U8: MXFP4 decodes exactly to bf16; F8_E4M3: an FP8 code times its block's float scale is a float32
SIXTEEN_BIT = {"BF16": "bf16", "F16": "f16", "F32": "f32", "U8": "bf16", "F8_E4M3": "f32"}


def encoding_for(name: str, shape: tuple[int, ...], dtypes, bits: int) -> str:
    """The encoding of layout tensor `name` of `shape`, whose source pieces have the safetensors `dtypes`.

    Experts take `bits`; with 4 bits the other matrices AT_4_BITS, with 8 bits q8; with 16 bits 2-D tensors
    keep their source encoding (f32 when their pieces differ), as routers always do; 1-D tensors are f32."""
    if len(shape) == 1:
        return "f32"
    kind = tensors.kind_of(name)
    if bits == 16 or kind == tensors.ROUTER:
        found = {SIXTEEN_BIT[d] for d in dtypes}
        return found.pop() if len(found) == 1 else "f32"
    if kind == tensors.EXPERTS:
        return f"q{bits}"
    if bits == 8:
        return "q8"
    return AT_4_BITS.get(kind, "q8")


def source_dtypes(ckpt, o: Out) -> list[str]:
    """The safetensors dtype of each source piece of `o`, from the headers of `ckpt` (a Checkpoint or Headers)."""
    return [ckpt.info(s.sources()[0]).dtype for s in o.srcs]


def encodings_for(plan: Plan, ckpt, bits: int) -> dict[str, str]:
    return {o.name: encoding_for(o.name, o.shape, source_dtypes(ckpt, o), bits) for o in plan.outs()}


def quantization_info(bits: int, group_size: int, encodings: dict[str, str]) -> dict:
    """The encodings chosen, by tensor kind (experts, attention, router, ...), as the manifest states them."""
    by_kind: dict[str, set[str]] = {}
    for name, enc in encodings.items():
        by_kind.setdefault(tensors.kind_of(name), set()).add(enc)
    info = {"bits": bits, "group_size": group_size if bits != 16 else None,
            "scheme": "symmetric, one scale per group of group_size columns: int8 times a bfloat16 per 8 groups"
            if bits != 16 else
            "16-bit source values unchanged"}
    info.update({k: ", ".join(sorted(v)) for k, v in sorted(by_kind.items())})
    return info


def place(plan: Plan, encodings: dict[str, str], group_size: int) -> Placement:
    """Where the layout puts every tensor and expert run of `plan`, without writing: the writer's own placement."""
    placement = Placement()
    for item in plan.items:
        if isinstance(item, Run):
            placement.begin_run(item.layer, item.expert)
        for o in outs_of(item):
            placement.tensor(encodings[o.name], o.shape, group_size)
        if isinstance(item, Run):
            placement.end_run()
    return placement
