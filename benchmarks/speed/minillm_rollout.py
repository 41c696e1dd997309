"""Rollout speed of MiniLLM's teacher-mixed sampler vs the anchor: the student's HF ``generate`` plus one
teacher forward over its output (what a sampler without mixing needs for the rewards).

    python -m benchmarks.speed.minillm_rollout [--device cpu|cuda] [--quick] [--size tiny|100m] [--no-train-step]
                                         [--caches static,dynamic] [--out FILE]

Both sides: same random-init Llama student/teacher (config dicts), same left-padded prompt batch, the same
number of new tokens (``eos_token_id=None`` on ``generate`` and ``eos_id=None`` in ours, so no sequence stops
early), sampling at temperature 1 with no top-k/top-p (``generate``: ``torch.multinomial``; ours: inverse-CDF
draws, the same distribution), fp32 on CPU / ``--dtype`` on CUDA,
``torch.inference_mode``. Ours additionally samples from the α = 0.2 teacher-student mixture and returns the teacher's
and the mixture's log-probs of every token. Each sampler path (``--caches``: ``static`` = StaticCache, with CUDA
graphs on CUDA; ``dynamic`` = the eager reference) is timed teacher-mixed against ``generate`` + one teacher forward
and student-only (α = 0, no teacher) against ``generate`` alone, all sides interleaved in one run. Prints one JSON
object with the median tokens/s of each side and the ratios ours/anchor.

Training step (when ``trl`` is installed): TRL's ``GKDTrainer`` (λ = 1 on-policy, β = 1 reverse KL,
``bf16=False``, ``gradient_checkpointing=False``, AdamW) vs ``MiniLLM(objective="gkd", gkd_beta=1)`` in a
Lightning ``Trainer``: same models, batch, prompts (the built-in tasks), ``max_new_tokens``; seconds per
optimizer step, median over steps after a warm-up. MiniLLM's own step (a rollout every 4 PPO steps, + PT loss)
is reported too, as the mean seconds per optimizer step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings

import torch
import transformers

from lm.hf import load_causal_lm, resolve_dtype
from lm.sampling import sample_mixed

SIZES = {
    # the table's tiny pair (configs/minillm): student 64-d/2 layers, teacher 128-d/3 layers, byte vocabulary
    "tiny": ({"hidden_size": 64, "intermediate_size": 192, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 4, "vocab_size": 259},
             {"hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 3, "num_attention_heads": 4,
              "num_key_value_heads": 4, "vocab_size": 259}),
    # ~110M-parameter Llama student (GPT-2-small shape, 32k vocabulary, tied embeddings), same-shape teacher
    "100m": ({"hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 12, "num_attention_heads": 12,
              "num_key_value_heads": 12, "vocab_size": 32000, "max_position_embeddings": 1024,
              "tie_word_embeddings": True},) * 2,
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time_interleaved(fns: dict, device: torch.device, repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each function, calls interleaved round-robin (fair on a noisy machine); one warm-up."""
    for fn in fns.values():
        fn()
    out = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync(device)
            t = time.perf_counter()
            fn()
            _sync(device)
            out[name].append(time.perf_counter() - t)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--quick", action="store_true", help="fewer repeats and tokens")
    ap.add_argument("--size", default=None, choices=list(SIZES), help="default: tiny on cpu, 100m on cuda")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--alpha", type=float, default=0.2)
    ap.add_argument("--dtype", default=None, help="model dtype (default fp32 on cpu, bf16 on cuda)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads")
    ap.add_argument("--no-train-step", action="store_true", help="skip the training-step comparison")
    ap.add_argument("--caches", default="static,dynamic", help="sampler paths to time (comma-separated)")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    size = args.size or ("100m" if device.type == "cuda" else "tiny")
    batch = args.batch or (64 if device.type == "cuda" else 16)
    new_tokens = args.new_tokens or (32 if args.quick else (256 if device.type == "cuda" else 64))
    repeats = args.repeats or (5 if args.quick else 9)
    dtype = resolve_dtype(args.dtype or ("bf16" if device.type == "cuda" else "float32"))
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    s_cfg, t_cfg = SIZES[size]
    student = load_causal_lm(s_cfg, dtype=dtype, seed=0).to(device).eval()
    teacher = load_causal_lm(t_cfg, dtype=dtype, seed=1).to(device).eval()
    vocab = s_cfg["vocab_size"]
    prompts = torch.randint(3, vocab, (batch, args.prompt_len), device=device)
    mask = torch.ones_like(prompts)
    lengths = torch.randint(args.prompt_len // 2, args.prompt_len + 1, (batch,), device=device)
    for i, n in enumerate(lengths.tolist()):  # left padding, as the datamodule makes it
        prompts[i, : args.prompt_len - n] = 0
        mask[i, : args.prompt_len - n] = 0

    @torch.inference_mode()  # as ours: sample_mixed runs under inference_mode
    def anchor_generate():
        return student.generate(input_ids=prompts, attention_mask=mask, do_sample=True, max_new_tokens=new_tokens,
                                eos_token_id=None, pad_token_id=0, top_k=0, top_p=1.0, temperature=1.0)

    @torch.inference_mode()
    def anchor():
        out = anchor_generate()
        full_mask = torch.cat([mask, torch.ones_like(out[:, prompts.shape[1]:])], dim=1)
        teacher(input_ids=out, attention_mask=full_mask)

    def ours(cache: str, mixed: bool):
        return lambda: sample_mixed(student, teacher if mixed else None, prompts, mask, new_tokens,
                                    alpha=args.alpha if mixed else 0.0, eos_id=None, pad_id=0, cache=cache)

    tokens = batch * new_tokens
    sides = {"anchor_generate_plus_teacher_forward": anchor, "anchor_generate": anchor_generate}
    for cache in args.caches.split(","):
        sides[f"ours_teacher_mixed_{cache}"] = ours(cache, True)
        sides[f"ours_student_only_{cache}"] = ours(cache, False)
    with warnings.catch_warnings(record=True) as caught:  # e.g. a CUDA-graph capture that fell back
        warnings.simplefilter("always", RuntimeWarning)
        times = _time_interleaved(sides, device, repeats)
    tps = {k: tokens / statistics.median(v) for k, v in times.items()}
    ratios = {}
    for cache in args.caches.split(","):
        ratios[f"teacher_mixed_{cache}_vs_generate_plus_teacher_forward"] = (
            tps[f"ours_teacher_mixed_{cache}"] / tps["anchor_generate_plus_teacher_forward"])
        ratios[f"student_only_{cache}_vs_generate"] = tps[f"ours_student_only_{cache}"] / tps["anchor_generate"]
    result = {
        "benchmark": "minillm_rollout", "device": str(device),
        "device_name": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({args.threads} threads)",
        "torch": torch.__version__, "transformers": transformers.__version__,
        "settings": {"size": size, "student_params": sum(p.numel() for p in student.parameters()),
                     "teacher_params": sum(p.numel() for p in teacher.parameters()), "batch": batch,
                     "prompt_len": args.prompt_len, "new_tokens": new_tokens, "alpha": args.alpha,
                     "dtype": str(dtype), "repeats": repeats, "sampling": "T=1, no top-k/top-p",
                     "anchors": "student.generate(do_sample, eos_token_id=None) [+ 1 teacher forward]",
                     "ours": "sample_mixed(cache=static: StaticCache + CUDA graphs on cuda, no graphs on cpu; "
                             "cache=dynamic: the eager reference path)"},
        "seconds": times, "tokens_per_s_median": tps, "ratios": ratios,
        "runtime_warnings": sorted({str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)}),
    }
    if not args.no_train_step:
        result["train_step"] = train_step_comparison(s_cfg, t_cfg, device, batch, 16, 12 if args.quick else 30)
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


