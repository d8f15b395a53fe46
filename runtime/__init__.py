"""moe.runtime: load a converted model and run it (router first, only the chosen experts).

`kernels` is imported first: it points numba's on-disk cache under the moe cache before
anything imports numba. The model itself is imported on first use, so `moe.runtime.layout`
and friends stay light.
"""

from . import kernels  # noqa: F401

__all__ = ["Model", "load_model"]


def __getattr__(name: str):
    if name in __all__:
        from . import model

        return getattr(model, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
