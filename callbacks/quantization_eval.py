"""How far a quantized model's behaviour is from its full-precision self (QDPO's offline proxies, docs/papers.md §4).

On a held-out prompt set, against the full-precision model (FP):

- ``flip_rate``: teacher-forcing FP's own greedy answers, the fraction of answer positions where the
  quantized model's argmax differs from FP's ("token flipping");
- ``fp_margin_at_flips``: FP's top-1 − top-2 log-probability gap at the flipped positions (flips happen where
  it is small), and ``fp_margin``: the same gap averaged over all answer positions;
- ``quant_margin``: the quantized model's log p(FP's top-1) − max over other tokens of log p, averaged over
  answer positions (> 0 where no flip; QDPO should widen it);
- ``fp_loglik``: FP's log-likelihood per token of the quantized model's own greedy answers (EOS included);
- ``rouge_l``: Rouge-L F1 (``torchmetrics``' ``ROUGEScore``, word tokens) of its answers against FP's;
- ``same_answer``: fraction of answers identical to FP's;
- ``check_score``: fraction of answers the built-in task's :func:`~datamodules.instruction_tasks.check_answer`
  accepts (only for built-in task prompts, which carry ``task``/``params``; ``None`` on free-form prompts, which
  have no checker: there flip rate, FP likelihood and Rouge-L / same answer vs FP are the measures);
- ``perplexity`` (when held-out ``texts`` are given, :func:`heldout_text`): the model's perplexity on that text,
  the usual measure of quantization damage, which the QDPO paper finds blind to the conversational damage the
  measures above see (§1, §4 of docs/papers.md).

:func:`evaluate_against_full_precision` is the pure evaluation (the benchmark calls it for RTN, QDPO and FP);
:class:`QuantizationEval` runs it on a :class:`lit_modules.QDPO`: at train start (= the RTN model), after
each validation (fake-quantized policy) and at train end on the converted real low-bit model, logging
``val/quant/<metric>`` (``val/quant_final/<metric>`` at the end, plus FP's ceiling as ``val/fp/<metric>``)
and writing every result to ``<log_dir>/quantization_eval.json``; with TensorBoard, a figure of flip rate and
Rouge-L over training (``val/quant_curves``).
"""

from __future__ import annotations

import json
import logging
import math
import random
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from matplotlib.figure import Figure
from torch import Tensor, nn
from torchmetrics.text.rouge import ROUGEScore

from datamodules.freeform_prompts import check_prompt_source, load_prompt_records
from datamodules.instruction_tasks import check_answer, format_prompt, generate_examples
from datamodules.qdpo_pairs import unique_prompt_records
from datamodules.text import builtin_documents, pack_blocks
from lm.sampling import generate_answers
from lm.tensors import pad_sequences
from lm.tokenizers import check_prompt_template, resolve_prompt_template

log = logging.getLogger(__name__)


def token_flip_stats(fp_logits: Tensor, q_logits: Tensor) -> dict[str, Tensor]:
    """Per-position flip statistics for (N, V) logits of the same N positions.

    With ℓ = log_softmax: a = argmax ℓ_fp, flipped = (argmax ℓ_q ≠ a),
    fp_margin = ℓ_fp[a] − max_{v≠a} ℓ_fp[v], quant_margin = ℓ_q[a] − max_{v≠a} ℓ_q[v]; each (N,).
    """
    fp_lp, q_lp = fp_logits.float().log_softmax(-1), q_logits.float().log_softmax(-1)
    top2 = fp_lp.topk(2, dim=-1)
    a = top2.indices[:, 0]
    q_top = q_lp.gather(-1, a[:, None]).squeeze(-1)
    q_other = q_lp.scatter(-1, a[:, None], float("-inf")).amax(-1)
    return {"flipped": q_lp.argmax(-1) != a, "fp_margin": top2.values[:, 0] - top2.values[:, 1],
            "quant_margin": q_top - q_other}


