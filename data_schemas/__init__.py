"""Explicit Arrow schemas, one module per dataset; each has ``NAME``, ``VERSION``, ``SCHEMA``, ``validate``."""

from __future__ import annotations

from types import ModuleType

from data_schemas import downloaded, embeddings, filtered, image_hashes, rejects, shapes, sources, tokens
from data_schemas.base import SchemaError, schema_identity

MODULES: dict[str, ModuleType] = {
    m.NAME: m for m in (sources, downloaded, filtered, rejects, image_hashes, shapes, tokens, embeddings)
}


def module_for(name: str) -> ModuleType:
    """The schema module of dataset ``name``; ``ValueError`` if there is none."""
    try:
        return MODULES[name]
    except KeyError:
        raise ValueError(f"unknown dataset schema {name!r}; known: {sorted(MODULES)}") from None


__all__ = [
    "MODULES",
    "SchemaError",
    "downloaded",
    "embeddings",
    "filtered",
    "image_hashes",
    "module_for",
    "rejects",
    "schema_identity",
    "shapes",
    "sources",
    "tokens",
]
