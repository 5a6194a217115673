"""Rendering backends behind one registry: the stages look a backend up by its config name.

A new backend is one module with a Renderer subclass, plus one line in BUILTIN (or a call to
`register` from the code that brings it, e.g. a plugin or a test). Built-in backends are imported
on first use, so a fal run never imports torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from avatarflow.tasks.backends.base import NOMINAL_AREA, Renderer, RenderJob

if TYPE_CHECKING:
    from avatarflow.tasks.config import BatchConfig

__all__ = [
    "BUILTIN",
    "NOMINAL_AREA",
    "RenderJob",
    "Renderer",
    "UnknownBackendError",
    "backend_names",
    "get_renderer",
    "register",
    "renderer_class",
]

# name → "module:Class", imported lazily
BUILTIN = {
    "fal": "avatarflow.tasks.backends.fal.renderer:FalRenderer",
    "local": "avatarflow.tasks.backends.local:LocalRenderer",
}
_registered: dict[str, type[Renderer]] = {}


class UnknownBackendError(ValueError):
    """No backend of that name is registered."""


def register(cls: type[Renderer]) -> type[Renderer]:
    """Make a Renderer subclass available under cls.name (usable as a class decorator)."""
    _registered[cls.name] = cls
    return cls


def backend_names() -> list[str]:
    """Every backend name a config may use."""
    return sorted({*BUILTIN, *_registered})


def renderer_class(name: str) -> type[Renderer]:
    """The Renderer class registered under name (cheap questions need no instance)."""
    if name not in _registered:
        if name not in BUILTIN:
            known = ", ".join(backend_names())
            raise UnknownBackendError(f"unknown backend {name!r}: expected one of {known}")
        module, attr = BUILTIN[name].split(":")
        register(getattr(importlib.import_module(module), attr))
    return _registered[name]


def get_renderer(config: BatchConfig) -> Renderer:
    """This worker process's renderer for config, built once."""
    return renderer_class(config.backend).shared(config)
