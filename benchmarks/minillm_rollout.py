"""Rollout speed of MiniLLM's teacher-mixed sampler vs the anchor: the student's HF ``generate`` plus one
teacher forward over its output (what a sampler without mixing needs for the rewards).

    python -m benchmarks.minillm_rollout [--device cpu|cuda] [--quick] [--size tiny|100m]

Both sides: same random-init Llama student/teacher (config dicts), same left-padded prompt batch, the same
number of new tokens (``eos_token_id=None`` on ``generate`` and ``eos_id=None`` in ours, so no sequence stops
early), multinomial sampling at temperature 1 with no top-k/top-p, fp32 on CPU / ``--dtype`` on CUDA,
``torch.no_grad``. Ours additionally runs the teacher at every step (α = 0.2 mixture). Prints one JSON object
with the median tokens/s of each side and the ratio ours/anchor.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from lit_modules.hf import load_causal_lm, resolve_dtype
from lit_modules.minillm import sample_mixed

SIZES = {
    # the table's tiny pair (configs/minillm): student 64-d/2 layers, teacher 128-d/3 layers, byte vocabulary
    "tiny": ({"hidden_size": 64, "intermediate_size": 192, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 4, "vocab_size": 259},
             {"hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 3, "num_attention_heads": 4,
              "num_key_value_heads": 4, "vocab_size": 259}),
    # ~110M-parameter Llama student (GPT-2-small shape, 32k vocabulary) and a same-shape teacher
    "100m": ({"hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 12, "num_attention_heads": 12,
              "num_key_value_heads": 12, "vocab_size": 32000, "max_position_embeddings": 1024},) * 2,
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

    @torch.no_grad()
    def anchor():
        out = student.generate(input_ids=prompts, attention_mask=mask, do_sample=True, max_new_tokens=new_tokens,
                               eos_token_id=None, pad_token_id=0, top_k=0, top_p=1.0, temperature=1.0)
        full_mask = torch.cat([mask, torch.ones_like(out[:, prompts.shape[1]:])], dim=1)
        teacher(input_ids=out, attention_mask=full_mask)

    def ours():
        sample_mixed(student, teacher, prompts, mask, new_tokens, alpha=args.alpha, eos_id=None, pad_id=0)

    def ours_student_only():
        sample_mixed(student, None, prompts, mask, new_tokens, alpha=0.0, eos_id=None, pad_id=0)

    tokens = batch * new_tokens
    times = _time_interleaved({"anchor_generate_plus_teacher_forward": anchor, "ours_teacher_mixed": ours,
                               "ours_student_only_alpha0": ours_student_only}, device, repeats)
    tps = {k: tokens / statistics.median(v) for k, v in times.items()}
    result = {
        "benchmark": "minillm_rollout", "device": str(device),
        "device_name": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({args.threads} threads)",
        "settings": {"size": size, "student_params": sum(p.numel() for p in student.parameters()),
                     "teacher_params": sum(p.numel() for p in teacher.parameters()), "batch": batch,
                     "prompt_len": args.prompt_len, "new_tokens": new_tokens, "alpha": args.alpha,
                     "dtype": str(dtype), "repeats": repeats, "sampling": "multinomial, T=1, no top-k/top-p",
                     "anchor": "student.generate(do_sample, eos_token_id=None) + 1 teacher forward"},
        "seconds": times, "tokens_per_s_median": tps,
        "ratio_ours_vs_anchor": tps["ours_teacher_mixed"] / tps["anchor_generate_plus_teacher_forward"],
        "ratio_student_only_vs_anchor": tps["ours_student_only_alpha0"] / tps["anchor_generate_plus_teacher_forward"],
    }
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
