"""moe: Mixture-of-Experts language models on a laptop CPU."""

__version__ = "0.1.0"
