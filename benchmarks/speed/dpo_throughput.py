"""DPO training throughput: ``lit_modules.DPO`` (Lightning Trainer) vs TRL's ``DPOTrainer``, same model and data.

    python -m benchmarks.speed.dpo_throughput [--device cpu|cuda] [--quick] [--precision 32-true|bf16-mixed] [--out FILE]

Both sides train the same tiny Llama (identical initial weights, byte-level tokenizer) with the sigmoid (DPO)
loss, β = 0.1, on the same built-in preference pairs (prompts padded to a fixed length with a constant prefix,
so every batch has about the same sequence length), batch size, fp32 weights and (by default) fp32 compute, AdamW
(torch, non-fused; lr 1e-5 constant, β (0.9, 0.999), no weight decay), gradient clipping at 1.0, no gradient
checkpointing, one process, no dataloader workers. TRL: ``DPOConfig(bf16=False, fp16=False,
gradient_checkpointing=False, optim="adamw_torch", lr_scheduler_type="constant", max_grad_norm=1.0,
report_to="none", padding_free=True)`` (its log-probs come from its fused, chunked LM head; ``padding_free`` is asked
for and the value TRL actually ran with is reported, ``trl_padding_free_effective``: TRL 1.16 switches it off;
``use_liger_kernel`` is on where it can run: on CUDA with ``liger-kernel`` installed, its kernels being Triton; the
JSON says which); ours: ``Trainer(precision="32-true", gradient_clip_val=1.0, logger=False)``.

Our sides: ``ours`` = ``DPO(packed=True)`` (the default: each pair's chosen and rejected responses in one row behind
one copy of the prompt, log-probs from the response positions' logits only; :mod:`lm.packing`), ``ours_eager`` =
``DPO(packed=False)`` (the padded 2B-row forward); each also with ``_precompute``.

Timing: each side runs in its own subprocess (clean peak-memory numbers); after ``warmup`` steps, the wall time
to the end of the last of ``steps`` more steps is measured (forward + backward + optimizer step + each
library's own per-step batch collation and metric bookkeeping; tokenization and reference precompute are
excluded and the precompute time is reported separately). Sides alternate for ``repeats`` rounds (the order
rotating each round); medians are reported, with ratios against TRL measured in the same run (the ratio of the
medians, and the median of the per-round ratios). With ``precompute_ref_logps`` (both sides' option) the
reference forward is done once up front. Peak memory: the process's peak RSS (CPU) or
``torch.cuda.max_memory_allocated`` during training (CUDA). Without ``trl`` installed the TRL sides are skipped.

``--precision bf16-mixed`` trains both sides under bf16 autocast (fp32 weights; TRL ``bf16=True``, ours
``Trainer(precision="bf16-mixed")``). Throughput is also given as tokens/s (pairs/s × the records' mean tokens per
pair: prompt + chosen + EOS and prompt + rejected + EOS) and, on a GPU in :data:`PEAK_BF16_TFLOPS`, as model FLOPs
utilisation MFU = 6·N·tokens/s / peak dense bf16 FLOP/s (N = policy parameters; the reference forward, 2·N per
token when not precomputed, is not counted: ``mfu_incl_reference_forward`` counts it).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

SIDES = ("ours", "ours_precompute", "ours_eager", "ours_eager_precompute", "trl", "trl_precompute")
# dense (no sparsity) bf16 tensor-core peak, TFLOP/s, by a substring of torch.cuda.get_device_name (first match);
# NVIDIA datasheets: H100 SXM / H200 989.4, H100 PCIe 756, A100 312, L40S 362
PEAK_BF16_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0), ("L40S", 362.0))


def peak_bf16_flops(device_name: str) -> float | None:
    """Peak dense bf16 FLOP/s of the card named ``device_name`` (``None`` when it is not in the table)."""
    return next((tf * 1e12 for key, tf in PEAK_BF16_TFLOPS if key in device_name), None)


def mfu(n_params: int, tokens_per_s: float, peak_flops: float, flops_per_param_token: int = 6) -> float:
    """Model FLOPs utilisation = flops_per_param_token · N · tokens/s / peak (6 = forward 2 + backward 4 per
    parameter and token; Kaplan et al. 2020 §2.1, PaLM App. B)."""
    return flops_per_param_token * n_params * tokens_per_s / peak_flops


def tokens_per_pair(records: list[dict]) -> float:
    """Mean tokens a pair puts through the policy: prompt + chosen + EOS and prompt + rejected + EOS (byte
    tokenizer: one token per byte)."""
    from lm.tokenizers import byte_tokenizer

    tok = byte_tokenizer()
    n = lambda text: len(tok(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    return statistics.mean(2 * n(r["prompt"]) + n(r["chosen"]) + n(r["rejected"]) + 2 for r in records)
PREFIX = "You are a careful assistant. Answer with the answer only, nothing else, please.\n"


def settings(args: argparse.Namespace) -> dict:
    return {"hidden_size": args.hidden, "intermediate_size": 4 * args.hidden, "num_hidden_layers": args.layers,
            "num_attention_heads": max(1, args.hidden // 64), "num_key_value_heads": max(1, args.hidden // 64)}


def make_records(n: int, prompt_bytes: int) -> list[dict]:
    """Built-in pairs with each prompt left-filled from ``PREFIX`` (repeated) to exactly ``prompt_bytes`` bytes."""
    from datamodules.preference import builtin_preference_records

    rows = []
    for r in builtin_preference_records(n, seed=0):
        fill = prompt_bytes - len(r["prompt"])
        prefix = (PREFIX * (1 + max(fill, 0) // len(PREFIX)))[:max(fill, 0)]
        rows.append({"prompt": prefix + r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]})
    return rows


def liger_usable(device: str) -> bool:
    """TRL's ``use_liger_kernel`` can run: a CUDA device and ``liger-kernel`` installed (its kernels are Triton)."""
    return device == "cuda" and importlib.util.find_spec("liger_kernel") is not None


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def _peak(device: str) -> dict:
    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device == "cuda":
        import torch

        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def _result(times: list[float], args: argparse.Namespace, precompute_s: float | None, model) -> dict:
    elapsed = times[-1] - times[args.warmup - 1]
    import torch

    return {"pairs_per_s": args.steps * args.batch / elapsed, "seconds": elapsed, "precompute_s": precompute_s,
            "threads_during_training": torch.get_num_threads(),
            "policy_params": sum(p.numel() for p in model.parameters()), **_peak(args.device)}


