"""Generation as a stack of generators: token ids from logits, then text pieces from token ids.

The model only needs `reset(pos)`, `cached_prefix(ids)`, `forward(ids, last_only=True) -> f32 [1, V]`,
`pos`, `max_context` and `tokenizer`. A prompt reuses the longest prefix of it that the KV cache holds
(a conversation's earlier turns, a server's repeated system prompt): only the rest is run.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator

import numpy as np

from .errors import MoeError
from .sampling import Sampler

DEFAULT_MAX_TOKENS = 256


def generate_tokens(model, ids, max_tokens: int = DEFAULT_MAX_TOKENS, temperature: float = 0.0, top_k: int = 0,
                    top_p: float = 1.0, min_p: float = 0.0, seed: int | None = None,
                    stop_ids: Iterable[int] | None = None) -> Iterator[int]:
    """Token ids following `ids`, at most `max_tokens` of them; the KV cache keeps the prefix of `ids` it holds.

    Stops before yielding any of `stop_ids` (default: the model's EOS ids), or when the context is full.
    """
    sampler = Sampler(temperature, top_k, top_p, min_p, seed)
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if max_tokens < 0:
        raise MoeError(f"--max-tokens {max_tokens} is negative; give 0 or more")
    if ids.size == 0:
        raise MoeError("the prompt is empty; give some text")
    if ids.size > model.max_context:
        raise MoeError(f"the prompt is {ids.size} tokens, longer than the model's context of {model.max_context}; shorten it")
    stop = frozenset(model.tokenizer.eos_ids if stop_ids is None else (int(i) for i in stop_ids))
    return _token_loop(model, ids, max_tokens, sampler, stop)


def _token_loop(model, ids: np.ndarray, max_tokens: int, sampler: Sampler, stop: frozenset) -> Iterator[int]:
    if max_tokens == 0:
        return
    cached = model.cached_prefix(ids)
    model.reset(cached)
    logits = model.forward(ids[cached:], last_only=True)[-1]
    for produced in range(1, max_tokens + 1):
        token = sampler.sample(logits)
        if token in stop:
            return
        yield token
        if produced == max_tokens or model.pos >= model.max_context:
            return
        logits = model.forward(np.array([token], dtype=np.int64), last_only=True)[-1]


def generate(model, prompt: str, max_tokens: int = DEFAULT_MAX_TOKENS, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, min_p: float = 0.0, seed: int | None = None, stop: Iterable[str] = (),
             chat: bool = False, system: str | None = None) -> Generation:
    """Text pieces continuing `prompt` (or answering it, with `chat`), streamed as tokens complete characters.

    Ends at an EOS token, at `max_tokens`, or at the first of the `stop` strings, which is not part of the text.
    """
    if system is not None and not chat:
        raise MoeError("--system only applies with --chat; add --chat or drop --system")
    if chat:
        messages = ([{"role": "system", "content": system}] if system is not None else []) + [{"role": "user", "content": prompt}]
        ids = chat_ids(model.tokenizer, messages)
    else:
        ids = model.tokenizer.encode(prompt)
    return generate_ids(model, ids, max_tokens, temperature, top_k, top_p, min_p, seed, stop)


def chat_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a conversation in the model's chat template, ending where the assistant's answer begins."""
    return tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True), add_bos=False)


def generate_ids(model, ids: list[int], max_tokens: int = DEFAULT_MAX_TOKENS, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0, seed: int | None = None,
                 stop: Iterable[str] = ()) -> Generation:
    """Text pieces following the token ids of a prompt; as `generate` otherwise."""
    tokens = generate_tokens(model, ids, max_tokens, temperature, top_k, top_p, min_p, seed)
    return Generation(model, ids, tokens, [s for s in stop if s], max_tokens)


class Generation:
    """Iterate it for the text pieces; its counts and timings are up to date as it runs."""

    def __init__(self, model, prompt_ids: list[int], tokens: Iterator[int], stop: list[str], max_tokens: int):
        self.model = model
        self.prompt_tokens = len(prompt_ids)
        self.cached_tokens = 0  # of them, found in the KV cache (known once the prefill starts)
        self.tokens: list[int] = []
        self.text = ""  # everything yielded so far
        self.finish_reason: str | None = None  # stop | length | interrupted
        self.ttft_s = 0.0  # prompt given -> first token chosen (prefill and one sample)
        self.decode_s = 0.0  # first token -> last one
        self._stream = model.tokenizer.stream(prompt_ids, skip_special_tokens=True)
        self._pending = ""  # decoded text not yet yielded: it may be the start of a stop string
        self._pieces = self._run(prompt_ids, tokens, stop, max_tokens)

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        piece = next(self._pieces)
        self.text += piece
        return piece

    def _run(self, prompt_ids: list[int], tokens: Iterator[int], stop: list[str], max_tokens: int) -> Iterator[str]:
        if max_tokens:  # the prefix the token loop is about to reuse
            self.cached_tokens = self.model.cached_prefix(prompt_ids)
        start = time.perf_counter()
        for token in tokens:
            now = time.perf_counter()
            if not self.tokens:
                self.ttft_s = now - start
            self.decode_s = now - start - self.ttft_s
            self.tokens.append(token)
            self._pending += self._stream.step(token)
            cut = _first_stop(self._pending, stop)
            if cut is not None:
                self.finish_reason = "stop"
                if cut:
                    yield self._pending[:cut]
                return
            ready = len(self._pending) - _stop_prefix_len(self._pending, stop)
            if ready:
                piece, self._pending = self._pending[:ready], self._pending[ready:]
                yield piece
        if self._pending:
            yield self._pending
        self.finish_reason = "length" if len(self.tokens) == max_tokens or self.model.pos >= self.model.max_context else "stop"

    def interrupt(self) -> str:
        """Stop here (Ctrl-C): the text held back for a stop string that never came, now part of the answer."""
        rest, self._pending = self._pending, ""
        self.text += rest
        self.finish_reason = "interrupted"
        return rest

    def summary(self) -> dict:
        """Counts and speeds: prompt and generated tokens, time to first token, prefill and decode tokens/s."""
        decoded = max(len(self.tokens) - 1, 0)
        return {
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "generated_tokens": len(self.tokens),
            "finish_reason": self.finish_reason,
            "ttft_s": round(self.ttft_s, 6),
            "prefill_tok_s": round(self.prompt_tokens / self.ttft_s, 3) if self.ttft_s else None,
            "decode_tok_s": round(decoded / self.decode_s, 3) if decoded and self.decode_s else None,
        }


def _first_stop(text: str, stop: list[str]) -> int | None:
    """Where the earliest stop string starts in `text`, or None."""
    found = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(found) if found else None


def _stop_prefix_len(text: str, stop: list[str]) -> int:
    """Length of the longest end of `text` that begins some stop string (held back until it resolves)."""
    longest = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if s.startswith(text[-n:]):
                longest = n
                break
    return longest
