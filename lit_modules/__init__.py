"""LightningModules, one file per paper, plus the shared HF loading helpers and the base class."""

from lit_modules.base import PaperModule
from lit_modules.causal_lm import CausalLM

__all__ = ["PaperModule", "CausalLM"]
