"""llama.cpp as the benchmarks' peer: where its tools are, and a checkpoint converted to GGUF.

llama.cpp is never part of this repository: LLAMA_CPP names a source tree with its tools built under
build/bin (tests/bench/README.md says how). Run as a script (`python llamacpp.py LLAMA_CPP SRC --outfile F
--outtype bf16`), this is llama.cpp's convert_hf_to_gguf.py, except that a BPE pre-tokenizer it does not
recognize (the synthetic checkpoints carry tinymix's) is taken as gpt-2's instead of refused.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(os.environ.get("LLAMA_CPP", "/work/llamacpp"))


def tool(name: str, root: Path = ROOT) -> Path:
    """A built llama.cpp tool (llama-bench, llama-quantize, llama-perplexity), or exit saying how to get it."""
    path = root / "build" / "bin" / name
    if not path.exists():
        sys.exit(f"{path} not found: build llama.cpp (see tests/bench/README.md) or set LLAMA_CPP")
    return path


def to_gguf_command(src: Path, outfile: Path, outtype: str = "bf16", root: Path = ROOT) -> list[str]:
    """The command converting the Hub-layout folder `src` into one GGUF file."""
    return [sys.executable, __file__, str(root), str(src), "--outfile", str(outfile), "--outtype", outtype]


def _convert(root: Path, args: list[str]) -> None:
    sys.path[:0] = [str(root), str(root / "gguf-py")]
    from conversion.base import TextModel

    recognize = TextModel.get_vocab_base_pre

    def gpt2_when_unknown(self, tokenizer) -> str:
        try:
            return recognize(self, tokenizer)
        except NotImplementedError:
            return "gpt-2"

    TextModel.get_vocab_base_pre = gpt2_when_unknown
    import convert_hf_to_gguf

    sys.argv = ["convert_hf_to_gguf.py", *args]
    convert_hf_to_gguf.main()


if __name__ == "__main__":
    _convert(Path(sys.argv[1]), sys.argv[2:])
