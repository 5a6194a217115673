"""Rendering backends behind one registry: the stages look a backend up by its config name.

A new backend is one module with a Renderer subclass, plus one line in BUILTIN (or a call to
`register` from the code that brings it, e.g. a plugin or a test). Its settings come with it
(Renderer.settings_class): with_backend_settings checks what a run gives for them. Built-in
backends are imported on first use, so a fal run never imports torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from pydantic import ValidationError

from avatarflow.tasks.backends.base import NOMINAL_AREA, Renderer, RenderJob

if TYPE_CHECKING:
    from avatarflow.tasks.config import BatchConfig

__all__ = [
    "BUILTIN",
    "BackendSettingsError",
    "NOMINAL_AREA",
    "RenderJob",
    "Renderer",
    "UnknownBackendError",
    "backend_names",
    "get_renderer",
    "register",
    "renderer_class",
    "with_backend_settings",
]

# name → "module:Class", imported lazily
BUILTIN = {
    "auto": "avatarflow.tasks.backends.auto:AutoRenderer",
    "fal": "avatarflow.tasks.backends.fal.renderer:FalRenderer",
    "local": "avatarflow.tasks.backends.local:LocalRenderer",
}
_registered: dict[str, type[Renderer]] = {}


class UnknownBackendError(ValueError):
    """No backend of that name is registered."""


class BackendSettingsError(ValueError):
    """A run gave a backend a setting it does not have, or a value it refuses."""


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


def with_backend_settings(config: BatchConfig) -> BatchConfig:
    """config with its backend_settings checked against the backend's settings class; a
    built-in backend's are folded into its own field (`fal`, `local`). Errors name the backend
    and the setting, never the value (it may be a secret)."""
    given = config.backend_settings
    if not given:
        return config
    cls = renderer_class(config.backend)
    if cls.settings_class is None:
        raise BackendSettingsError(
            f"backend {cls.name!r} has no settings (given: {', '.join(sorted(given))})"
        )
    held = getattr(config, cls.config_field) if cls.config_field else None
    current = held.model_dump(exclude_unset=True) if held is not None else {}
    try:
        settings = cls.settings_class(**{**current, **given})
    except ValidationError as exc:
        known = ", ".join(cls.settings_class.model_fields)
        problems = [
            f"no setting {'.'.join(map(str, err['loc']))!r} (its settings: {known})"
            if err["type"] == "extra_forbidden"
            else f"setting {'.'.join(map(str, err['loc']))!r}: {err['msg']}"
            for err in exc.errors()
        ]
        raise BackendSettingsError(f"backend {cls.name!r}: {'; '.join(problems)}") from None
    if cls.config_field is None:
        return config
    return config.model_copy(update={cls.config_field: settings, "backend_settings": {}})
