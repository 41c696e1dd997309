"""QDPO vs round-to-nearest PTQ vs the full-precision model: the offline proxies of docs/papers.md §4.

    python -m benchmarks.qdpo_table [--device cpu|cuda] [--quick] [--model DIR] [--quantizer rtn] [--bits 4]
                                    [--group-size 32]
                                    [--out docs/results/qdpo_table.json]

Setup (the built-in one): the full-precision model (FP) is ``--model`` (default ``checkpoints/minillm_teacher``,
the MiniLLM teacher: a tiny byte-level Llama SFT'd on the built-in instruction tasks; or a model alias such as
``smollm2-135m-instruct``); when that directory is missing it is trained first with ``configs/minillm/teacher_sft.yaml`` (``--sft-steps`` overrides its steps).
RTN = FP with every non-``lm_head`` linear weight quantized by the post-training quantizer ``--quantizer``
(default symmetric per-group round-to-nearest; ``hqq``, ``gptq``, ``awq``: :mod:`lm.quantization`, GPTQ/AWQ
calibrated on training-side prompts that the evaluation excludes) at ``--bits``/``--group-size``, no training;
the results key stays ``rtn`` for every quantizer. QDPO = the same quantizer (RTN's scales recomputed from the
latent weights; the other quantizers' PTQ grid kept fixed: lm/quantization.py), trained with sigmoid DPO (β = 0.1,
AdamW lr 2e-5 with cosine decay to 0.1×, batch 16 pairs, ``--epochs`` 1, only the quantized layers' latent weights)
through fake quantization on pairs (FP greedy answer ≻ RTN greedy answer, identical pairs dropped) for the
distinct prompts among ``--num-prompts`` built-in ones (``--prompts``: the checkable tasks, or the free-form
instructions of :mod:`datamodules.freeform_prompts`, scored without a checker), then converted to real low-bit weights. Every prompt is
in FP's own prompt format (the template its export carries, :mod:`lm.tokenizers`). All three are
evaluated by :func:`callbacks.quantization_eval.evaluate_against_full_precision` on the same held-out
prompts (none used for training), greedy decoding, fp32, and by their perplexity on held-out text
(``--perplexity-text``: built-in task examples, or CPython's documentation for a pretrained model:
:func:`callbacks.quantization_eval.heldout_text`). ``recovered`` = (QDPO − RTN) / (FP − RTN) per metric: 1 = back
to FP.
Timings are wall-clock seconds of each stage (one run per seed; medians over seeds); FP and RTN are evaluated
once per distinct held-out prompt set (a later seed with the same set reuses them: its ``eval_s`` is QDPO's alone).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

METRICS = ("flip_rate", "fp_margin_at_flips", "quant_margin", "fp_loglik", "rouge_l", "same_answer", "check_score",
           "perplexity")
ROOT = Path(__file__).resolve().parents[1]


def train_full_precision(path: Path, steps: int | None, accelerator: str) -> float:
    """SFT the FP model with the MiniLLM teacher config and export it to ``path``; returns seconds."""
    from training.cli import build_cli

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as logs:
        steps_args = ["--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(steps)] if steps else []
        build_cli(["fit", "--config", str(ROOT / "configs/minillm/teacher_sft.yaml"), *steps_args,
                   "--trainer.accelerator", accelerator, "--trainer.devices", "1",
                   "--trainer.enable_progress_bar", "false", "--trainer.callbacks", "[]",
                   "--trainer.logger.init_args.save_dir", logs, "--model.export_dir", str(path)])
    return time.perf_counter() - start


def eval_records(n: int, exclude: set[str], tokenizer, prompts: str = "tasks") -> list[dict]:
    """Held-out built-in prompts of source ``prompts`` (seed 12345; free-form: the held-out split) in the model's
    own prompt format, minus ``exclude``."""
    from datamodules.freeform_prompts import load_prompt_records
    from datamodules.qdpo_pairs import unique_prompt_records
    from lm.tokenizers import resolve_prompt_template

    records, _ = unique_prompt_records(load_prompt_records(prompts, None, n, 12345, resolve_prompt_template(tokenizer),
                                                           split="heldout", where="--prompts"))
    return [r for r in records if r["prompt"] not in exclude]


def run_seed(args, seed: int, device: torch.device, accelerator: str, references: dict,
             texts: list[tuple[str, str]]) -> dict:
    """One QDPO model trained and evaluated with FP and RTN (perplexity on ``texts``); ``references`` memoizes FP's
    answers and the FP/RTN results per held-out prompt set (the same for every seed when no training prompt had to be
    removed)."""
    import lightning as L

    from callbacks.quantization_eval import evaluate_against_full_precision
    from datamodules.qdpo_pairs import QDPOPairsDataModule
    from lit_modules import QDPO
    from lm.quantization import quantize
    from lm.sampling import generate_answers

    L.seed_everything(seed, verbose=False)
    module = QDPO(model=str(args.model), quantizer=args.quantizer, bits=args.bits, group_size=args.group_size,
                  train_scales=args.train_scales, beta=args.beta, lr=args.lr,
                  warmup_steps=args.warmup_steps, ref_cache_dir=args.cache, train_quantized_only=not args.train_all)
    dm = QDPOPairsDataModule(prompts=args.prompts, num_prompts=args.num_prompts, prompt_seed=1 + seed, max_new_tokens=args.max_new_tokens,
                             generation_batch_size=args.generation_batch_size, batch_size=args.batch_size,
                             val_fraction=0.0, seed=seed, pairs_cache_dir=args.cache)
    timings = {}
    start = time.perf_counter()
    dm.trainer = SimpleNamespace(lightning_module=module, strategy=SimpleNamespace(root_device=device))
    rows = dm.records()  # generation (or the disk cache), timed apart from training
    timings["pairs_s"] = time.perf_counter() - start
    dm.trainer = None
    trainer = L.Trainer(max_epochs=args.epochs, max_steps=args.steps or -1, accelerator=accelerator, devices=1,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        gradient_clip_val=1.0, limit_val_batches=0, num_sanity_val_steps=0)
    start = time.perf_counter()
    trainer.fit(module, dm)
    timings["train_s"] = time.perf_counter() - start

    tok = module.tokenizer
    records = eval_records(args.eval_prompts, {r["prompt"] for r in rows} | set(module.calibration_prompts()), tok,
                           args.prompts)
    fp = module.full_precision.to(device)
    gen = dict(max_new_tokens=args.max_new_tokens, batch_size=args.generation_batch_size, texts=texts)
    start = time.perf_counter()
    key = tuple(r["prompt"] for r in records)
    if key not in references:  # FP and RTN do not depend on the seed: once per held-out prompt set
        fp_answers = generate_answers(fp, tok, list(key), max_new_tokens=args.max_new_tokens,
                                      batch_size=args.generation_batch_size)
        rtn = quantize(fp, module.quantizer, module.calibration_ids(fp)).to(device)
        references[key] = fp_answers, {name: evaluate_against_full_precision(fp, m, tok, records, fp_answers, **gen)
                                       for name, m in (("fp", fp), ("rtn", rtn))}
    fp_answers, reference = references[key]
    results = reference | {"qdpo": evaluate_against_full_precision(fp, module.quantized_model().to(device), tok,
                                                                   records, fp_answers, **gen)}
    timings["eval_s"] = time.perf_counter() - start
    return {"seed": seed, "pairs_generated": len(rows), "pairs_kept": len(dm.pairs),
            "pairs_identical_dropped": dm.num_dropped_identical, "eval_prompts": len(records),
            "final_train_loss": float(trainer.callback_metrics.get("train/loss", float("nan"))),
            "timings_s": timings, "results": results}


def median_table(runs: list[dict]) -> dict[str, dict[str, float | None]]:
    table = {}
    for name in ("fp", "rtn", "qdpo"):
        table[name] = {}
        for k in METRICS:
            values = [r["results"][name][k] for r in runs if r["results"][name][k] is not None]
            table[name][k] = statistics.median(values) if values else None
    return table


def recovered(table: dict) -> dict[str, float | None]:
    """(QDPO − RTN) / (FP − RTN) per metric (None when FP and RTN tie or a value is missing)."""
    out = {}
    for k in METRICS:
        fp, rtn, q = table["fp"][k], table["rtn"][k], table["qdpo"][k]
        out[k] = None if None in (fp, rtn, q) or abs(fp - rtn) < 1e-12 else (q - rtn) / (fp - rtn)
    return out


def markdown(table: dict, rec: dict, quantizer: str = "rtn") -> str:
    fmt = lambda v: "–" if v is None else f"{v:.3f}"  # noqa: E731
    lines = ["| model | " + " | ".join(METRICS) + " |", "|---" * (len(METRICS) + 1) + "|"]
    for name, label in (("fp", "full precision (ceiling)"), ("rtn", f"{quantizer} (PTQ baseline)"), ("qdpo", "QDPO")):
        lines.append(f"| {label} | " + " | ".join(fmt(table[name][k]) for k in METRICS) + " |")
    lines.append("| recovered (QDPO−PTQ)/(FP−PTQ) | " + " | ".join(fmt(rec[k]) for k in METRICS) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="fewer eval prompts, one seed")
    parser.add_argument("--model", type=Path, default=Path("checkpoints/minillm_teacher"))
    parser.add_argument("--sft-steps", type=int, default=None,
                        help="FP training steps when --model is missing (default: the config's)")
    parser.add_argument("--quantizer", default="rtn", choices=["rtn", "hqq", "gptq", "awq"],
                        help="post-training quantizer of the baseline and of QDPO's grid (lm/quantization.py)")
    parser.add_argument("--train-scales", action="store_true",
                        help="QDPO also trains the PTQ grid's scales (LSQ gradient; hqq/gptq only); "
                             "default: fixed grid")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=1, help="QDPO epochs over the pairs")
    parser.add_argument("--steps", type=int, default=None, help="QDPO steps (overrides --epochs)")
    parser.add_argument("--train-all", action="store_true", help="also train embeddings/norms/lm_head")
    parser.add_argument("--prompts", default="tasks", choices=["tasks", "freeform"],
                        help="built-in prompts: the checkable tasks, or free-form instructions (no checker: "
                             "check_score is null; datamodules/freeform_prompts.py, pairs from its train split, "
                             "evaluation on its held-out split)")
    parser.add_argument("--perplexity-text", default="tasks", choices=["tasks", "docs"],
                        help="held-out text of the perplexity column: built-in task examples (the built-in FP "
                             "model's domain) or CPython's documentation (English prose, for a pretrained model)")
    parser.add_argument("--num-prompts", type=int, default=1500, help="pair prompts drawn (before dedup)")
    parser.add_argument("--eval-prompts", type=int, default=None, help="eval prompts drawn (default 1000, quick 400)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2 (quick: 0)")
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--warmup-steps", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--generation-batch-size", type=int, default=128)
    parser.add_argument("--cache", default=None, help="pairs/reference cache dir (default $LITPAPERS_CACHE)")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON result to this file")
    parser.add_argument("--machine", default=None, help="machine description recorded in the result")
    args = parser.parse_args(argv)
    if importlib.util.find_spec("torchao") is None:
        out = {"benchmark": "qdpo_table", "skipped": "torchao is not installed (pip install torchao)"}
        print(json.dumps(out))
        return out
    args.eval_prompts = args.eval_prompts or (400 if args.quick else 1000)
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    accelerator = "gpu" if args.device == "cuda" else "cpu"
    device = torch.device(args.device)

    from callbacks.quantization_eval import heldout_text
    from lm.model_aliases import ALIASES
    from lm.tokenizers import load_tokenizer, resolve_prompt_template

    sft_s = None
    if str(args.model) not in ALIASES and not (args.model / "config.json").exists():
        sft_s = train_full_precision(args.model, args.sft_steps, accelerator)
    references: dict = {}
    template = resolve_prompt_template(load_tokenizer(None, str(args.model)))
    texts = heldout_text(args.perplexity_text, template)
    runs = [run_seed(args, seed, device, accelerator, references, texts) for seed in seeds]
    table = median_table(runs)
    rec = recovered(table)
    print(f"pairs kept per seed: {[r['pairs_kept'] for r in runs]}, eval prompts: {[r['eval_prompts'] for r in runs]}")
    print(markdown(table, rec, args.quantizer))
    out = {
        "benchmark": "qdpo_table",
        "command": "python -m benchmarks.qdpo_table " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": (args.machine + "; " if args.machine else "")
                   + f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
                   + (f", {torch.cuda.get_device_name()}" if args.device == "cuda" else ""),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()} | {"seeds": seeds},
        "prompt_template": template,
        "fp_sft_s": sft_s,
        "median": table,
        "recovered": rec,
        "median_timings_s": {k: statistics.median(r["timings_s"][k] for r in runs) for k in runs[0]["timings_s"]},
        "runs": runs,
    }
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
