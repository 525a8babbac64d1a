"""Method registry: a decorator for classes, discovery through the `platebench.methods` entry-point group.

Built-in methods are declared in platebench's own pyproject under that group, so built-ins and
out-of-tree methods are found the same way. An entry point's name must equal the registered name.
"""

from __future__ import annotations

import difflib
from importlib.metadata import entry_points

from .base import Method, MethodError

GROUP = "platebench.methods"
_REGISTRY: dict[str, type[Method]] = {}
_ENTRY_POINTS: dict[str, object] | None = None


def register(name: str):
    """Class decorator: register a Method subclass under `name` (and set its `name`)."""

    def deco(cls: type[Method]) -> type[Method]:
        if not (isinstance(cls, type) and issubclass(cls, Method)):
            raise MethodError(f"register({name!r}): {cls!r} is not a Method subclass")
        existing = _REGISTRY.get(name)
        if existing is not None and existing is not cls and existing.__qualname__ != cls.__qualname__:
            raise MethodError(f"method name {name!r} is registered twice ({existing.__module__}, {cls.__module__})")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def _entry_points() -> dict[str, object]:
    global _ENTRY_POINTS
    if _ENTRY_POINTS is None:
        _ENTRY_POINTS = {ep.name: ep for ep in entry_points(group=GROUP)}
    return _ENTRY_POINTS


def _load(name: str) -> type[Method]:
    if name not in _REGISTRY:
        ep = _entry_points()[name]
        obj = ep.load()
        if name not in _REGISTRY:
            # A plugin may skip the decorator; registering through its entry point is enough.
            register(name)(obj)
    cls = _REGISTRY[name]
    if cls.name != name:
        raise MethodError(f"entry point {name!r} loads {cls.__module__}.{cls.__qualname__}, registered as {cls.name!r}")
    return cls


def names() -> list[str]:
    return sorted(set(_entry_points()) | set(_REGISTRY))


def get_method(name: str) -> type[Method]:
    """The Method class registered under `name`; unknown names fail with the known list and closest match."""
    known = names()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.4)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise MethodError(f"unknown method {name!r}.{hint} Known methods: {', '.join(known)}")
    return _load(name)


def list_methods() -> dict[str, type[Method]]:
    return {n: _load(n) for n in names()}