def run_ours(args: argparse.Namespace, precompute: bool, packed: bool = True) -> dict:
    import lightning as L
    import torch

    from datamodules import PreferenceDataModule
    from lit_modules import DPO

    class StepTimer(L.Callback):
        def __init__(self):
            self.times: list[float] = []
            self.start = None

        def on_train_start(self, trainer, pl_module):
            self.start = time.perf_counter()
            if args.device == "cuda":
                torch.cuda.reset_peak_memory_stats()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            _sync(args.device)
            self.times.append(time.perf_counter())

    n_steps = args.warmup + args.steps
    dm = PreferenceDataModule.from_records(make_records(n_steps * args.batch, args.prompt_bytes),
                                           batch_size=args.batch, val_fraction=0.0, max_prompt_length=1024,
                                           max_length=2048)
    module = DPO(model=settings(args), loss="sigmoid", beta=0.1, lr=1e-5, lr_decay="constant", packed=packed,
                 precompute_ref_logps=precompute, ref_cache_dir=tempfile.mkdtemp())
    timer = StepTimer()
    trainer = L.Trainer(max_steps=n_steps, accelerator=args.device, devices=1, precision=args.precision, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        gradient_clip_val=1.0, limit_val_batches=0, num_sanity_val_steps=0, callbacks=[timer])
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    return _result(timer.times, args, timer.start - t0 if precompute else None, module.policy)


