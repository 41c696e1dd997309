"""Over-squashing probes of "Transformers need glasses!" (Barbero et al., NeurIPS 2024, arXiv 2406.04267).

Pure functions (usable on any model) and Lightning callbacks that run them during training/validation:

- :func:`representational_collapse` — Thm 4.2: for ``v = [x, a]`` and ``v* = [x, a, a]`` the last-token
  representations ``y_n`` and ``y*_{n+1}`` converge as n grows; we measure ‖y_n − y*_{n+1}‖_∞ at a layer.
  :class:`RepresentationalCollapseProbe` sweeps lengths for three prompt families (repeated ones, random
  digits, ones with a comma every third digit) in fp32, bf16 autocast and (optionally) a bf16 copy of the
  model, plus the total-variation distance of the two next-token distributions and each precision's noise
  floor (:func:`rounding_noise_floor`), below which a Δ cannot be told apart from rounding.
- :func:`token_sensitivity` — Thm 5.1: ‖∂y_n/∂v_i‖_F per input position i (Jacobian of the last position's
  hidden state w.r.t. input embedding i). :class:`OverSquashingProbe` turns it into the U-shape figure.
- :class:`SequenceTaskProbe` — greedy accuracy on the copy/count/sum/find-odd tasks of
  ``datamodules.sequence_tasks`` across lengths, and by relative position of the relevant token.

Which model a callback watches (:func:`find_causal_lm`): ``pl_module`` itself when it is a Hugging Face
``PreTrainedModel``, else ``pl_module.model`` when that is one (``lit_modules.CausalLM`` and the other modules
here); failing both, the first of ``pl_module.model``/``pl_module`` that exposes ``get_input_embeddings()``
(hand-built models). The model must accept ``input_ids`` or
``inputs_embeds`` and ``output_hidden_states=True`` and return ``.hidden_states`` (index 0 = embeddings,
−1 = final layer after the final norm) and ``.logits``.

Callbacks run every ``every_n_steps`` optimizer steps and/or at the end of validation (not the sanity
check), on global rank 0 only, in eval mode (the previous train/eval mode is restored), under
``torch.no_grad`` except for the sensitivity's ``torch.autograd.grad`` w.r.t. the input embeddings (which
never writes a parameter's ``.grad``). Scalars go to every logger as ``probes/...``; figures go to
TensorBoard (``add_figure``) and to PNG files in ``figure_dir`` (default ``{log_dir}/figures``: the logger's
``version_N`` folder, so a run never overwrites another's; ``None``: no files). Each round prints progress lines
on stderr (``probe collapse: fp32, 18 sequences``; ``progress=False`` silences them), and
:func:`probe_summary` renders the last results as a table (``litpapers fit|validate`` prints it at the end).
"""

from __future__ import annotations

import contextlib
import copy
import random
import re
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from matplotlib.figure import Figure
from torch import nn
from transformers import PreTrainedModel

from datamodules.sequence_tasks import TASKS, encode_prompt, format_digits, make_example
from lm.tokenizers import load_tokenizer

IdSequence = Sequence[int] | torch.Tensor
#: precision name -> (autocast dtype, parameter dtype of a temporary copy of the model or None)
_PRECISIONS = {"fp32": (None, None), "bf16": (torch.bfloat16, None), "bf16_weights": (None, torch.bfloat16)}
_LINESTYLES = {"fp32": "-", "bf16": "--", "bf16_weights": ":"}
FAMILIES = ("ones", "digits", "ones_commas")


# ----------------------------------------------------------------------------------------------- helpers
def find_causal_lm(pl_module: nn.Module) -> nn.Module:
    """The model a probe watches (lookup order in the module docstring)."""
    if isinstance(pl_module, PreTrainedModel):  # before `.model`: a ...ForCausalLM's `.model` is its headless base
        return pl_module
    candidates = [c for c in (getattr(pl_module, "model", None), pl_module) if isinstance(c, nn.Module)]
    if isinstance(candidates[0], PreTrainedModel):
        return candidates[0]
    for c in candidates:
        if hasattr(c, "get_input_embeddings"):
            return c
    raise TypeError(f"{type(pl_module).__name__}: no causal LM found (expected `.model` to be a transformers "
                    "PreTrainedModel, or the module itself to be one / to expose get_input_embeddings())")


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode (no dropout) and restore each submodule's previous mode afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


