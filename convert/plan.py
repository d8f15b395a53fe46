"""`moe plan`: what a checkpoint becomes and needs, from its config.json and safetensors headers alone.

No weight is read or downloaded. A local folder's headers come from its files; a Hub id's through
huggingface_hub: config.json and the shard index are downloaded, each shard's header is fetched by
an HTTP range request (`HfApi.get_safetensors_metadata`). Sizes are the converter's own: the
architecture's plan, its encoding choice per tensor, and the layout writer's placement rules, so
`layout_bytes` equals the converted model's model.bin + experts.bin to the byte.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from ..runtime import speed
from ..runtime.errors import MoeError
from ..runtime.machine import available_ram, use_threads
from . import arch as arch_registry
from . import miniature
from .arch.common import Plan
from .checks import check_options, check_plan, with_fp8_scales
from .encoding import encodings_for
from .hub import check_weights, hub_errors, local_folder, read_json
from .safetensors_io import DTYPES, INDEX, Checkpoint, TensorInfo
from .sizes import sizes


@dataclass
class Headers:
    """A checkpoint known by its headers only: what planning asks of safetensors_io.Checkpoint."""

    folder: str  # the folder or Hub id, for messages
    tensors: dict[str, TensorInfo]
    source_id: str = ""
    revision: str | None = None

    def names(self) -> list[str]:
        return list(self.tensors)

    def info(self, name: str) -> TensorInfo:
        return self.tensors[name]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def read_source(src: str, revision: str | None = None) -> tuple[dict, Headers]:
    """(config.json, headers) of a local Hub-layout folder or a Hub id; no weight is read."""
    path = local_folder(src, revision)
    if path is not None:
        return read_json(path / "config.json", required=True), _local_headers(path, str(path.resolve()), None)
    return _hub(src, revision)


def _local_headers(folder: Path, source_id: str, revision: str | None) -> Headers:
    check_weights(folder, source_id)
    with Checkpoint(folder) as ckpt:  # maps the files; reads their headers only
        return Headers(str(folder), dict(ckpt.tensors), source_id, revision)


def _hub(repo_id: str, revision: str | None) -> tuple[dict, Headers]:
    from huggingface_hub import HfApi, errors, hf_hub_download
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except errors.HFValidationError:
        raise MoeError(f"{repo_id}: no such folder, and not a Hub id (org/name); check the path") from None
    with hub_errors(repo_id, revision):
        snapshot = Path(hf_hub_download(repo_id, "config.json", revision=revision)).parent
        config = read_json(snapshot / "config.json", required=True)
        commit = snapshot.name  # snapshots/<commit>/config.json
        if _has_weights(snapshot):  # converted before: the weights are in the cache already
            return config, _local_headers(snapshot, repo_id, commit)
        meta = HfApi().get_safetensors_metadata(repo_id, revision=commit)
    tensors = {}
    for fname, f in meta.files_metadata.items():
        for name, t in f.tensors.items():
            begin, end = t.data_offsets
            if t.dtype not in DTYPES or end - begin != math.prod(t.shape) * DTYPES[t.dtype][1]:
                raise MoeError(f"{repo_id}: {fname}: tensor {name} has a bad header ({t.dtype} {list(t.shape)}, "
                               f"{end - begin} bytes); the repo is damaged")
            tensors[name] = TensorInfo(name, t.dtype, tuple(t.shape), begin, end, Path(fname))
    return config, Headers(repo_id, tensors, repo_id, commit)


def _has_weights(snapshot: Path) -> bool:
    if (snapshot / INDEX).is_file():
        index = read_json(snapshot / INDEX) or {}
        files = set((index.get("weight_map") or {}).values())
        return bool(files) and all((snapshot / f).is_file() for f in files)
    return (snapshot / "model.safetensors").is_file()


def converter_plan(hf: dict, headers: Headers) -> Plan:
    """The converter's plan for this config, checked against the headers as conversion would."""
    arch = arch_registry.for_config(hf)
    try:
        plan = arch.plan(arch.model_config(hf), set(headers.names()))
    except (KeyError, TypeError, ValueError) as exc:
        raise MoeError(f"{headers.folder}: config.json is malformed ({type(exc).__name__}: {exc})") from None
    plan.config.check()
    plan = with_fp8_scales(plan, hf, headers, Path(headers.folder) / "config.json")
    check_plan(plan, headers, headers.folder)
    return plan


def figures(hf: dict, headers: Headers, bits: int = 4, group_size: int = 32) -> dict:
    """What the checkpoint becomes at `bits` (see `sizes`), with where it comes from."""
    check_options(bits, group_size)
    plan = converter_plan(hf, headers)
    encodings = encodings_for(plan, headers, bits)
    return {
        "source": headers.source_id or headers.folder,
        "revision": headers.revision,
        "architecture": plan.config.architecture,
        "hf_architecture": (hf.get("architectures") or [None])[0],
        "bits": bits,
        "source_bytes": headers.nbytes,
        **sizes(plan, encodings, group_size),
    }


def assess(src: str, memory: int | None = None, bits: int = 4, revision: str | None = None,
           remeasure: bool = False, say=None) -> dict:
    """figures() plus this machine's rates, predicted decode speeds and the verdict.

    memory: the RAM moe may use (default: what is available now). What is left of it after the
    non-expert weights, the KV cache and the runtime is the expert budget it allows.
    """
    use_threads()  # measured at the thread count a run uses by default
    hf, headers = read_source(src, revision)
    fig = figures(hf, headers, bits)
    rates = speed.machine(remeasure, say)
    mini = miniature.overhead(hf, bits, remeasure=remeasure, say=say, layout_bytes=fig["layout_bytes"])
    available = available_ram()
    memory = available if memory is None else memory
    in_ram = speed.predict(fig, rates, mini)
    fixed = fig["ram_bytes"] - fig["experts_bin_bytes"]  # everything but the experts
    budget = min(memory - fixed, fig["experts_bin_bytes"])
    at_budget = None
    if fig["ram_bytes"] <= memory:
        verdict, predicted = "fits in RAM", in_ram["decode_tok_s"]
    elif budget >= fig["min_budget_bytes"]:
        at_budget = speed.predict(fig, rates, mini, budget, available)
        predicted = at_budget["decode_tok_s"]
        verdict = f"runs with paging at about {tok_s_text(predicted)} tok/s"
    else:
        verdict, predicted = "does not run", None
    return {
        **fig,
        "memory_bytes": memory,
        "available_ram_bytes": available,
        "budget_bytes": budget if at_budget else None,
        "predicted_decode_tok_s": predicted,
        "predicted_in_ram_tok_s": in_ram["decode_tok_s"],
        "predicted_at_budget": at_budget,
        "hit_rate_model": f"hit = 1 - (1 - f)^{speed.HIT_EXPONENT}, f = expert slots / all experts",
        "machine": {k: rates[k] for k in ("memory_bandwidth", "matvec", "cached_read", "disk_read", "threads",
                                          "measured_at")},
        "verdict": verdict,
    }


def tok_s_text(tok_s: float) -> str:
    """0.37, 4.2, 31, 452: two significant figures below 10, whole numbers above."""
    return f"{tok_s:.2g}" if tok_s < 10 else f"{tok_s:.0f}"