def run_trl(args: argparse.Namespace, precompute: bool) -> dict:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from lm.hf import load_causal_lm
    from lm.tokenizers import byte_tokenizer

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []

        def on_train_begin(self, *a, **k):
            if args.device == "cuda":
                torch.cuda.reset_peak_memory_stats()

        def on_step_end(self, *a, **k):
            _sync(args.device)
            self.times.append(time.perf_counter())

    n_steps = args.warmup + args.steps
    tokenizer = byte_tokenizer()
    model = load_causal_lm(settings(args), vocab_size=len(tokenizer), seed=0)
    config = DPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.batch, max_steps=n_steps,
                       learning_rate=1e-5, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0,
                       optim="adamw_torch", beta=0.1, loss_type=["sigmoid"], fp16=False,
                       bf16=args.precision == "bf16-mixed",
                       gradient_checkpointing=False, precompute_ref_log_probs=precompute, max_length=None,
                       padding_free=True, use_liger_kernel=liger_usable(args.device),
                       report_to="none", logging_steps=10**6, save_strategy="no", disable_tqdm=True,
                       dataloader_num_workers=0, use_cpu=args.device == "cpu", seed=0)
    timer = StepTimer()
    t0 = time.perf_counter()
    ref_model = None if precompute else copy.deepcopy(model)  # TRL would reload it from a hub name otherwise
    trainer = DPOTrainer(model=model, ref_model=ref_model, args=config, processing_class=tokenizer, callbacks=[timer],
                         train_dataset=Dataset.from_list(make_records(n_steps * args.batch, args.prompt_bytes)))
    precompute_s = time.perf_counter() - t0 if precompute else None  # includes TRL's tokenization map
    trainer.train()
    return _result(timer.times, args, precompute_s, model) | {"trl_padding_free_effective": trainer.padding_free}


