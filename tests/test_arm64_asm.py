"""What a Mac would run, checked on any machine: the kernels' LLVM IR (simd.emit_dot, the code numba inlines)
as the arm64 path emits it, compiled by llvmlite for Apple silicon (arm64-apple-macosx, apple-m1), and its hot
loop read from the assembly: dot-product instructions present, and instructions per loop step (256 weights)
within 1.25x of the x86 AVX2 loop's.

Counts are for group size 32 (the converter's default: the scales' uniform branch, shift 0) as LLVM at O3
compiles a standalone copy of the kernel; `python tests/test_arm64_asm.py` prints the table.
"""

from __future__ import annotations

import re

import llvmlite.binding as llvm
import pytest
from llvmlite import ir
from moe.runtime.kernels import simd
from numba import types
from numba.core.registry import cpu_target

MAC = ("arm64-apple-macosx", "apple-m1")
AVX2 = ("x86_64-unknown-linux-gnu", "haswell")
KERNELS = [("q4", 1), ("q5", 1), ("q6", 1), ("q8", 1), ("q4", 4)]  # (encoding, tokens): decode, prefill tile
CHECKED = [("q4", 1), ("q5", 1), ("q8", 1), ("q4", 4)]  # the kernels
RATIO = 1.25


def kernel_ir(isa: str, kind: str, nt: int) -> str:
    """A module of one function running one row through the `isa` kernel for nt tokens, group size 32."""
    ctx = cpu_target.target_context

    def array(dtype):
        return types.Array(dtype, 2, "C")

    i64 = types.int64
    sig = types.UniTuple(types.float32, nt)(
        array(types.int8 if kind == "q8" else types.uint8), array(types.int8), array(types.uint16), i64,
        array(types.int8), array(types.float32), array(types.float32), i64, i64, i64)
    module = ir.Module(f"{kind}_{isa}")
    fn = ir.Function(module, ir.FunctionType(ctx.get_value_type(sig.return_type),
                                             [ctx.get_value_type(a) for a in sig.args]), "kernel")
    builder = ir.IRBuilder(fn.append_basic_block())
    args = list(fn.args)
    args[9] = ir.Constant(ir.IntType(64), 0)  # shift 0: one scale per block
    builder.ret(simd.emit_dot(isa, kind, nt, ctx, builder, sig, args))
    return str(module)


def assembly(text: str, triple: str, cpu: str) -> str:
    llvm.initialize_all_targets()
    llvm.initialize_all_asmprinters()
    machine = llvm.Target.from_triple(triple).create_target_machine(cpu=cpu, opt=3)
    module = llvm.parse_assembly(text)
    module.triple, module.data_layout = triple, str(machine.target_data)
    builder = llvm.create_pass_builder(machine, llvm.create_pipeline_tuning_options(speed_level=3))
    builder.getModulePassManager().run(module, builder)
    return machine.emit_assembly(module)


def hot_loop(asm: str) -> list[str]:
    """The instructions of the largest loop: from a label to the branch back to it."""
    lines = [re.split(r"\s[;#]|^\s*[;#]|//", line)[0].rstrip() for line in asm.splitlines()]
    labels, loops = {}, []
    for i, line in enumerate(lines):
        if m := re.match(r"^(\.?L\w+):", line):
            labels[m.group(1)] = i
        elif (m := re.match(r"^\s+(?:b\.\w+|b|cbn?z|tbn?z|j\w+)\s+(?:.*,\s*)?(\.?L\w+)$", line)) and m.group(1) in labels:
            loops.append([x.strip() for x in lines[labels[m.group(1)] + 1: i + 1]
                          if x.strip() and not x.strip().startswith(".") and not x.endswith(":")])
    assert loops, "no loop in the kernel's assembly"
    return max(loops, key=len)


def count(isa: str, kind: str, nt: int) -> tuple[int, list[str]]:
    triple, cpu = AVX2 if isa == "avx2" else MAC
    loop = hot_loop(assembly(kernel_ir(isa, kind, nt), triple, cpu))
    return len(loop), loop


def _targets_present() -> bool:
    try:
        llvm.initialize_all_targets()
        return all(llvm.Target.from_triple(t) for t in (MAC[0], AVX2[0]))
    except RuntimeError:
        return False


pytestmark = pytest.mark.skipif(not _targets_present(), reason="this llvmlite lacks the AArch64 or X86 target")


def _dot_products(loop: list[str]) -> int:
    return sum(op.split()[0].startswith(("sdot", "udot")) for op in loop)


@pytest.mark.parametrize("kind,nt", KERNELS, ids=[f"{k}x{n}" for k, n in KERNELS])
def test_arm64_loop_is_dot_products(kind, nt):
    """One sdot per 16 weights and token (256 weights a step), against none on the portable path; and
    at most three quarters of the portable path's instructions per step."""
    arm, loop = count("dotprod", kind, nt)
    assert _dot_products(loop) == 16 * nt, "\n".join(loop)
    before, portable = count("portable", kind, nt)
    assert _dot_products(portable) == 0
    assert arm <= 0.75 * before, f"{kind} 1x{nt}: {arm} instructions per step against {before} before"


@pytest.mark.parametrize("kind,nt", CHECKED, ids=["q4x1", "q5x1", "q8x1", "q4x4"])
def test_arm64_loop_within_ratio_of_avx2(kind, nt):
    arm, _ = count("dotprod", kind, nt)
    avx2, _ = count("avx2", kind, nt)
    assert arm <= RATIO * avx2, f"{kind} 1x{nt}: {arm} arm64 instructions per step against {avx2} on AVX2"


@pytest.mark.parametrize("triple,cpu,features,expected", [
    ("arm64-apple-macosx", "apple-m1", "", True),  # macOS: numba passes no features, the cpu implies them
    ("aarch64-unknown-linux-gnu", "neoverse-n1", "", True),
    ("aarch64-unknown-linux-gnu", "generic", "+neon,+dotprod", True),
    ("aarch64-unknown-linux-gnu", "cortex-a72", "", False),  # no sdot: the portable path
    ("arm64-apple-macosx", "apple-m1", "-dotprod", False),
])
def test_dotprod_chosen_by_what_llvm_compiles_for(triple, cpu, features, expected):
    assert simd._has_dotprod(triple, cpu, features) is expected


if __name__ == "__main__":
    print(f"{'kernel':10} {'AVX2':>6} {'arm64 before':>13} {'arm64 after':>12} {'after/AVX2':>11}")
    for kind, nt in KERNELS:
        avx2, before, after = (count(isa, kind, nt)[0] for isa in ("avx2", "portable", "dotprod"))
        print(f"{kind} 1x{nt:<5} {avx2:6} {before:13} {after:12} {after / avx2:11.2f}")