#: sources of :func:`heldout_text`
PERPLEXITY_TEXTS = ("tasks", "docs")


def heldout_text(source: str, template: str, seed: int = 54321, n: int = 1000) -> list[tuple[str, str]]:
    """Held-out text for :func:`perplexity` as (context, text) pairs, in a seeded order.

    ``"tasks"``: ``n`` built-in instruction-task examples (:func:`datamodules.instruction_tasks.generate_examples`
    with generator seed ``seed``: fresh draws of the distribution the built-in FP model was SFT'd on, so a prompt may
    coincide with one drawn elsewhere: the task space is finite): context = the prompt in ``template``, text = its
    reference answer (an SFT model is trained on answers given prompts, never on the prompts themselves).
    ``"docs"``: every topic of CPython's documentation (:func:`datamodules.text.builtin_documents`, English prose, the
    kind of text a pretrained model's perplexity is measured on), shuffled with ``seed``, no context; QDPO never
    trains, calibrates or prompts on it."""
    if source not in PERPLEXITY_TEXTS:
        raise ValueError(f"perplexity text must be one of {PERPLEXITY_TEXTS}, got {source!r}")
    if source == "tasks":
        return [(format_prompt(ex["instruction"], ex["context"], template), ex["response"])
                for ex in generate_examples(n, seed)]
    docs = [text for _, text in builtin_documents() if text.strip()]
    random.Random(seed).shuffle(docs)
    return [("", text) for text in docs]


