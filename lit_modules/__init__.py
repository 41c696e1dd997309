"""LightningModules, one file per paper (the math and its orchestration), and their base class; the language-model
toolkit they build on (loading, sampling, quantization, sharding) is `lm/`."""

from lit_modules.base import PaperModule
from lit_modules.causal_lm import CausalLM
from lit_modules.dpo import DPO
from lit_modules.minillm import MiniLLM
from lit_modules.preference_losses import PREFERENCE_LOSSES, preference_loss
from lit_modules.qdpo import QDPO
from lit_modules.radt import RADT
from lit_modules.decision_transformer import DecisionTransformer

__all__ = ["RADT", "DecisionTransformer", "PaperModule", "CausalLM", "DPO", "MiniLLM", "PREFERENCE_LOSSES", "preference_loss", "QDPO"]
