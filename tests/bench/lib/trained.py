"""The trained models of ../shared/models (tiny MoE checkpoints trained on Python source) for the benchmarks."""

from __future__ import annotations

import os
from pathlib import Path

from moe.convert import convert

MODELS = Path(os.environ.get("MOE_SHARED_MODELS", Path(__file__).resolve().parents[4] / "shared" / "models"))
TRAINED = ("tinymix", "tinyqwen3moe", "tinyllama4", "tinygptoss")


def eval_text() -> str:
    """The evaluation text the models were not trained on: Python's standard library."""
    return (MODELS / "eval-python-stdlib.txt").read_text()


def converted(name: str, folder: Path) -> Path:
    """Trained model `name` converted to 4 bits under folder (as `name`-q4), once."""
    dst = folder / f"{name}-q4"
    if not (dst / "manifest.json").exists():
        convert(str(MODELS / name), dst, bits=4)
    return dst
