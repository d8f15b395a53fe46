"""SRC of a conversion: a local folder in the Hub layout, or a Hub id fetched through huggingface_hub.

Hub ids go through `snapshot_download`, so its cache, HF_HOME, HF_HUB_CACHE, HF_TOKEN and
HF_HUB_OFFLINE all apply, and only the files conversion reads are downloaded: first the
config, tokenizer and index, then the shards the index names (all *.safetensors when there
is no index; repos that also carry `consolidated.safetensors` are not downloaded twice).
Weights must be safetensors: pickle files (.bin, .pt) can run code when loaded and are never read.
"""

from __future__ import annotations

import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..runtime.errors import MoeError
from ..runtime.files import load_json, not_a_file
from .safetensors_io import INDEX

SMALL_FILES = ["config.json", "model.safetensors.index.json", "tokenizer*", "generation_config.json",
               "special_tokens_map.json", "chat_template.jinja"]
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class Source:
    folder: Path  # a folder holding config.json and the safetensors weights
    id: str  # the Hub id, or the folder's absolute path
    revision: str | None  # the commit of a Hub snapshot


def local_folder(src: str, revision: str | None = None) -> Path | None:
    """`src` as a local folder (a folder, and no revision asked of it), or None when nothing is there."""
    path = Path(src).expanduser()
    if not path.exists():
        return None
    if not path.is_dir():
        raise MoeError(f"{src}: is a file; SRC is a folder in the Hugging Face layout or a Hub id (org/name)")
    if revision:
        raise MoeError(f"--revision {revision}: only applies to Hub ids, and {src} is a local folder")
    return path


def resolve(src: str, revision: str | None = None) -> Source:
    """The folder to convert from: `src` itself, or the Hub snapshot of `src` at `revision`."""
    path = local_folder(src, revision)
    if path is not None:
        check_weights(path, src)
        return Source(path.resolve(), str(path.resolve()), None)
    if not _HUB_ID.match(src):
        raise MoeError(f"{src}: no such folder, and not a Hub id (org/name); check the path")
    folder = _download(src, revision)
    check_weights(folder, src)
    return Source(folder, src, folder.name)


def check_weights(folder: Path, src: str) -> None:
    if any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.name.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise MoeError(f"{src}: only pickle weights ({', '.join(pickles[:3])}), which moe never loads (they can "
                       "run code); use a checkpoint with .safetensors weights")
    raise MoeError(f"{src}: no .safetensors weights found; moe converts safetensors checkpoints only")


def _download(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    quiet = not sys.stderr.isatty() and not are_progress_bars_disabled()
    if quiet:
        disable_progress_bars()
    try:
        with hub_errors(repo_id, revision):
            folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=SMALL_FILES))
            weights = _indexed_shards(folder) or ["*.safetensors"]
            # the second call pins the commit the first one resolved
            return Path(snapshot_download(repo_id, revision=folder.name, allow_patterns=SMALL_FILES + weights))
    finally:
        if quiet:
            enable_progress_bars()


@contextmanager
def hub_errors(repo_id: str, revision: str | None):
    """huggingface_hub's exceptions, and the network's, as one line each that says what to do."""
    from huggingface_hub import errors

    at = f" at revision {revision}" if revision else ""
    try:
        yield
    except errors.GatedRepoError:
        raise MoeError(f"{repo_id}: gated on the Hugging Face Hub; accept its terms on huggingface.co/{repo_id} "
                       "and set HF_TOKEN") from None
    except errors.RepositoryNotFoundError:
        raise MoeError(f"{repo_id}: no such model on the Hugging Face Hub (if it is private, set HF_TOKEN)") from None
    except errors.RevisionNotFoundError:
        raise MoeError(f"{repo_id}: no revision {revision!r} on the Hugging Face Hub") from None
    except errors.RemoteEntryNotFoundError:
        raise MoeError(f"{repo_id}{at}: has no config.json; not a transformers model") from None
    except errors.NotASafetensorsRepoError:
        raise MoeError(f"{repo_id}{at}: no model.safetensors or {INDEX}; moe converts safetensors checkpoints "
                       "only") from None
    except errors.SafetensorsParsingError as exc:
        raise MoeError(f"{repo_id}: a safetensors header is not valid ({exc}); the repo is damaged") from None
    except (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled):
        raise MoeError(f"{repo_id}{at}: not in the Hugging Face cache, and the Hub is unreachable (offline mode "
                       "or no network); connect, or unset HF_HUB_OFFLINE") from None
    except errors.HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "an error"
        raise MoeError(f"{repo_id}: the Hugging Face Hub answered {status}; try again later", 1) from None
    except MoeError:
        raise
    except Exception as exc:  # network stack errors (httpx raises OSError subclasses), disk errors in the cache
        raise MoeError(f"{repo_id}: talking to the Hugging Face Hub failed ({type(exc).__name__}: {exc}); check "
                       "the network and try again", 1) from None


def _indexed_shards(folder: Path) -> list[str] | None:
    """The shard files model.safetensors.index.json names, None without a readable index."""
    try:
        weight_map = load_json(folder / INDEX, "")["weight_map"]
        return sorted({f for f in weight_map.values() if isinstance(f, str)}) or None
    except (MoeError, KeyError, TypeError, AttributeError):
        return None


def read_json(path: Path, required: bool = False) -> dict | None:
    """A JSON object file of the source folder (config.json, generation_config.json...); None when absent."""
    if not_a_file(path) == "missing":
        if required:
            raise MoeError(f"{path}: missing; a Hugging Face checkpoint folder needs its config.json")
        return None
    data = load_json(path, "re-download the model")
    if not isinstance(data, dict):
        raise MoeError(f"{path}: not a JSON object; re-download the model")
    return data