def _device(model: nn.Module) -> torch.device:
    return model.get_input_embeddings().weight.device


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _as_list(ids: IdSequence) -> list[int]:
    if isinstance(ids, torch.Tensor):
        if ids.dim() == 2 and ids.shape[0] == 1:
            ids = ids[0]
        if ids.dim() != 1:
            raise ValueError(f"expected one sequence of token ids (shape (n,) or (1, n)), got shape {tuple(ids.shape)}")
        return ids.tolist()
    return list(ids)


def last_token_states(model: nn.Module, sequences: Sequence[IdSequence], autocast_dtype: torch.dtype | None = None,
                      batch_size: int = 16, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states of every layer and the logits at each sequence's last token, in ``dtype`` (float32).

    Sequences are right-padded into batches; with causal attention, tokens after position t never affect
    position t, so the states at each last real token are those of the unpadded sequence (no mask needed).
    Returns ``(hidden (B, L+1, d), logits (B, V))``. Consecutive pairs stay in one batch (``batch_size`` even).
    """
    seqs = [_as_list(s) for s in sequences]
    if any(len(s) == 0 for s in seqs):
        raise ValueError("empty token sequence")
    device = _device(model)
    hidden, logits = [], []
    batch_size += batch_size % 2
    with torch.no_grad(), _autocast(device, autocast_dtype):
        for start in range(0, len(seqs), batch_size):
            chunk = seqs[start:start + batch_size]
            width = max(len(s) for s in chunk)
            ids = torch.tensor([s + [s[-1]] * (width - len(s)) for s in chunk], device=device)
            last = torch.tensor([len(s) - 1 for s in chunk], device=device)
            rows = torch.arange(len(chunk), device=device)
            out = model(input_ids=ids, output_hidden_states=True)
            hidden.append(torch.stack([h[rows, last] for h in out.hidden_states], dim=1).to(dtype))
            logits.append(out.logits[rows, last].to(dtype))
    return torch.cat(hidden), torch.cat(logits)


def total_variation(logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
    """TV(p, q) = ½ Σ_v |p(v) − q(v)| between the softmax distributions of two logit vectors (last dim)."""
    return 0.5 * (logits_a.float().softmax(-1) - logits_b.float().softmax(-1)).abs().sum(-1)


# ------------------------------------------------------------------------------------------ pure probes
def representational_collapse(model: nn.Module, ids_a: IdSequence, ids_b: IdSequence, layer: int = -1,
                              autocast_dtype: torch.dtype | None = None) -> float:
    """‖h_a − h_b‖_∞ of the last position's hidden state at ``layer`` (index into ``hidden_states``:
    0 = embeddings, −1 = final). Barbero et al. Thm 4.2 take ``ids_b = ids_a + [ids_a[-1]]``.

    ``autocast_dtype=torch.bfloat16`` runs the forward under autocast (the paper's low-precision setting).
    The model is put in eval mode for the call and restored.
    """
    with eval_mode(model):
        hidden, _ = last_token_states(model, [ids_a, ids_b], autocast_dtype)
    return (hidden[0, layer] - hidden[1, layer]).abs().max().item()


def token_sensitivity(model: nn.Module, input_ids: IdSequence, layer: int = -1, num_projections: int | None = None,
                      seed: int = 0, chunk_size: int = 64) -> torch.Tensor:
    """Per input position i, ‖J_i‖_F with J_i = ∂h_last/∂e_i (Barbero et al. Thm 5.1), shape (seq_len,).

    Each batch row j carries a copy of the embeddings E and a direction u_j; one backward of Σ_j u_j·h_last(E_j)
    gives u_jᵀ J_i for every i at once (vector-Jacobian products, ``torch.autograd.grad`` w.r.t. E only, so
    parameter ``.grad`` is never written). Exact (``num_projections=None``): u_j = the d standard basis
    vectors, ‖J_i‖²_F = Σ_j ‖e_jᵀ J_i‖². Estimate: m Gaussian u_j, E‖uᵀJ‖² = ‖J‖²_F, so
    ‖J_i‖²_F ≈ (1/m) Σ_j ‖u_jᵀ J_i‖².
    Rows are independent only in eval mode, which this function sets (and restores).
    """
    with eval_mode(model), torch.inference_mode(False), torch.enable_grad():
        ids = torch.tensor(_as_list(input_ids), device=_device(model))
        embeds = model.get_input_embeddings()(ids[None]).detach()  # (1, n, d)
        d = embeds.shape[-1]
        if num_projections is None:
            directions = torch.eye(d, device=embeds.device)
        else:
            gen = torch.Generator().manual_seed(seed)
            directions = torch.randn(num_projections, d, generator=gen).to(embeds.device)
        squared = torch.zeros(ids.shape[0], device=embeds.device)
        for u in directions.split(chunk_size):
            e = embeds.expand(u.shape[0], -1, -1).clone().requires_grad_(True)
            h = model(inputs_embeds=e, output_hidden_states=True).hidden_states[layer][:, -1].float()
            if h.shape[-1] != d:
                raise ValueError(f"hidden size {h.shape[-1]} at layer {layer} != embedding size {d}")
            (grad,) = torch.autograd.grad((h * u).sum(), e)
            squared += grad.float().pow(2).sum(dim=(0, 2))
    if num_projections is not None:
        squared /= num_projections
    return squared.sqrt().cpu()


# ------------------------------------------------------------------------------------------- callbacks
#: Default ``figure_dir``: ``{log_dir}`` is the trainer's ``log_dir`` (the logger's ``version_N`` folder).
LOG_DIR_FIGURES = "{log_dir}/figures"


class _Probe(L.Callback):
    """Scheduling, rank-0 guard, eval mode, progress lines and logging shared by the probes; subclasses implement
    ``measure``, ``scalars``, ``figure`` and ``summary``."""

    name = "probe"

    def __init__(self, every_n_steps: int = 0, on_validation: bool = True,
                 figure_dir: str | None = LOG_DIR_FIGURES, tokenizer: str | None = None, progress: bool = True):
        if every_n_steps < 0:
            raise ValueError(f"every_n_steps must be >= 0 (0 = off), got {every_n_steps}")
        self.every_n_steps, self.on_validation = every_n_steps, on_validation
        self.figure_dir, self.tokenizer_name, self.progress = figure_dir, tokenizer, progress
        self.results: dict | None = None
        self._last_step: int | None = None
        self._log_dir: str | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Read the trainer's ``log_dir`` here, on every rank (under DDP it is a collective call), for
        :meth:`figure_path`; ``None`` without a logger."""
        self._log_dir = trainer.log_dir if trainer.loggers else None

    def figure_path(self) -> Path | None:
        """Where this probe's PNG goes: ``figure_dir/<name>.png`` with ``{log_dir}`` filled in; ``None`` when
        ``figure_dir`` is ``None`` or names ``{log_dir}`` and the run has no logger."""
        if self.figure_dir is None or ("{log_dir}" in self.figure_dir and self._log_dir is None):
            return None
        return Path(self.figure_dir.replace("{log_dir}", str(self._log_dir))) / f"{self.name}.png"

    def say(self, text: str) -> None:
        """One progress line on stderr, ``probe <name>: <text>`` (only rank 0 runs the probes)."""
        if self.progress:
            print(f"probe {self.name}: {text}", file=sys.stderr, flush=True)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self.run(trainer, pl_module)

    def on_validation_end(self, trainer, pl_module) -> None:
        if self.on_validation and not trainer.sanity_checking:
            self.run(trainer, pl_module)

    def tokenizer(self, pl_module):
        if self.tokenizer_name is not None:
            return load_tokenizer(self.tokenizer_name)
        tokenizer = getattr(pl_module, "tokenizer", None)
        return tokenizer if tokenizer is not None else load_tokenizer(None)

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Measure once per optimizer step at most, on rank 0, and log."""
        if not trainer.is_global_zero or self._last_step == trainer.global_step:
            return
        self._last_step = trainer.global_step
        model = find_causal_lm(pl_module)
        start = time.perf_counter()
        self.say(f"measuring at step {trainer.global_step} (lengths {self.lengths})")
        with eval_mode(model):
            self.results = self.measure(model, self.tokenizer(pl_module))
        for logger in trainer.loggers:
            logger.log_metrics(self.scalars(self.results), step=trainer.global_step)
        tensorboards = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        path = self.figure_path()
        if tensorboards or path is not None:
            fig = self.figure(self.results)
            for lg in tensorboards:
                lg.experiment.add_figure(f"probes/{self.name}", fig, trainer.global_step, close=False)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                fig.savefig(path, dpi=90)
        self.say(f"done in {time.perf_counter() - start:.1f} s" + (f", figure {path}" if path is not None else ""))

    def measure(self, model: nn.Module, tokenizer) -> dict:
        raise NotImplementedError

    def scalars(self, results: dict) -> dict[str, float]:
        raise NotImplementedError

    def figure(self, results: dict) -> Figure:
        raise NotImplementedError

    def summary(self, results: dict) -> tuple[str, list[tuple[str, list[float]]]]:
        """The rows of :func:`probe_summary`: a title and ``(quantity, one value per length in self.lengths)``."""
        raise NotImplementedError


def probe_summary(callbacks: Sequence[L.Callback]) -> str:
    """A table of the last results of every probe in ``callbacks`` (those that have run): one block per probe,
    one row per quantity, one column per length. ``""`` when no probe has results."""
    blocks = []
    for probe in callbacks:
        if not isinstance(probe, _Probe) or probe.results is None:
            continue
        title, rows = probe.summary(probe.results)
        width = max(len(name) for name, _ in rows)
        header = f"  {'length':<{width}}" + "".join(f"{n:>10}" for n in probe.lengths)
        lines = [f"  {name:<{width}}" + "".join(f"{v:>10.3g}" for v in values) for name, values in rows]
        blocks.append("\n".join([f"probe {probe.name}: {title}", header, *lines]))
    return "\n".join(blocks)


def _piece_ids(tokenizer, text: str) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"tokenizer maps {text!r} to no tokens")
    return list(ids)


def rounding_noise_floor(error_a: torch.Tensor, error_b: torch.Tensor) -> torch.Tensor:
    """Noise floor of a measured Δ = ‖h_p(a) − h_p(b)‖_∞ in precision p: ε_a + ε_b, where ε_s = ‖h_p(s) − h_64(s)‖_∞
    is p's rounding error on sequence s itself (h_64: a float64 copy of the model, the exact reference).

    By the triangle inequality |Δ_p − Δ_64| ≤ ε_a + ε_b, so a Δ_p above the floor is a real difference, while one
    at or below it could be produced by rounding alone: the precision no longer certifiably tells the pair apart
    (collapse in the sense of Barbero et al. §4: equal up to machine precision). The floor is conservative:
    rounding errors shared by the two sequences (same weights, same prefix) cancel in Δ_p.
    """
    return error_a + error_b


def family_sequence(family: str, n: int, rng: random.Random) -> str:
    """The n-digit prompt body of a collapse family: ``ones`` 11…1, ``digits`` random, ``ones_commas`` 111,111,…"""
    if family == "ones":
        return "1" * n
    if family == "digits":
        return "".join(rng.choice("0123456789") for _ in range(n))
    if family == "ones_commas":
        return format_digits("1" * n, ",", 3)
    raise ValueError(f"unknown family {family!r}; choose from {list(FAMILIES)}")


def collapse_pair(family: str, n: int, rng: random.Random) -> tuple[str, str]:
    """The pair (v, v*) of Barbero et al. Thm 4.2 for an n-digit body: v* is v with one more copy of its last digit.

    For ``ones`` and ``ones_commas`` v* is the well-formed (n + 1)-digit member of the family, so with commas
    every third digit the pair is ``"111,11"``/``"111,111"`` and, when n ≡ 0 (mod 3), ``"111"``/``"111,1"`` (the
    extra digit opens a new group; repeating the last token would give the malformed ``"1111"``). For ``digits``
    v* = v + its last digit.
    """
    body = family_sequence(family, n, rng)
    if family == "digits":
        return body, body + body[-1]
    return body, family_sequence(family, n + 1, rng)


class RepresentationalCollapseProbe(_Probe):
    """‖Δ‖_∞ (every layer) and next-token TV between ``prefix+body`` and the same with its last token repeated.

    Pairs come from :func:`collapse_pair` and are built token by token (each character tokenized alone), so
    they differ by one repeated digit (plus a comma where the extra digit opens a new group) whatever the
    tokenizer merges. With ``noise_baseline`` each precision's :func:`rounding_noise_floor` is measured on the
    same pairs against a float64 copy of the model; ``delta <= noise`` means the pair has collapsed in that
    precision. Logged: ``probes/collapse/<family>/<precision>/delta``, ``.../tv`` and ``.../noise`` at the longest
    length (final layer); the figure shows Δ (with the noise floors, thin lines) and TV vs length for every
    family and precision (zeros — indistinguishable — drawn as triangles on the bottom axis).

    Args:
        lengths: numbers of digits n.
        families: subset of ``ones``, ``digits`` (random, averaged over ``num_samples``), ``ones_commas``.
        precisions: subset of ``fp32``, ``bf16`` (autocast: matmuls in bf16, residual stream and norms stay
            fp32) and ``bf16_weights`` (a temporary bf16 copy of the model: every activation in bf16, as when a
            model is served in bf16 — the paper's setting; costs one model copy per round).
        prefix: text before the digits (e.g. a task tag ``"count:"``); the tokenizer's BOS goes first if any.
            Without a prefix and without BOS, ``ones`` is one token repeated: every position then holds the same
            value vector, attention averages identical vectors and Δ is 0 up to rounding at every length.
        layer: hidden-state index for the scalars (the figure uses it too).
        noise_baseline: measure the noise floors (costs a float64 copy of the model per round).
    """

    name = "collapse"

    def __init__(self, lengths: list[int] = (8, 16, 32, 64, 128, 256), families: list[str] = FAMILIES,
                 precisions: list[str] = ("fp32", "bf16"), prefix: str = "", num_samples: int = 1, layer: int = -1,
                 seed: int = 0, noise_baseline: bool = True, every_n_steps: int = 0, on_validation: bool = True,
                 figure_dir: str | None = LOG_DIR_FIGURES, tokenizer: str | None = None, progress: bool = True):
        super().__init__(every_n_steps, on_validation, figure_dir, tokenizer, progress)
        for fam in families:
            family_sequence(fam, 1, random.Random(0))
        bad = [p for p in precisions if p not in _PRECISIONS]
        if bad:
            raise ValueError(f"precisions {bad} not in {list(_PRECISIONS)}")
        self.lengths, self.families, self.precisions = sorted(lengths), list(families), list(precisions)
        self.prefix, self.num_samples, self.layer, self.seed = prefix, num_samples, layer, seed
        self.noise_baseline = noise_baseline

    def pairs(self, tokenizer) -> dict[tuple[str, int], list[tuple[list[int], list[int]]]]:
        rng = random.Random(self.seed)
        head = encode_prompt(tokenizer, self.prefix)
        out = {}
        for fam in self.families:
            for n in self.lengths:
                samples = self.num_samples if fam == "digits" else 1
                out[fam, n] = []
                for _ in range(samples):
                    a, b = collapse_pair(fam, n, rng)
                    out[fam, n].append(tuple(head + [i for ch in text for i in _piece_ids(tokenizer, ch)]
                                             for text in (a, b)))
        return out

    def measure(self, model: nn.Module, tokenizer) -> dict:
        pairs = self.pairs(tokenizer)
        flat = [seq for group in pairs.values() for pair in group for seq in pair]
        exact = None
        if self.noise_baseline:
            self.say(f"float64 noise baseline, {len(flat)} sequences")
            exact, _ = last_token_states(copy.deepcopy(model).to(torch.float64), flat, dtype=torch.float64)
        results = {}
        for precision in self.precisions:
            autocast_dtype, weights_dtype = _PRECISIONS[precision]
            self.say(f"{precision}, {len(flat)} sequences")
            run_model = copy.deepcopy(model).to(weights_dtype) if weights_dtype is not None else model
            hidden, logits = last_token_states(run_model, flat, autocast_dtype)
            delta = (hidden[0::2] - hidden[1::2]).abs().amax(-1)  # (pairs, layers)
            tv = total_variation(logits[0::2], logits[1::2])
            if exact is not None:
                error = (hidden.double() - exact).abs().amax(-1)  # (sequences, layers)
                noise = rounding_noise_floor(error[0::2], error[1::2])
            i = 0
            for (fam, n), group in pairs.items():
                k = len(group)
                results[fam, precision, n] = {"delta": delta[i:i + k].mean(0).tolist(), "tv": tv[i:i + k].mean().item()}
                if exact is not None:
                    results[fam, precision, n]["noise"] = noise[i:i + k].mean(0).tolist()
                i += k
        return results

    def scalars(self, results: dict) -> dict[str, float]:
        n = self.lengths[-1]
        out = {}
        for fam in self.families:
            for p in self.precisions:
                r = results[fam, p, n]
                out[f"probes/collapse/{fam}/{p}/delta"] = r["delta"][self.layer]
                out[f"probes/collapse/{fam}/{p}/tv"] = r["tv"]
                if "noise" in r:
                    out[f"probes/collapse/{fam}/{p}/noise"] = r["noise"][self.layer]
        return out

    def summary(self, results: dict) -> tuple[str, list[tuple[str, list[float]]]]:
        rows = [(f"{fam} {p}", [results[fam, p, n]["delta"][self.layer] for n in self.lengths])
                for fam in self.families for p in self.precisions]
        return f"‖Δ‖∞ of the last token's hidden state (layer {self.layer}), [x, a] vs [x, a, a]", rows

    def figure(self, results: dict) -> Figure:
        rows = len(self.precisions) * (2 if self.noise_baseline else 1)  # legend entries per family
        fig = Figure(figsize=(11, 3.4 + 0.2 * rows), dpi=72)
        # the legend goes under both panels, one column per family, so it never covers a curve
        fig.subplots_adjust(left=0.06, right=0.98, bottom=0.14 + 0.055 * rows, top=0.88, wspace=0.22)
        axes = fig.subplots(1, 2)
        panels = ((axes[0], "delta", "‖Δ‖∞ of last hidden state"), (axes[1], "tv", "TV of next-token dist."))
        for ax, key, title in panels:
            values = [r[key][self.layer] if key == "delta" else r[key] for r in results.values()]
            if key == "delta" and self.noise_baseline:
                values += [r["noise"][self.layer] for r in results.values()]
            floor = min([v for v in values if v > 0], default=1.0) / 3
            for ci, fam in enumerate(self.families):
                for p in self.precisions:
                    ys = [results[fam, p, n][key] for n in self.lengths]
                    ys = [y[self.layer] if key == "delta" else y for y in ys]
                    style = dict(color=f"C{ci}", linestyle=_LINESTYLES[p])
                    ax.plot(self.lengths, [max(y, floor) for y in ys], marker="o", label=f"{fam} {p}", **style)
                    zeros = [n for n, y in zip(self.lengths, ys) if y == 0]
                    ax.plot(zeros, [floor] * len(zeros), marker="v", markersize=9, linestyle="none", color=f"C{ci}")
                    if key == "delta" and self.noise_baseline:
                        noise = [max(results[fam, p, n]["noise"][self.layer], floor) for n in self.lengths]
                        ax.plot(self.lengths, noise, linewidth=0.8, alpha=0.5, label=f"{fam} {p} noise", **style)
            ax.set(xscale="log", yscale="log", xlabel="sequence length n (digits)", title=title)
        fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=len(self.families), fontsize=7,
                   frameon=False)
        fig.suptitle("Representational collapse: [x, a] vs [x, a, a]  (▼ = exactly 0; thin: rounding noise floor)",
                     fontsize=9)
        return fig


class OverSquashingProbe(_Probe):
    """Sensitivity of the last hidden state to each input position (:func:`token_sensitivity`), averaged
    over prompts and binned by relative position i/(n−1); each profile is normalised to mean 1 first.

    Logged: ``probes/sensitivity/start_over_middle`` (positions ≤ 0.1 vs 0.4–0.6), ``end_over_middle``
    (≥ 0.9, last token excluded) and ``last_over_middle`` (the last token itself, whose embedding also
    reaches its own state through the residual stream).

    Args:
        lengths, num_samples: prompts of random digits (or ``family``) of these lengths, this many each.
        num_projections: ``None`` = exact Jacobian norms (hidden-size backward rows), else a Gaussian estimate.
        num_bins: relative-position bins of the figure's mean curve.
    """

    name = "sensitivity"

    def __init__(self, lengths: list[int] = (16, 32, 64), family: str = "digits", num_samples: int = 1,
                 prefix: str = "", layer: int = -1, num_projections: int | None = None, num_bins: int = 10,
                 seed: int = 0, every_n_steps: int = 0, on_validation: bool = True,
                 figure_dir: str | None = LOG_DIR_FIGURES, tokenizer: str | None = None, progress: bool = True):
        super().__init__(every_n_steps, on_validation, figure_dir, tokenizer, progress)
        family_sequence(family, 1, random.Random(0))
        self.lengths, self.family, self.num_samples, self.prefix = sorted(lengths), family, num_samples, prefix
        self.layer, self.num_projections, self.num_bins, self.seed = layer, num_projections, num_bins, seed

    def measure(self, model: nn.Module, tokenizer) -> dict:
        rng = random.Random(self.seed)
        head = encode_prompt(tokenizer, self.prefix)
        profiles = {}
        for n in self.lengths:
            self.say(f"length {n}, {self.num_samples} prompt(s)")
            rows = []
            for _ in range(self.num_samples):
                body = [i for ch in family_sequence(self.family, n, rng) for i in _piece_ids(tokenizer, ch)]
                s = token_sensitivity(model, head + body, self.layer, self.num_projections, self.seed)[len(head):]
                rows.append(s / s.mean())
            profiles[n] = torch.stack(rows).mean(0)
        return {"profiles": profiles}

    @staticmethod
    def region_ratios(profiles: list[torch.Tensor]) -> dict[str, float]:
        """Mean sensitivity at the start (relative positions ≤ 0.1), the end (≥ 0.9, last token excluded) and the
        last token, each over the middle (0.4–0.6), pooled over ``profiles``."""
        def region(lo: float, hi: float, include_last: bool = False) -> float:
            vals = []
            for p in profiles:
                x = torch.linspace(0, 1, len(p))
                keep = (x >= lo) & (x <= hi)
                keep[-1] = include_last and keep[-1]
                vals.append(p[keep])
            return torch.cat(vals).mean().item()

        middle = region(0.4, 0.6)
        return {"start_over_middle": region(0.0, 0.1) / middle, "end_over_middle": region(0.9, 1.0) / middle,
                "last_over_middle": region(1.0, 1.0, include_last=True) / middle}

    def scalars(self, results: dict) -> dict[str, float]:
        ratios = self.region_ratios(list(results["profiles"].values()))
        return {f"probes/sensitivity/{k}": v for k, v in ratios.items()}

    def summary(self, results: dict) -> tuple[str, list[tuple[str, list[float]]]]:
        per_length = [self.region_ratios([results["profiles"][n]]) for n in self.lengths]
        rows = [(key, [r[key] for r in per_length]) for key in per_length[0]]
        return f"‖∂h_last/∂e_i‖_F by relative position i/(n-1), region over middle (layer {self.layer})", rows

    def figure(self, results: dict) -> Figure:
        fig = Figure(figsize=(5, 3.6), dpi=72)
        fig.subplots_adjust(left=0.16, right=0.97, bottom=0.14, top=0.91)
        ax = fig.subplots()
        sums, counts = torch.zeros(self.num_bins), torch.zeros(self.num_bins)
        for n, p in results["profiles"].items():
            x = torch.linspace(0, 1, len(p))
            ax.plot(x.tolist(), p.tolist(), linewidth=0.8, alpha=0.6, label=f"n={n}")
            bins = (x * self.num_bins).long().clamp(max=self.num_bins - 1)
            sums.index_add_(0, bins, p.float())
            counts.index_add_(0, bins, torch.ones_like(p, dtype=torch.float))
        centers = (torch.arange(self.num_bins) + 0.5) / self.num_bins
        keep = counts > 0
        ax.plot(centers[keep].tolist(), (sums[keep] / counts[keep]).tolist(), color="black", marker="o",
                linewidth=2, label=f"mean in {self.num_bins} bins")
        ax.set(yscale="log", xlabel="relative position i/(n-1) of the input token",
               ylabel="‖∂h_last/∂e_i‖_F / mean", title="Sensitivity of the last token to each input")
        ax.legend(fontsize=7)
        return fig


_LEADING_INT = re.compile(r"^\s*(\d+)")


def greedy_continuations(model: nn.Module, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy decoding without a cache; prompts of equal length are batched together (no padding)."""
    device = _device(model)
    out: list[list[int] | None] = [None] * len(prompts)
    by_length: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_length.setdefault(len(p), []).append(i)
    with torch.no_grad():
        for idx in by_length.values():
            ids = torch.tensor([prompts[i] for i in idx], device=device)
            start = ids.shape[1]
            for _ in range(max_new_tokens):
                nxt = model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)
                ids = torch.cat([ids, nxt], dim=1)
            for row, i in enumerate(idx):
                out[i] = ids[row, start:].tolist()
    return out


class SequenceTaskProbe(_Probe):
    """Greedy accuracy on the tasks of ``datamodules.sequence_tasks`` for each length, and by relative position
    of the relevant token (``find_odd`` binned into ``num_bins``; ``copy_first``/``copy_last`` at 0 and 1).

    The prediction is the leading integer of the continuation up to the first EOS (so trailing text is ignored,
    a wrong or extra digit is an error). Logged: ``probes/tasks/<task>/acc`` (mean over lengths) and
    ``probes/tasks/acc``.
    Use the same ``separator`` as the training data.
    """

    name = "tasks"

    def __init__(self, tasks: list[str] = TASKS, lengths: list[int] = (4, 8, 16, 32, 64), num_samples: int = 16,
                 separator: str = "", separator_every: int = 3, num_bins: int = 5, seed: int = 1234,
                 every_n_steps: int = 0, on_validation: bool = True, figure_dir: str | None = LOG_DIR_FIGURES,
                 tokenizer: str | None = None, progress: bool = True):
        super().__init__(every_n_steps, on_validation, figure_dir, tokenizer, progress)
        unknown = [t for t in tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"tasks {unknown} not in {list(TASKS)}")
        if "find_odd" in tasks and min(lengths) < 3:
            raise ValueError(f"lengths {list(lengths)}: find_odd needs lengths >= 3")
        self.tasks, self.lengths, self.num_samples = list(tasks), sorted(lengths), num_samples
        self.separator, self.separator_every, self.num_bins, self.seed = separator, separator_every, num_bins, seed

    def measure(self, model: nn.Module, tokenizer) -> dict:
        rng = random.Random(self.seed)
        examples = [make_example(t, n, rng, self.separator, self.separator_every)
                    for t in self.tasks for n in self.lengths for _ in range(self.num_samples)]
        answers = [_piece_ids(tokenizer, ex["answer"]) for ex in examples]
        max_new_tokens = max(len(a) for a in answers) + 1
        generated: list[list[int] | None] = [None] * len(examples)
        for n in self.lengths:  # one length at a time, so a long round reports its progress
            idx = [i for i, ex in enumerate(examples) if ex["length"] == n]
            self.say(f"length {n}, {len(idx)} prompts")
            outs = greedy_continuations(model, [encode_prompt(tokenizer, examples[i]["prompt"]) for i in idx],
                                        max_new_tokens)
            for i, out in zip(idx, outs):
                generated[i] = out
        by_length: dict[tuple[str, int], list[float]] = {}
        by_position: dict[tuple[str, float], list[float]] = {}
        eos = tokenizer.eos_token_id
        for ex, gen in zip(examples, generated):
            gen = gen[:gen.index(eos)] if eos in gen else gen
            match = _LEADING_INT.match(tokenizer.decode(gen, skip_special_tokens=True))
            ok = float(match is not None and match.group(1) == ex["answer"])
            by_length.setdefault((ex["task"], ex["length"]), []).append(ok)
            if ex["position"] is not None:
                x = ex["position"]
                if ex["task"] == "find_odd":
                    x = (min(int(x * self.num_bins), self.num_bins - 1) + 0.5) / self.num_bins
                by_position.setdefault((ex["task"], x), []).append(ok)
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        return {"accuracy": {k: mean(v) for k, v in by_length.items()},
                "by_position": {k: mean(v) for k, v in sorted(by_position.items())}}

    def scalars(self, results: dict) -> dict[str, float]:
        acc = results["accuracy"]
        out = {f"probes/tasks/{t}/acc": sum(acc[t, n] for n in self.lengths) / len(self.lengths) for t in self.tasks}
        out["probes/tasks/acc"] = sum(acc.values()) / len(acc)
        return out

    def summary(self, results: dict) -> tuple[str, list[tuple[str, list[float]]]]:
        acc = results["accuracy"]
        rows = [(t, [acc[t, n] for n in self.lengths]) for t in self.tasks]
        return f"greedy accuracy ({self.num_samples} prompts per task and length)", rows

    def figure(self, results: dict) -> Figure:
        fig = Figure(figsize=(9, 3.6), dpi=72)
        fig.subplots_adjust(left=0.07, right=0.98, bottom=0.14, top=0.91, wspace=0.22)
        left, right = fig.subplots(1, 2)
        for t in self.tasks:
            left.plot(self.lengths, [results["accuracy"][t, n] for n in self.lengths], marker="o", label=t)
        left.set(xscale="log", xlabel="sequence length (digits)", ylabel="greedy accuracy", ylim=(-0.03, 1.03),
                 title="Task accuracy vs length")
        left.set_xticks(self.lengths, [str(n) for n in self.lengths])
        left.minorticks_off()
        left.legend(fontsize=7)
        for t in ("find_odd", "copy_first", "copy_last"):
            pos = {x: a for (task, x), a in results["by_position"].items() if task == t}
            if pos:
                right.plot(list(pos), list(pos.values()), marker="o" if t == "find_odd" else "s",
                           linestyle="-" if t == "find_odd" else "none", label=t)
        right.legend(fontsize=7)
        right.set(xlabel="relative position of the relevant token", ylabel="accuracy (all lengths)",
                  ylim=(-0.03, 1.03), title="Accuracy by position (copy/find-odd)")
        return fig
