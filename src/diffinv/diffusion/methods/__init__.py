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
from diffinv.registry import Registry

METHODS: Registry[Method] = Registry("method", ConfigError)
# di first: it is the default and the method the others are compared with.
_modules = sorted((m.name for m in pkgutil.iter_modules(__path__)), key=lambda name: (name != "di", name))
for _name in _modules:
    _method = getattr(importlib.import_module(f"{__name__}.{_name}"), "METHOD", None)
    if _method is not None:
        METHODS.add(_method.name, _method)


def get_method(name: str) -> Method:
    """The registered method called ``name``; a clear error listing them otherwise."""
    return METHODS.get(name)


__all__ = ["METHODS", "Conditioning", "Method", "get_method"]
