"""Registry of raw-layout ingestion adapters: name -> Adapter (see ingest_common). Add one line per layout."""

from __future__ import annotations

from . import jump_cp, rxrx1, rxrx1_wilds
from .errors import DatasetError
from .ingest_common import Adapter

ADAPTERS: dict[str, Adapter] = {a.name: a for a in (rxrx1.ADAPTER, rxrx1_wilds.ADAPTER, jump_cp.ADAPTER)}


def get(name: str) -> Adapter:
    if name not in ADAPTERS:
        raise DatasetError(f"unknown raw dataset layout {name!r} (known: {sorted(ADAPTERS)})")
    return ADAPTERS[name]
