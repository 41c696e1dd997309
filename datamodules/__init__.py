"""LightningDataModules, one file per data family, each with a built-in default that needs no network."""

from datamodules.text import TextDataModule

__all__ = ["TextDataModule"]
