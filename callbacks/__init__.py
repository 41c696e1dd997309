"""Probes and evaluation callbacks."""

__all__: list[str] = []
