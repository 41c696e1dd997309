"""DiscoPOP's discovery loop (issue 15; docs/discopop.md "Discovery loop"): an LLM proposes preference losses,
the sandbox validates them, a short DPO run scores them, and the archive feeds the next proposal.

Entry point: :func:`main` (``litpapers discover --config configs/discopop/discover.yaml``).
"""

from discovery.fitness import DPOFitness, Fitness, validate_loss
from discovery.loop import BASELINES, Archive, DiscoveryLoop, main, write_summary
from discovery.proposers import (HFProposer, OpenAIProposer, Proposer, ProposerExhausted, ReplayProposer,
                                 parse_reply)
from discovery.sandbox import CandidateRejected, SandboxLimits, check_code, run_in_worker

__all__ = ["Archive", "BASELINES", "CandidateRejected", "DPOFitness", "DiscoveryLoop", "Fitness", "HFProposer",
           "OpenAIProposer", "Proposer", "ProposerExhausted", "ReplayProposer", "SandboxLimits", "check_code", "main",
           "parse_reply", "run_in_worker", "validate_loss", "write_summary"]
