"""moe.convert: Hugging Face checkpoints into the 4-bit memory-mapped layout."""

from .converter import convert, summary
from .demo import demo_model

__all__ = ["convert", "demo_model", "summary"]
