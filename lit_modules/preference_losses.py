"""Pairwise preference losses: DPO and the DiscoPOP family (Lu et al., 2024, arXiv 2406.08414; docs/papers.md §6).

Every loss maps the four per-sequence log-probabilities of a batch of B preference pairs to B losses::

    loss_fn(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=0.1, **kw)

Notation (docs/papers.md §6): ρ = (log π(y_w) − log π(y_l)) − (log π_ref(y_w) − log π_ref(y_l)) and z = β·ρ.
The formulas follow the published ones literally; the references are TRL's ``DPOTrainer`` (sigmoid, hinge,
ipo, kto_pair, discopop) and the DiscoPOP repository's ``src/alignment/gpo.py`` (lrml = discopop, padll,
cell, aql, aqfl, pfl). Built-in losses optionally fill ``stats`` (a dict) with detached per-loss extras that
``lit_modules.DPO`` logs (e.g. the blend weight of the mixture losses).

Add your own loss without touching this file: write a function with the signature above and name it in
YAML as ``loss: my_package.my_losses:my_loss`` (``module.path:function``), or register it in
:data:`PREFERENCE_LOSSES`.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

PreferenceLossFn = Callable[..., Tensor]


def log_ratio_margin(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
                     ref_rejected_logps: Tensor) -> Tensor:
    """ρ = (log π(y_w) − log π(y_l)) − (log π_ref(y_w) − log π_ref(y_l)), per pair."""
    return (policy_chosen_logps - policy_rejected_logps) - (ref_chosen_logps - ref_rejected_logps)


def _record(stats: dict | None, **values: Tensor) -> None:
    if stats is not None:
        stats.update({k: v.detach().float().mean() for k, v in values.items()})


def sigmoid_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
                 ref_rejected_logps: Tensor, beta: float = 0.1, label_smoothing: float = 0.0,
                 stats: dict | None = None) -> Tensor:
    """DPO (Rafailov et al., 2023, Eq. 7) with conservative label smoothing ε (TRL ``label_smoothing``):

    L = (1 − ε)·(−log σ(z)) + ε·(−log σ(−z)),   z = β·ρ.   ε = 0 is plain DPO.
    """
    if not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5], got {label_smoothing}")
    z = beta * log_ratio_margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return -(1.0 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


def hinge_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
               ref_rejected_logps: Tensor, beta: float = 0.1, stats: dict | None = None) -> Tensor:
    """SLiC / hinge (Zhao et al., 2023): L = relu(1 − z),   z = β·ρ."""
    z = beta * log_ratio_margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return torch.relu(1.0 - z)


def ipo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
             ref_rejected_logps: Tensor, beta: float = 0.1, stats: dict | None = None) -> Tensor:
    """IPO (Azar et al., 2023, Eq. 17; β plays the paper's τ): L = (ρ − 1/(2β))².

    ρ is built from whatever log-probs are passed in. ``lit_modules.DPO`` passes per-token *mean* log-probs for
    ``ipo`` by default, as TRL's ``DPOTrainer`` does for IPO (docs/papers.md §6); ``DPO(length_normalize=False)``
    passes summed log-probs (the formula read literally).
    """
    rho = log_ratio_margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return (rho - 1.0 / (2.0 * beta)) ** 2


def kto_pair_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
                  ref_rejected_logps: Tensor, beta: float = 0.1, stats: dict | None = None) -> Tensor:
    """KTO on pairs (Ethayarajh et al., 2024, HALOs Eq. 7; TRL ≤0.11 / DiscoPOP ``gpo.py`` ``kto_pair``).

    r_w = log π(y_w) − log π_ref(y_w), r_l likewise; the reference points are batch means, clamped at 0, with
    each side's KL estimated from the *other* half: KL_w = max(0, mean(r_w)), KL_l = max(0, mean(r_l)).
    The reference returns the 2B terms [1 − σ(β(r_w − KL_l)) ; 1 − σ(β(KL_w − r_l))]; to return one loss
    per pair (shape (B,)) the two terms of pair i are averaged, so the batch mean equals the reference's:

    L_i = ½·[(1 − σ(β(r_w,i − KL_l))) + (1 − σ(β(KL_w − r_l,i)))].
    The KL terms are not detached (as in the references).
    """
    r_w = policy_chosen_logps - ref_chosen_logps
    r_l = policy_rejected_logps - ref_rejected_logps
    kl_w, kl_l = r_w.mean().clamp(min=0), r_l.mean().clamp(min=0)
    _record(stats, kl_chosen=kl_w, kl_rejected=kl_l)
    return 0.5 * ((1.0 - torch.sigmoid(beta * (r_w - kl_l))) + (1.0 - torch.sigmoid(beta * (kl_w - r_l))))


def discopop_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
                  ref_rejected_logps: Tensor, beta: float = 0.1, tau: float = 0.05,
                  stats: dict | None = None) -> Tensor:
    """DiscoPOP / LRML, log-ratio modulated loss (Lu et al., 2024, Eq. 5; ``gpo.py`` ``log_ratio_modulated_loss``):

    w = σ(z/τ),   L = (1 − w)·(−log σ(z)) + w·exp(−z),   z = β·ρ, τ = 0.05.
    """
    z = beta * log_ratio_margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    w = torch.sigmoid(z / tau)
    _record(stats, blend_weight=w)
    return (1.0 - w) * -F.logsigmoid(z) + w * torch.exp(-z)


def padll_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
               ref_rejected_logps: Tensor, beta: float = 0.1, base_decay: float = 0.9, mismatch_penalty: float = 0.5,
               stats: dict | None = None) -> Tensor:
    """PADLL, performance-adaptive decay logistic loss (``gpo.py`` ``performance_adaptive_decay_logistic_loss``):

    L = 0.9·(1 − 0.5·1[ρ < 0])·(−log σ(z)),   z = β·ρ.
    """
    rho = log_ratio_margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    mismatch = (rho < 0).to(rho.dtype)
    _record(stats, mismatch_rate=mismatch)
    return base_decay * (1.0 - mismatch_penalty * mismatch) * -F.logsigmoid(beta * rho)


def cell_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
              ref_rejected_logps: Tensor, beta: float = 0.1, alpha: float = 0.5,
              stats: dict | None = None) -> Tensor:
    """CELL, combined exponential + logistic loss (``gpo.py`` ``combined_exp_logistic_loss``):

    L = 0.5·exp(−z) + 0.5·(−log σ(z)),   z = β·ρ   (α = 0.5 is the exponential term's weight).
    """
    z = beta * log_ratio_margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return alpha * torch.exp(-z) + (1.0 - alpha) * -F.logsigmoid(z)


def aql_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
             ref_rejected_logps: Tensor, beta: float = 0.1, tau: float = 0.05, start_quantile: float = 0.5,
             quantile_rate: float = 0.01, stats: dict | None = None) -> Tensor:
    """AQL, adaptive quantile loss (``gpo.py`` ``adaptive_quantile_loss``), with batch statistics:

    q = 0.5 + 0.01·(σ(mean(z/0.05)) − 0.5),   w = σ(−(z/0.05 − q)),
    L = w·(−log σ(z)) + (1 − w)·relu(1 − z),   z = β·ρ   (0.05 = ``tau``).
    """
    z = beta * log_ratio_margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    q = start_quantile + quantile_rate * (torch.sigmoid((z / tau).mean()) - start_quantile)
    w = torch.sigmoid(-(z / tau - q))
    _record(stats, blend_weight=w, quantile=q)
    return w * -F.logsigmoid(z) + (1.0 - w) * torch.relu(1.0 - z)


def aqfl_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
              ref_rejected_logps: Tensor, beta: float = 0.1, tau: float = 0.05, quantile_rate: float = 0.05,
              distance_scale: float = 0.1, stats: dict | None = None) -> Tensor:
    """AQFL, adaptive quantile feedback loss (``gpo.py`` ``adaptive_quantile_feedback_loss``), batch statistics:

    q = std(z/0.05)·mean(σ(−z/0.05));   q ← q + 0.05·(σ(mean(z/0.05)) − q);   w = σ(0.1·|z/0.05 − q|),
    L = w·(−log σ(z)) + (1 − w)·relu(1 − z),   z = β·ρ   (0.05 = ``tau``).
    std is the unbiased (Bessel-corrected) one, as ``torch.std``; for a batch of one pair, where that is
    undefined (NaN in the reference), it is taken as 0.
    """
    z = beta * log_ratio_margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    s = z / tau
    std = s.std() if s.numel() > 1 else s.new_zeros(())
    q = std * torch.sigmoid(-s).mean()
    q = q + quantile_rate * (torch.sigmoid(s.mean()) - q)
    w = torch.sigmoid(distance_scale * (s - q).abs())
    _record(stats, blend_weight=w, quantile=q)
    return w * -F.logsigmoid(z) + (1.0 - w) * torch.relu(1.0 - z)


def pfl_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
             ref_rejected_logps: Tensor, beta: float = 0.1, focus_scale: float = 2.0,
             stats: dict | None = None) -> Tensor:
    """PFL, policy focused loss (``gpo.py`` ``policy_focused_loss``):

    L = −log σ(z)/2 where log π(y_w) > log π(y_l) (the *policy* alone, no reference), else 2·relu(1 − z).
    """
    z = beta * log_ratio_margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    correct = policy_chosen_logps > policy_rejected_logps
    _record(stats, policy_correct=correct.float())
    return torch.where(correct, -F.logsigmoid(z) / focus_scale, torch.relu(1.0 - z) * focus_scale)


#: Loss name → function. ``lrml`` is DiscoPOP's name in its paper/repository, ``dpo`` an alias of ``sigmoid``.
PREFERENCE_LOSSES: dict[str, PreferenceLossFn] = {
    "sigmoid": sigmoid_loss, "dpo": sigmoid_loss, "hinge": hinge_loss, "ipo": ipo_loss, "kto_pair": kto_pair_loss,
    "discopop": discopop_loss, "lrml": discopop_loss, "padll": padll_loss, "cell": cell_loss, "aql": aql_loss,
    "aqfl": aqfl_loss, "pfl": pfl_loss,
}


def resolve_preference_loss(loss: str | PreferenceLossFn) -> PreferenceLossFn:
    """A registered name (:data:`PREFERENCE_LOSSES`), ``"module.path:function"``, or a callable."""
    if callable(loss):
        return loss
    if not isinstance(loss, str):
        raise TypeError(f"loss must be a name, 'module.path:function' or a callable, got {type(loss).__name__}")
    if loss in PREFERENCE_LOSSES:
        return PREFERENCE_LOSSES[loss]
    if ":" not in loss:
        raise ValueError(f"unknown preference loss {loss!r}: use one of {sorted(PREFERENCE_LOSSES)} "
                         "or 'module.path:function'")
    module_name, _, attr = loss.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except ImportError as e:
        raise ValueError(f"loss {loss!r}: cannot import module {module_name!r} ({e})") from None
    except AttributeError:
        raise ValueError(f"loss {loss!r}: module {module_name!r} has no attribute {attr!r}") from None
    if not callable(fn):
        raise ValueError(f"loss {loss!r} is not callable")
    return fn


def preference_loss(name: str | PreferenceLossFn, policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
                    ref_chosen_logps: Tensor, ref_rejected_logps: Tensor, beta: float = 0.1,
                    stats: dict | None = None, **kwargs) -> Tensor:
    """Per-pair losses (shape (B,)) of the loss ``name`` (see :func:`resolve_preference_loss`).

    ``kwargs`` go to the loss (``label_smoothing`` for sigmoid, ``tau`` for discopop, ...); ``stats``, when a
    dict, receives the loss's logged extras (only passed to losses that accept it).
    """
    fn = resolve_preference_loss(name)
    params = inspect.signature(fn).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    unknown = [k for k in kwargs if k not in params and not takes_any]
    if unknown:
        raise TypeError(f"preference loss {name!r} does not accept {unknown}; its arguments: "
                        f"{[p for p in params if p != 'stats'][4:]}")
    if stats is not None and ("stats" in params or takes_any):
        kwargs["stats"] = stats
    losses = fn(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=beta, **kwargs)
    if losses.shape != policy_chosen_logps.shape:
        raise ValueError(f"preference loss {name!r} returned shape {tuple(losses.shape)}, expected one loss per "
                         f"pair {tuple(policy_chosen_logps.shape)}")
    return losses
