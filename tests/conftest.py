"""Every test runs with its own moe home and Hugging Face cache, offline."""

import os
import tempfile
from pathlib import Path

import pytest
from huggingface_hub import constants

# Compiled kernels are cached outside the user's home (moe.runtime.kernels would pick ~/.cache/moe at import).
os.environ.setdefault("NUMBA_CACHE_DIR", str(Path(tempfile.gettempdir()) / "moe-tests-numba-cache"))


@pytest.fixture(autouse=True)
def isolated_home(tmp_path_factory, monkeypatch):
    """MOE_HOME, HF_HOME and HF_HUB_CACHE in a tmp folder, HF_HUB_OFFLINE=1; returns that folder.

    huggingface_hub reads its environment once at import, so its constants are patched as well.
    """
    home = tmp_path_factory.mktemp("home")
    hf_home = home / "hf"
    hub_cache = hf_home / "hub"
    monkeypatch.setenv("MOE_HOME", str(home / "moe"))
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_HOME", str(hf_home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(hf_home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(hf_home / "stored_tokens"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return home
