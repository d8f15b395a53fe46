"""A stand-in for moe.runtime.model.Model: scripted logits over the demo tokenizer, for generation and CLI tests."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
from moe.runtime.budget import Memory
from moe.runtime.tokenizer import Tokenizer

DEMO = Path(__file__).resolve().parents[1] / "convert" / "demo" / "tinymix"
EOS = 1
# what the converter writes into the demo's manifest
DEMO_FACTS = {"tokenizer": {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": False, "chat_template": None},
              "config": {"eos_token_ids": [EOS]}}


class ScriptedModel:
    """After any prompt it 'wants' to say `script` (then EOS): that token's logit leads by `margin`.

    The other logits are seeded noise, so sampling at a temperature has real choices to make.
    """

    def __init__(self, script: str, margin: float = 8.0, max_context: int = 512, eos: bool = True):
        self.tokenizer = Tokenizer.from_folder(DEMO, DEMO_FACTS)
        self.script = self.tokenizer.encode(script) + ([EOS] if eos else [])
        self.margin = margin
        self.max_context = max_context
        self.config = SimpleNamespace(vocab_size=self.tokenizer.vocab_size)
        self.pos = 0
        self.prompt_len = 0
        self.forwards: list[int] = []  # T of every forward call
        self.stats = {"hits": 0, "misses": 0, "bytes_read": 0}
        self.memory = Memory(None, False, False, False, (), ())  # every expert mapped, nothing to say
        self.layout = None  # no files behind it: what reads the layout is replaced in the tests that load this
        self.kv_cache = "bf16"
        self.closed = False

    def reset(self, pos: int = 0) -> None:
        self.pos = pos

    def cached_prefix(self, ids) -> int:
        return 0  # no prompt cache: every prompt runs from position 0

    def forward(self, ids, last_only: bool = False) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        assert ids.ndim == 1 and ids.size and last_only
        assert self.pos + ids.size <= self.max_context
        if self.pos == 0:
            self.prompt_len = ids.size
        self.pos += ids.size
        self.forwards.append(ids.size)
        self.stats = {"hits": self.stats["hits"] + 3 * ids.size, "misses": self.stats["misses"] + ids.size,
                      "bytes_read": self.stats["bytes_read"] + 1000 * ids.size}
        step = self.pos - self.prompt_len
        logits = np.random.default_rng(self.pos).normal(0, 1, self.config.vocab_size).astype(np.float32)
        if step < len(self.script):
            logits[self.script[step]] = logits.max() + self.margin
        return logits[None, :]

    def close(self) -> None:
        self.closed = True
