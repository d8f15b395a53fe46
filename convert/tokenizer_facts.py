"""The tokenizer facts the manifest carries (files, chat template, BOS and EOS), read from the source folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..runtime.errors import MoeError
from ..runtime.files import MAX_JSON, decode_text, load_json, read_bounded
from .hub import read_json

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json",
                   "chat_template.jinja")


def tokenizer_info(folder: Path) -> dict:
    if not (folder / "tokenizer.json").is_file():
        raise MoeError(f"{folder}: no tokenizer.json; moe needs the Hugging Face (fast) tokenizer file next to the weights")
    config = read_json(folder / "tokenizer_config.json") or {}
    special = read_json(folder / "special_tokens_map.json") or {}
    template = config.get("chat_template")
    if (folder / "chat_template.jinja").is_file():
        path = folder / "chat_template.jinja"
        template = decode_text(read_bounded(path, MAX_JSON, "re-download the model"), str(path))  # the manifest holds it
    elif isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t["name"]: t.get("template") for t in template if isinstance(t, dict) and isinstance(t.get("name"), str)}
        template = named.get("default", next(iter(named.values()), None))
    bos = _token_text(config.get("bos_token", special.get("bos_token")))
    add_bos = config.get("add_bos_token")
    if not isinstance(add_bos, bool):
        add_bos = bos is not None and _post_processor_adds(folder / "tokenizer.json", bos)
    return {
        "files": [f for f in TOKENIZER_FILES if (folder / f).is_file()],
        "chat_template": template if isinstance(template, str) else None,
        "bos_token": bos,
        "eos_token": _token_text(config.get("eos_token", special.get("eos_token"))),
        "add_bos_token": add_bos,
    }


def _token_text(token) -> str | None:
    if isinstance(token, dict):  # a serialized AddedToken
        token = token.get("content")
    return token if isinstance(token, str) else None


def copy_tokenizer_file(src: Path, dst: Path) -> None:
    """Copy src; tokenizer.json without its indentation (Hub files are pretty-printed: 257 kB of the
    trained models' becomes 101 kB, which is a tenth of such a model's whole layout)."""
    if src.name != "tokenizer.json":
        shutil.copyfile(src, dst)
        return
    data = load_json(src, "use the tokenizer.json the model was published with")
    dst.write_text(json.dumps(data, ensure_ascii=False, separators=(",", ":")), encoding="utf-8")


def _post_processor_adds(tokenizer_json: Path, token: str) -> bool:
    """Whether tokenizer.json's post-processor puts `token` first (Llama 3 / 4 style BOS), absent add_bos_token."""
    data = load_json(tokenizer_json, "re-download the model")
    try:
        post = data.get("post_processor") or {}
        processors = post.get("processors", [post]) if post.get("type") == "Sequence" else [post]
        for p in processors:
            single = p.get("single") if p.get("type") == "TemplateProcessing" else None
            if single and single[0].get("SpecialToken", {}).get("id") == token:
                return True
    except (AttributeError, TypeError, KeyError, IndexError):
        raise MoeError(f"{tokenizer_json}: not a valid tokenizer file (JSON with a post_processor object); "
                       "re-download the model") from None
    return False
