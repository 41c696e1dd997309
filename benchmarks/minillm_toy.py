"""Mode seeking on a toy: a factorised student fitted to a correlated teacher over 2-token sequences.

    python -m benchmarks.minillm_toy [--quick] [--vocab 2]

Teacher p: y1 uniform over V tokens, y2 = y1 with probability 0.98 (else uniform over the other V−1).
Student q(y1, y2) = q1(y1)·q2(y2), independent, so it cannot represent the correlation (MiniLLM paper,
Fig. 2 / docs/papers.md §1). Fits, all by Adam from the same small random init:

- forward KL(p‖q): exact, by autograd over all V² sequences (what word-level KD minimises);
- reverse KL(q‖p) through MiniLLM's estimator (``lit_modules.minillm.minillm_loss``) on sampled batches;
- reverse KL(q‖p): exact, by autograd (the target the estimator should reach).

Reports the student's mass on the sequences the teacher (almost) never makes, y2 ≠ y1 (teacher: 2%).
Median over seeds; prints one JSON object last.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from lit_modules.minillm import minillm_loss


def teacher_logprobs(vocab: int, p_same: float = 0.98) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(y1) (V,) and log p(y2 | y1) (V, V)."""
    first = torch.full((vocab,), 1.0 / vocab)
    cond = torch.full((vocab, vocab), (1 - p_same) / max(vocab - 1, 1))
    cond.fill_diagonal_(p_same)
    return first.log(), cond.log()


def joint(first_logits: torch.Tensor, second_logits: torch.Tensor) -> torch.Tensor:
    """q(y1, y2) = softmax(first)[y1]·softmax(second)[y2] as a (V, V) table."""
    return torch.softmax(first_logits, -1)[:, None] * torch.softmax(second_logits, -1)[None, :]


def fit(mode: str, vocab: int, steps: int, batch: int, lr: float, seed: int) -> dict[str, float]:
    g = torch.Generator().manual_seed(seed)
    a = (0.1 * torch.randn(vocab, generator=g)).requires_grad_()
    b = (0.1 * torch.randn(vocab, generator=g)).requires_grad_()
    lp1, lp21 = teacher_logprobs(vocab)
    p = (lp1[:, None] + lp21).exp()
    opt = torch.optim.Adam([a, b], lr=lr)
    for _ in range(steps):
        q = joint(a, b)
        if mode == "forward_kl_exact":
            loss = (p * (p.log() - q.log())).sum()
        elif mode == "reverse_kl_exact":
            loss = (q * (q.log() - p.log())).sum()
        else:  # MiniLLM estimator on `batch` sequences sampled from the student
            with torch.no_grad():
                flat = torch.multinomial(q.flatten(), batch, replacement=True, generator=g)
            y1, y2 = flat // vocab, flat % vocab
            s_logits = torch.stack([a.expand(batch, -1), b.expand(batch, -1)], 1)
            t_logits = torch.stack([lp1.expand(batch, -1), lp21[y1]], 1)
            tokens = torch.stack([y1, y2], 1)
            old = torch.log_softmax(s_logits.detach(), -1).gather(-1, tokens[..., None]).squeeze(-1)
            loss, _ = minillm_loss(s_logits, t_logits, tokens, torch.ones(batch, 2), old, length_norm=True,
                                   whiten_advantages=False, reward_scaling=1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        q = joint(a, b)
        off = float(q.sum() - q.diagonal().sum())
        return {"mass_off_mode": off, "forward_kl": float((p * (p.log() - q.log())).sum()),
                "reverse_kl": float((q * (q.log() - p.log())).sum()), "q_y1_max": float(q.sum(1).max())}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu"], help="CPU only (a few hundred tiny steps)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--vocab", type=int, default=2)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--seeds", type=int, default=None)
    args = ap.parse_args(argv)
    steps = args.steps or (200 if args.quick else 600)
    seeds = args.seeds or (3 if args.quick else 7)
    torch.set_num_threads(1)
    t = time.perf_counter()
    res = {}
    for mode in ("forward_kl_exact", "reverse_kl_minillm_estimator", "reverse_kl_exact"):
        runs = [fit(mode, args.vocab, steps, args.batch, args.lr, s) for s in range(seeds)]
        res[mode] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        res[mode]["mass_off_mode_per_seed"] = [round(r["mass_off_mode"], 4) for r in runs]
    print("| fit | student mass on y2 ≠ y1 (teacher: 0.02) | KL(p‖q) | KL(q‖p) |\n|---|---|---|---|")
    for mode, r in res.items():
        print(f"| {mode} | {r['mass_off_mode']:.3f} | {r['forward_kl']:.3f} | {r['reverse_kl']:.3f} |")
    out = {"benchmark": "minillm_toy", "vocab": args.vocab, "steps": steps, "batch": args.batch, "lr": args.lr,
           "seeds": seeds, "teacher_mass_off_mode": 0.02, "results": res,
           "seconds": time.perf_counter() - t}
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
