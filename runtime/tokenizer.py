"""Text in and out: `tokenizer.json` through `tokenizers`, streaming decode, chat templates (see chat_template.py)."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers.decoders import DecodeStream

from .chat_template import render_chat_template
from .errors import MoeError

TOKENIZER_FILE = "tokenizer.json"
STREAM_CONTEXT = 4  # prompt tokens fed to a stream first, so the first piece joins the prompt as full decode would
SAMPLE = "Hello, world! 123\n\tdef f(x): return x  # é 😀 中文"  # encoded once at load, as a check


class Tokenizer:
    """`encode`/`decode`, a streaming decoder, EOS ids and the chat template of one model folder."""

    def __init__(self, tokenizer: HFTokenizer, *, bos_token: str | None = None, eos_token: str | None = None,
                 add_bos_token: bool = False, eos_ids=(), chat_template: str | None = None, source: Path | None = None):
        self._tok = tokenizer
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.bos_id = tokenizer.token_to_id(bos_token) if bos_token else None
        self.add_bos = bool(add_bos_token) and self.bos_id is not None
        eos_id = tokenizer.token_to_id(eos_token) if eos_token else None
        self.eos_ids = frozenset(int(i) for i in eos_ids) | ({eos_id} if eos_id is not None else set())
        self.chat_template = chat_template
        self.source = source

    @classmethod
    def from_folder(cls, folder, manifest: dict | None = None) -> Tokenizer:
        """The tokenizer of a converted model: tokenizer.json from its folder, the rest from its manifest.

        The converter read tokenizer_config.json, special_tokens_map.json and chat_template.jinja once, into
        the manifest's `tokenizer` facts (bos_token, eos_token, add_bos_token, chat_template); without a
        manifest there is no BOS and no chat template.
        """
        folder = Path(folder)
        path = folder / TOKENIZER_FILE
        if not path.is_file():
            raise MoeError(f"{path}: missing; the model needs its tokenizer.json (reconvert it from a source that has one)")
        try:
            tok = HFTokenizer.from_file(str(path))
            tok.decode(tok.encode(SAMPLE).ids)  # some malformed files load, then panic on first use
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # a bare Exception, or a Rust panic (pyo3's PanicException is a BaseException)
            raise MoeError(f"{path}: not a valid tokenizer file ({_first_line(exc)}); replace it or reconvert the model") from None
        facts, eos_ids = _facts(manifest or {}, folder)
        return cls(tok, bos_token=facts.get("bos_token"), eos_token=facts.get("eos_token"),
                   add_bos_token=facts.get("add_bos_token", False), eos_ids=eos_ids,
                   chat_template=facts.get("chat_template"), source=folder)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`; BOS first only when the tokenizer config says add_bos_token (or add_bos=True)."""
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def stream(self, prompt_ids=(), skip_special_tokens: bool = False) -> TextStream:
        """An incremental decoder for the ids that follow `prompt_ids`."""
        return TextStream(self._tok, list(prompt_ids)[-STREAM_CONTEXT:], skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **extra) -> str:
        """The model's chat template rendered over `messages` in jinja2's immutable sandbox."""
        if not self.chat_template:
            raise MoeError(f"{self.source}: the model has no chat template; run without --chat")
        return render_chat_template(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                                    bos_token=self.bos_token or "", eos_token=self.eos_token or "", **extra)


class TextStream:
    """Feeds ids one at a time; `step` returns the text they complete ("" while a UTF-8 character is unfinished)."""

    def __init__(self, tok: HFTokenizer, context: list[int], skip_special_tokens: bool):
        self._tok = tok
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        for i in context:
            self._stream.step(tok, i)

    def step(self, token_id: int) -> str:
        return self._stream.step(self._tok, int(token_id)) or ""


def _facts(manifest: dict, folder: Path) -> tuple[dict, list[int]]:
    """The manifest's tokenizer facts and EOS ids, checked for type (a manifest is a file from anywhere)."""
    facts = manifest.get("tokenizer") or {}
    config = manifest.get("config") or {}
    eos_ids = (config.get("eos_token_ids") or []) if isinstance(config, dict) else None
    sound = (
        isinstance(facts, dict)
        and all(isinstance(facts.get(k), (str, type(None))) for k in ("bos_token", "eos_token", "chat_template"))
        and isinstance(facts.get("add_bos_token", False), bool)
        and isinstance(eos_ids, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in eos_ids)
    )
    if not sound:
        raise MoeError(f"{folder / 'manifest.json'}: malformed tokenizer facts; reconvert the model")
    return facts, eos_ids


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