def worker(args: argparse.Namespace) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    side = args.worker
    precompute = side.endswith("precompute")
    result = run_trl(args, precompute) if side.startswith("trl") else run_ours(args, precompute, "eager" not in side)
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--quick", action="store_true", help="smaller model, fewer steps and repeats")
    p.add_argument("--hidden", type=int, default=None)
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--batch", type=int, default=8, help="pairs per step")
    p.add_argument("--prompt-bytes", type=int, default=120, help="prompt length in bytes (= tokens)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per worker (default 1 on CPU: on a shared machine more threads oversubscribe "
                        "the cores and swamp the timings; 0 = torch default)")
    p.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    p.add_argument("--out", default=None, help="also write the JSON here")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="peak dense bf16 TFLOP/s for the MFU (default: looked up from the GPU's name)")
    p.add_argument("--sides", default=",".join(SIDES), help=f"which of {','.join(SIDES)} to run (comma-separated)")
    p.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    args = p.parse_args()
    size = (128, 2, 10, 2) if args.quick else ((256, 4, 20, 4) if args.device == "cpu" else (512, 6, 50, 4))
    args.hidden = args.hidden or size[0]
    args.layers = args.layers or size[1]
    args.steps = args.steps or size[2]
    args.repeats = args.repeats or size[3]
    if args.threads is None:
        args.threads = 1 if args.device == "cpu" else 0
    if args.worker:
        return worker(args)

    sides = tuple(args.sides.split(","))
    if unknown := set(sides) - set(SIDES):
        p.error(f"--sides: unknown {sorted(unknown)}; choose from {', '.join(SIDES)}")
    try:
        import trl  # noqa: F401
    except ImportError:
        sides = tuple(s for s in sides if not s.startswith("trl"))
    forwarded = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                 if k in ("device", "hidden", "layers", "batch", "prompt_bytes", "steps", "warmup", "threads",
                          "precision")]
    runs: dict[str, list[dict]] = {s: [] for s in sides}
    trl_status = "run" if "trl" in sides else "skipped: trl is not importable"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    for r in range(args.repeats):
        for side in sides[r % len(sides):] + sides[:r % len(sides)]:  # rotate the order: no side always first
            if side not in sides:  # a TRL side failed in an earlier round
                continue
            out = subprocess.run([sys.executable, "-m", "benchmarks.speed.dpo_throughput", f"--worker={side}", *forwarded],
                                 capture_output=True, text=True, env=env)
            line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
            if (out.returncode or not line) and side.startswith("trl"):
                # the anchor failing (e.g. a TRL/transformers version mismatch) must not lose our own numbers
                trl_status = f"failed: {side}: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else '?'}"
                print(trl_status, file=sys.stderr, flush=True)
                sides = tuple(s for s in sides if not s.startswith("trl"))
                runs = {s: runs[s] for s in sides}
                continue
            if out.returncode or not line:
                raise RuntimeError(f"{side} failed:\n{out.stderr[-3000:]}")
            runs[side].append(json.loads(line[-1][7:]))
            print(f"round {r + 1}/{args.repeats} {side}: {runs[side][-1]['pairs_per_s']:.2f} pairs/s", flush=True)

    def median(side: str, key: str) -> float | None:
        values = [x[key] for x in runs[side] if x[key] is not None]
        if values and isinstance(values[0], bool):  # a setting the side ran with, not a measurement
            return values[0] if len(set(values)) == 1 else values
        return statistics.median(values) if values else None

    summary = {s: {k: median(s, k) for k in runs[s][0]} for s in sides}
    rate = {s: summary[s]["pairs_per_s"] for s in sides}
    pairs = [(a, b) for a, b in [("ours", "trl"), ("ours_precompute", "trl"), ("trl_precompute", "trl"),
                                 ("ours_precompute", "trl_precompute"), ("ours_precompute", "ours"),
                                 ("ours_eager", "trl"), ("ours_eager_precompute", "trl_precompute"),
                                 ("ours", "ours_eager"), ("ours_precompute", "ours_eager_precompute")]
             if a in rate and b in rate]
    ratios = {f"{a}_vs_{b}": rate[a] / rate[b] for a, b in pairs}
    # the same ratios within each round (the two runs minutes apart at most), then their median: steadier than the
    # ratio of medians when the machine's load drifts
    paired = {f"{a}_vs_{b}": statistics.median(x["pairs_per_s"] / y["pairs_per_s"] for x, y in zip(runs[a], runs[b]))
              for a, b in pairs}
    import torch

    gpu = torch.cuda.get_device_name() if args.device == "cuda" else None
    peak = args.peak_tflops * 1e12 if args.peak_tflops else (
        peak_bf16_flops(gpu) if gpu and args.precision == "bf16-mixed" else None)
    per_pair = tokens_per_pair(make_records((args.warmup + args.steps) * args.batch, args.prompt_bytes))
    for s, row in summary.items():
        row["tokens_per_s"] = row["pairs_per_s"] * per_pair
        if peak:
            row["mfu"] = mfu(row["policy_params"], row["tokens_per_s"], peak)
            row["mfu_incl_reference_forward"] = mfu(row["policy_params"], row["tokens_per_s"], peak,
                                                    6 if s.endswith("precompute") else 8)
    result = {
        "benchmark": "dpo_throughput", "device": args.device, "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "torch": torch.__version__, "gpu": gpu,
        "peak_bf16_tflops": None if peak is None else peak / 1e12,
        "mfu": "6·N·tokens/s / peak dense bf16" if peak else f"skipped: needs --precision bf16-mixed on a GPU in "
                                                              f"PEAK_BF16_TFLOPS or --peak-tflops (got {gpu or 'cpu'})",
        "trl": trl_status,
        "settings": {"model": settings(args) | {"vocab_size": 259, "model_type": "llama"}, "batch_pairs": args.batch,
                     "prompt_tokens": args.prompt_bytes, "response_tokens": "1-8 (+EOS)", "steps": args.steps,
                     "tokens_per_pair": per_pair, "warmup": args.warmup, "repeats": args.repeats,
                     "precision": args.precision, "torch_threads": args.threads,
                     "optimizer": "torch AdamW (non-fused), lr 1e-5 constant, clip 1.0",
                     "trl": f"DPOConfig(bf16={args.precision == 'bf16-mixed'}, fp16=False, "
                            "gradient_checkpointing=False, optim='adamw_torch', padding_free=True, "
                            f"use_liger_kernel={liger_usable(args.device)}); log-probs from TRL's fused chunked LM "
                            "head; padding_free as TRL ran it: median.trl*.trl_padding_free_effective",
                     "trl_use_liger_kernel": "on" if liger_usable(args.device) else (
                         "off: needs CUDA (Triton kernels)" if args.device != "cuda" else
                         "off: liger-kernel is not installed"),
                     "ours": f"lit_modules.DPO(packed=True) (ours*) / DPO(packed=False) (ours_eager*) + Lightning "
                             f"Trainer(precision={args.precision!r}, logger=False)"},
        "median": summary, "ratios": ratios, "median_of_per_round_ratios": paired, "raw": runs,
    }
    print(json.dumps(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