@torch.no_grad()
def perplexity(model: nn.Module, tokenizer, texts: list[tuple[str, str]], block_size: int = 128,
               max_blocks: int = 32, batch_size: int = 8) -> float:
    """exp(−(1/T) Σ_t log p(x_t | x_<t)) of ``model`` over the T scored tokens of ``texts`` ((context, text) pairs,
    :func:`heldout_text`), in at most ``max_blocks`` rows of at most ``block_size`` tokens, each row scored on its own.

    Without context, the texts are tokenized in order, each followed by EOS, concatenated and cut into rows of
    ``block_size`` tokens (:func:`datamodules.text.pack_blocks`, as :class:`~datamodules.TextDataModule` trains on
    them); every token but a row's first is scored. With a context, a pair is one row, context + text + EOS (cut to
    ``block_size``), scoring the text and EOS only."""
    eos = tokenizer.eos_token_id
    encode = lambda t: tokenizer(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    rows, docs, doc_tokens = [], [], 0  # rows: (ids, scored 0/1 per position)
    for context, text in texts:
        ids = encode(text)
        if context:
            ctx = encode(context)
            rows.append(((ctx + ids + [eos])[:block_size], ([0] * len(ctx) + [1] * (len(ids) + 1))[:block_size]))
        else:
            docs.append(ids)
            doc_tokens += len(ids) + 1
        if len(rows) + doc_tokens // block_size >= max_blocks:
            break
    rows += [(block.tolist(), [1] * block_size) for block in pack_blocks(docs, block_size, eos)]
    rows = rows[:max_blocks]
    if not rows:
        raise ValueError(f"perplexity: the texts give no block of {block_size} tokens")
    device, mode = next(model.parameters()).device, model.training
    model.eval()
    nll, scored_tokens = 0.0, 0
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        ids = pad_sequences([r[0] for r in batch], tokenizer.pad_token_id).to(device)
        scored = pad_sequences([r[1] for r in batch], 0)[:, 1:].to(device)
        padded = len({len(r[0]) for r in batch}) > 1
        attn = pad_sequences([[1] * len(r[0]) for r in batch], 0).to(device) if padded else None
        logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits[:, :-1].float()
        # one (vocabulary,) row per position: the (B, V, T) layout is ~20x less exact on large logits (a test checks)
        token_nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
        nll += float((token_nll.view_as(scored) * scored).sum())
        scored_tokens += int(scored.sum())
    model.train(mode)
    return math.exp(nll / scored_tokens)


def _answer_batch(tokenizer, prompts: list[str], answers: list[str], max_prompt_length: int):
    """Right-padded prompt+answer+EOS ids, attention mask and a mask over the answer(+EOS) positions."""
    seqs, masks = [], []
    for prompt, answer in zip(prompts, answers):
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"][-max_prompt_length:]
        a = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        seqs.append(p + a)
        masks.append([0] * len(p) + [1] * len(a))
    return (pad_sequences(seqs, tokenizer.pad_token_id), pad_sequences([[1] * len(s) for s in seqs], 0),
            pad_sequences(masks, 0))


@torch.no_grad()
def _teacher_forced(models: list[nn.Module], tokenizer, prompts: list[str], answers: list[str],
                    batch_size: int, max_prompt_length: int):
    """Yield, per batch, each model's logits at the positions predicting answer tokens, and those tokens."""
    for start in range(0, len(prompts), batch_size):
        ids, attn, mask = _answer_batch(tokenizer, prompts[start:start + batch_size],
                                        answers[start:start + batch_size], max_prompt_length)
        keep = mask[:, 1:].bool()
        logits = []
        for m in models:
            device = next(m.parameters()).device
            out = m(input_ids=ids.to(device), attention_mask=attn.to(device), use_cache=False).logits
            logits.append(out[:, :-1][keep.to(device)].float().cpu())
        yield logits, ids[:, 1:][keep]


def evaluate_against_full_precision(full_precision: nn.Module, model: nn.Module, tokenizer, records: list[dict],
                                    fp_answers: list[str] | None = None, max_new_tokens: int = 32,
                                    batch_size: int = 64, max_prompt_length: int = 128,
                                    texts: list[tuple[str, str]] | None = None) -> dict[str, float | None]:
    """The metrics of the module docstring for ``model`` on ``records`` (rows with ``prompt``; built-in rows
    also ``task``/``params``). ``fp_answers``: FP's greedy answers, generated when not given. Answers are decoded
    greedily with the package's one sampler (:func:`lm.sampling.generate_answers`). ``texts``: held-out text for
    ``perplexity`` (:func:`perplexity`; ``None`` when not given)."""
    prompts = [r["prompt"] for r in records]
    gen = dict(max_new_tokens=max_new_tokens, batch_size=batch_size, max_prompt_length=max_prompt_length)
    modes = [full_precision.training, model.training]
    full_precision.eval(), model.eval()
    if fp_answers is None:
        fp_answers = generate_answers(full_precision, tokenizer, prompts, **gen)
    answers = fp_answers if model is full_precision else generate_answers(model, tokenizer, prompts, **gen)
    stats: dict[str, list[Tensor]] = {"flipped": [], "fp_margin": [], "quant_margin": []}
    for (fp_logits, q_logits), _ in _teacher_forced([full_precision, model], tokenizer, prompts, fp_answers,
                                                    batch_size, max_prompt_length):
        for k, v in token_flip_stats(fp_logits, q_logits).items():
            stats[k].append(v)
    flat = {k: torch.cat(v) for k, v in stats.items()}
    loglik, n_tokens = 0.0, 0
    for (fp_logits,), targets in _teacher_forced([full_precision], tokenizer, prompts, answers, batch_size,
                                                 max_prompt_length):
        loglik += float(fp_logits.log_softmax(-1).gather(-1, targets[:, None]).sum())
        n_tokens += len(targets)
    flipped = flat["flipped"]
    checkable = [(r, a) for r, a in zip(records, answers) if "task" in r and "params" in r]
    full_precision.train(modes[0]), model.train(modes[1])
    return {
        "flip_rate": float(flipped.float().mean()),
        "fp_margin_at_flips": float(flat["fp_margin"][flipped].mean()) if flipped.any() else None,
        "fp_margin": float(flat["fp_margin"].mean()),
        "quant_margin": float(flat["quant_margin"].mean()),
        "fp_loglik": loglik / max(n_tokens, 1),
        "rouge_l": float(ROUGEScore(rouge_keys="rougeL")(answers, fp_answers)["rougeL_fmeasure"]),
        "same_answer": sum(a == b for a, b in zip(answers, fp_answers)) / len(answers),
        "check_score": (sum(check_answer(r, a) for r, a in checkable) / len(checkable)) if checkable else None,
        "perplexity": perplexity(model, tokenizer, texts) if texts else None,
        "num_prompts": len(records),
    }


class QuantizationEval(L.Callback):
    """Evaluate a :class:`lit_modules.QDPO`'s quantized policy against its full-precision model.

    Args:
        path: prompt records (as :class:`datamodules.InstructionDataModule`); ``None`` = the built-in ``prompts``.
        prompts: built-in prompt source (``path=None``): ``"tasks"`` (the checkable instruction tasks) or
            ``"freeform"`` (the held-out split of :mod:`datamodules.freeform_prompts`, whose topics the pairs'
            training split never uses); ``None`` (default) = the datamodule's ``prompts`` (so
            ``--data.init_args.prompts freeform`` switches both), ``"tasks"`` without one.
        num_prompts: prompts drawn (built-in) before deduplication and removing training prompts.
        seed: seed of the built-in prompt generator (different from the pairs' ``prompt_seed``).
        max_new_tokens, batch_size, max_prompt_length: generation settings (greedy).
        exclude_training_prompts: drop prompts the datamodule trains on (its ``records()``' ``prompt``) and those the
            module's quantizer calibrates on (``calibration_prompts()``, GPTQ/AWQ).
        template: prompt template; ``None`` (default) = the full-precision model's own prompt format (its
            tokenizer's chat template, :func:`lm.tokenizers.resolve_prompt_template`).
        perplexity_text: also log ``perplexity`` on held-out text from this source of :func:`heldout_text`
            (``"tasks"``: built-in task examples; ``"docs"``: CPython's documentation, for a pretrained model);
            ``None`` (default): not measured.
    """

    def __init__(self, path: str | None = None, prompts: str | None = None, num_prompts: int = 256, seed: int = 12345,
                 max_new_tokens: int = 32, batch_size: int = 64, max_prompt_length: int = 128,
                 exclude_training_prompts: bool = True, template: str | None = None,
                 perplexity_text: str | None = None):
        super().__init__()
        if perplexity_text is not None and perplexity_text not in PERPLEXITY_TEXTS:
            raise ValueError(f"QuantizationEval.perplexity_text must be one of {PERPLEXITY_TEXTS} or None, "
                             f"got {perplexity_text!r}")
        self.perplexity_text = perplexity_text
        self.texts: list[tuple[str, str]] | None = None
        if template is not None:
            check_prompt_template(template, "QuantizationEval.template")
        if prompts is not None:
            check_prompt_source(prompts, path, None, "QuantizationEval.prompts")
        self.template = template
        self.path, self.prompts, self.num_prompts, self.seed = path, prompts, num_prompts, seed
        self.gen = dict(max_new_tokens=max_new_tokens, batch_size=batch_size, max_prompt_length=max_prompt_length)
        self.exclude_training_prompts = exclude_training_prompts
        self.records: list[dict] | None = None
        self.fp_answers: list[str] | None = None
        self.results: list[dict] = []
        self.folder: Path | None = None

    def setup(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        # on every rank: ``trainer.log_dir`` is a collective (a broadcast) under DDP, and the evaluation itself
        # runs on rank 0 only, where asking for it would wait forever for the other ranks
        self.folder = Path(trainer.log_dir or trainer.default_root_dir)

    def _prepare(self, trainer: L.Trainer, pl_module) -> None:
        if self.records is not None:
            return
        for attr in ("full_precision", "policy", "tokenizer"):
            if not hasattr(pl_module, attr):
                raise TypeError(f"QuantizationEval needs a module with .{attr} (lit_modules.QDPO), "
                                f"got {type(pl_module).__name__}")
        template = resolve_prompt_template(pl_module.tokenizer, self.template, "QuantizationEval.template")
        dm = trainer.datamodule
        prompts = self.prompts or (getattr(dm, "prompts", None) if self.path is None else None) or "tasks"
        records, _ = unique_prompt_records(load_prompt_records(prompts, self.path, self.num_prompts, self.seed,
                                                               template, split="heldout",
                                                               where="QuantizationEval.prompts"))
        if self.exclude_training_prompts:
            train_prompts = set(getattr(pl_module, "calibration_prompts", list)())  # the quantizer's (GPTQ/AWQ)
            if dm is not None and hasattr(dm, "records"):
                train_prompts |= {row["prompt"] for row in dm.records() if "prompt" in row}
            kept = [r for r in records if r["prompt"] not in train_prompts]
            log.info("QuantizationEval: %d of %d eval prompts also used for training or calibration were removed",
                     len(records) - len(kept), len(records))
            records = kept
        if not records:
            raise ValueError("QuantizationEval: no evaluation prompts left after removing training prompts")
        self.records = records
        if self.perplexity_text is not None:
            self.texts = heldout_text(self.perplexity_text, template)
        self.fp_answers = generate_answers(pl_module.full_precision, pl_module.tokenizer,
                                           [r["prompt"] for r in records], **self.gen)

    def _run(self, trainer: L.Trainer, pl_module, model: nn.Module, prefix: str) -> dict:
        self._prepare(trainer, pl_module)
        metrics = evaluate_against_full_precision(pl_module.full_precision, model, pl_module.tokenizer, self.records,
                                                  self.fp_answers, **self.gen, texts=self.texts)
        self.results.append({"stage": prefix, "step": trainer.global_step, **metrics})
        if trainer.logger is not None:
            trainer.logger.log_metrics({f"{prefix}/{k}": v for k, v in metrics.items()
                                        if v is not None and not math.isnan(v)}, step=trainer.global_step)
        self._write(trainer)
        return metrics

    def _write(self, trainer: L.Trainer) -> None:
        folder = self.folder or Path(trainer.default_root_dir)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "quantization_eval.json").write_text(json.dumps(self.results, indent=2))

    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        if trainer.is_global_zero:
            self._run(trainer, pl_module, pl_module.full_precision, "val/fp")
            self._run(trainer, pl_module, pl_module.policy, "val/quant")

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module) -> None:
        if trainer.is_global_zero and not trainer.sanity_checking and trainer.state.fn == "fit":
            self._run(trainer, pl_module, pl_module.policy, "val/quant")

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        if trainer.is_global_zero:
            converted = pl_module.quantized_model() if hasattr(pl_module, "quantized_model") else pl_module.policy
            self._run(trainer, pl_module, converted, "val/quant_final")
            if isinstance(trainer.logger, TensorBoardLogger):
                trainer.logger.experiment.add_figure("val/quant_curves", self.figure(), trainer.global_step)

    def figure(self) -> Figure:
        """Flip rate and Rouge-L of the quantized policy over training (step 0 = RTN), FP as the ceiling."""
        fig = Figure(figsize=(8, 3))
        curve = [r for r in self.results if r["stage"] == "val/quant"]
        ceiling = next(r for r in self.results if r["stage"] == "val/fp")
        for ax, key in zip(fig.subplots(1, 2), ("flip_rate", "rouge_l")):
            ax.plot([r["step"] for r in curve], [r[key] for r in curve], marker="o", label="quantized (step 0 = RTN)")
            ax.axhline(ceiling[key], color="k", linestyle="--", label="full precision")
            ax.set(xlabel="step", title=key)
        fig.axes[0].legend(fontsize=7)
        fig.tight_layout()
        return fig
