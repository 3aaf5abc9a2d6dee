"""Generation methods, found by module: every module here with a ``METHOD`` (a :class:`Method`) is one.

Diffusion Inversion (``di``) and the rivals it is compared with (``class-inversion``, ``prompt``,
``img2img``) share the sampler, guidance and output code; a method only says how its samples are
planned and conditioned (see :mod:`diffinv.diffusion.methods.base`).
"""

from __future__ import annotations

import importlib
import pkgutil

from diffinv.config import ConfigError
from diffinv.diffusion.methods.base import Conditioning, Method

METHODS: dict[str, Method] = {}
for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    _method = getattr(importlib.import_module(f"{__name__}.{_info.name}"), "METHOD", None)
    if _method is not None:
        METHODS[_method.name] = _method
# di first: it is the default and the method the others are compared with.
METHODS = {"di": METHODS.pop("di"), **METHODS}


def get_method(name: str) -> Method:
    """The registered method called ``name``; a clear error listing them otherwise."""
    if name not in METHODS:
        raise ConfigError(f"method must be one of {', '.join(METHODS)}; got {name!r}")
    return METHODS[name]


__all__ = ["METHODS", "Conditioning", "Method", "get_method"]
