"""moe.runtime: load a converted model and run it (router first, only the chosen experts)."""
