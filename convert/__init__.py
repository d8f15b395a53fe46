"""moe.convert: Hugging Face checkpoints into the 4-bit memory-mapped layout."""
