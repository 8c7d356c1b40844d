"""Source kind -> adapter class.

Adapters register themselves with ``@register`` when their package is imported. By
convention the adapter of kind ``k`` lives in the package ``ingest.sources.k``, so
``adapter_for`` imports that package on first use: callers need not know where
adapters live.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from typing import TypeVar

from ingest.sources.base import SourceAdapter

A = TypeVar("A", bound=type[SourceAdapter])

_ADAPTERS: dict[str, type[SourceAdapter]] = {}
_KIND_RE = re.compile(r"^[a-z][a-z0-9_]*$")


def register(cls: A) -> A:
    """Class decorator: make ``cls`` the adapter for ``cls.kind``.

    Raises:
        ValueError: ``cls.kind`` is missing or malformed, or another class already
            holds that kind.
    """
    kind = getattr(cls, "kind", None)
    if not isinstance(kind, str) or not _KIND_RE.match(kind):
        raise ValueError(f"{cls.__qualname__}.kind must be a lower-case identifier, not {kind!r}")
    holder = _ADAPTERS.get(kind)
    if holder is not None and holder is not cls:
        raise ValueError(f"source kind {kind!r} is already registered to {holder.__qualname__}")
    _ADAPTERS[kind] = cls
    return cls


def adapter_for(kind: str) -> type[SourceAdapter]:
    """The adapter class for source kind ``kind`` (importing its package if needed).

    Raises:
        KeyError: no adapter exists for ``kind``; the message lists the known kinds.
    """
    if kind not in _ADAPTERS and _KIND_RE.match(kind):
        module = f"ingest.sources.{kind}"
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            # Only "no such package" means an unknown kind; a missing dependency of an
            # existing adapter is a real error and propagates.
            if exc.name != module:
                raise
    try:
        return _ADAPTERS[kind]
    except KeyError:
        known = ", ".join(sorted(set(_ADAPTERS) | _adapter_packages())) or "none"
        raise KeyError(f"no source adapter for kind {kind!r} (known: {known})") from None


def _adapter_packages() -> set[str]:
    """Names of the packages under ``ingest/sources/`` (one per adapter kind)."""
    import ingest.sources

    return {m.name for m in pkgutil.iter_modules(ingest.sources.__path__) if m.ispkg}