class _StepTimer:
    """Wall time of each optimizer step, for a Lightning Trainer (callback) or an HF Trainer (callback)."""

    def __init__(self, device: torch.device):
        self.device, self.times, self._t = device, [], 0.0

    def begin(self, *_, **__):
        _sync(self.device)
        self._t = time.perf_counter()

    def end(self, *_, **__):
        _sync(self.device)
        self.times.append(time.perf_counter() - self._t)


def train_step_comparison(s_cfg: dict, t_cfg: dict, device: torch.device, batch: int, new_tokens: int,
                          steps: int) -> dict:
    import lightning as L

    from datamodules import InstructionDataModule
    from datamodules.instruction import collate_instruction
    from datamodules.instruction_tasks import generate_examples
    from lit_modules import MiniLLM
    from lm.tokenizers import byte_tokenizer

    if s_cfg["vocab_size"] != 259:
        return {"skipped": "the training-step comparison uses the byte-level tasks (size tiny)"}
    template = "Q: {instruction}\nA: "
    out = {"settings": {"batch": batch, "max_new_tokens": new_tokens, "steps_timed": steps - 2, "lr": 5e-4,
                        "precision": "fp32", "gradient_checkpointing": False}}

    def ours(objective: str) -> list[float]:
        module = MiniLLM(student=s_cfg, teacher=t_cfg, objective=objective, gkd_beta=1.0, max_new_tokens=new_tokens,
                         lr=5e-4, init_seed=0)
        timer = _StepTimer(device)
        cb = type("T", (L.Callback,), {"on_train_batch_start": timer.begin, "on_train_batch_end": timer.end})()
        trainer = L.Trainer(accelerator=device.type, max_steps=steps, limit_val_batches=0, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            callbacks=[cb])
        trainer.fit(module, InstructionDataModule(num_examples=batch * (steps + 1) + 1, num_val=1, batch_size=batch,
                                                  max_response_length=new_tokens, template=template))
        return timer.times[2:]

    gkd, minillm = ours("gkd"), ours("minillm")
    out["ours_gkd_s_per_step"] = statistics.median(gkd)
    # one rollout serves 4 PPO steps: the mean over steps is the amortised cost of an optimizer step
    out["ours_minillm_s_per_optimizer_step_mean"] = statistics.mean(minillm)
    try:
        import os

        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
        from datasets import Dataset
        from transformers import TrainerCallback
        from trl.experimental.gkd import GKDConfig, GKDTrainer
    except ImportError as e:
        out["trl"] = f"skipped: {e}"
        return out
    import tempfile

    tok = byte_tokenizer()

    def collate(rows):  # TRL's ChatML collator needs a fast tokenizer; build the same fields ourselves
        items = [{"record": {}, "prompt_ids": tok(template.format(instruction=r["instruction"]),
                                                   add_special_tokens=False)["input_ids"],
                  "response_ids": tok(r["response"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]}
                 for r in rows]
        b = collate_instruction(items, tok.pad_token_id)
        return {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"], "labels": b["labels"],
                "prompts": b["prompt_input_ids"], "prompt_attention_mask": b["prompt_attention_mask"]}

    examples = generate_examples(batch * (steps + 1), seed=0)
    data = Dataset.from_list([{"instruction": e["instruction"], "response": e["response"]} for e in examples])
    timer = _StepTimer(device)
    cb = type("T", (TrainerCallback,), {"on_step_begin": timer.begin, "on_step_end": timer.end})()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = GKDConfig(output_dir=tmp, per_device_train_batch_size=batch, max_steps=steps, lmbda=1.0, beta=1.0,
                        max_new_tokens=new_tokens, temperature=1.0, bf16=False, gradient_checkpointing=False,
                        report_to=[], logging_steps=10_000, save_strategy="no", use_cpu=device.type == "cpu",
                        learning_rate=5e-4, dataloader_num_workers=0, disable_tqdm=True)
        trainer = GKDTrainer(model=load_causal_lm(s_cfg, seed=0).to(device),
                             teacher_model=load_causal_lm(t_cfg, seed=1).to(device), args=cfg, train_dataset=data,
                             processing_class=tok, data_collator=collate, callbacks=[cb])
        trainer.train()
    out["trl_gkd_s_per_step"] = statistics.median(timer.times[2:])
    out["ratio_ours_gkd_steps_per_s_vs_trl_gkd"] = out["trl_gkd_s_per_step"] / out["ours_gkd_s_per_step"]
    return out


if __name__ == "__main__":
    main()
