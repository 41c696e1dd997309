"""Claim test of AdEMAMix (Pagliardini, Ablin, Grangier; ICLR 2025; docs/papers.md §5) for ``litpapers reproduce``:
AdEMAMix vs AdamW at equal steps on a token stream that never repeats.

    python -m benchmarks.claim_ademamix [--full] [--seeds N] [--out DIR]

Setup (docs/papers.md §5, "a fair small-scale test"): the tiny byte-level Llama of ``configs/ademamix/quick.yaml``
(hidden 64, 2 layers); training data read once, in order, never repeated: the built-in corpus
(``pydoc_data.topics``) and CPython's standard-library sources (all documents shuffled together with a fixed seed,
each followed by EOS, packed into blocks); held-out documents give the validation set, the forgetting-probe batch and a
fresh control batch. Same model init, batches and schedule for both optimizers: linear warm-up then a constant
learning rate (a cosine schedule ties the loss curve to the run length; with a constant one, a single longer AdamW
run gives AdamW's loss at every step count), weight decay 0.1 on matrices, gradient clipping 1.0. AdEMAMix:
β = (0.9, 0.999, β3) with β3 = 1 − 5/T (its timescale 1/(1 − β3) = T/5, well inside the run), α = 5,
t_α = t_β3 = T (the run length). AdamW: β = (0.9, 0.999). The learning rate of each is tuned on ``lr_grid``
(seed 0, lowest validation loss at T) in ``full`` mode, whose seed-0 runs are the grid winners' runs; ``quick``
uses the winners stated in ``MODES["quick"]`` (from the full-mode grid in ``docs/results/full/results.json``).
Settings (:data:`MODES`): ``full`` T = 1200 steps of 16 × 64 tokens, 3 seeds, lr grid {5e-4, 1e-3, 2e-3}, AdamW to
1.5 T, 128 validation blocks (~10 min of one core); ``quick`` T = 500, 2 seeds, 64 validation blocks (~1.5 min).
``--steps``/``--lr-grid`` (or ``overrides``) make it larger.

Claims (per seed, paired):

1. Lower validation loss than AdamW after the same T steps.
2. The paper's measure: the steps AdamW needs to reach AdEMAMix's final validation loss, as a multiple of T
   (AdamW runs ``adamw_horizon``·T steps; linear interpolation between evaluations; a run that never gets there
   counts as the horizon, a lower bound). Baseline 1 (equal steps).
3. Forgetting probe: a held-out batch is trained on once, at step k = T/2, instead of the stream's batch; at T its
   loss is compared with that of a fresh held-out control batch. Reported: loss(control) − loss(probe) at T, the
   advantage still retained from the single visit (higher = slower forgetting).
"""

from __future__ import annotations

import math
import os
import pathlib
import random
from collections.abc import Callable, Iterator

import torch
import yaml
from matplotlib.figure import Figure

from benchmarks.claim_common import claim, claim_parser, mode_settings, run_and_record
from datamodules.text import builtin_documents, pack_blocks
from lit_modules import CausalLM
from optimizers import AdEMAMix

CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "ademamix" / "quick.yaml"
# full: T = 1200 (β3 = 0.9958, timescale 240 steps), 3 seeds, a 3-point lr grid: ~15 000 steps in all, ~10 min of
# one CPU core (2-core machine). Quick: T = 500 (β3 = 0.99), 2 seeds, the full grid's winners (full run of
# 2026-11-27, docs/results/full/results.json: AdEMAMix 1e-3, AdamW 5e-4).
MODES = {
    "quick": dict(steps=500, seeds=2, batch_size=16, block_size=64, warmup=None, eval_every=None, adamw_horizon=1.5,
                  lr_grid=None, lr={"adamw": 5e-4, "ademamix": 1e-3}, val_blocks=64),
    "full": dict(steps=1200, seeds=3, batch_size=16, block_size=64, warmup=None, eval_every=None, adamw_horizon=1.5,
                 lr_grid=[5e-4, 1e-3, 2e-3], lr=None, val_blocks=128),
}
OPTIMIZERS = ("ademamix", "adamw")


# ------------------------------------------------------------------------------------------------- data
def stdlib_paths() -> list[pathlib.Path]:
    """CPython's standard-library sources (``*.py`` under the directory of ``os``, no site-packages), sorted."""
    root = pathlib.Path(os.__file__).parent
    return [p for p in sorted(root.rglob("*.py")) if "site-packages" not in p.relative_to(root).parts]


def read_documents(docs: list[str | pathlib.Path]) -> Iterator[str]:
    """Each document's text in order, lazily: a ``str`` is the text, a path is read (non-UTF-8 files skipped)."""
    for doc in docs:
        if isinstance(doc, str):
            yield doc
            continue
        try:
            yield doc.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue


def token_stream(tokenizer, num_train_blocks: int, num_heldout_blocks: int, block_size: int,
                 seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) blocks of ``block_size`` tokens. All documents (pydoc topics and stdlib sources) are
    shuffled together with ``seed`` (so the stream's distribution does not change along the run, and the held-out
    side has the same mix); every 20th document is held out; the rest are packed in order.
    No document (hence no block) occurs twice, so training reads the stream once. Files are read and tokenized
    only as far as needed. ``ValueError`` when the built-in text is too short for the requested sizes (checked
    first against its size in bytes, an upper bound on the tokens of a byte-level or subword tokenizer)."""
    pydoc, paths = [text for _, text in builtin_documents()], stdlib_paths()
    available = sum(len(text.encode()) for text in pydoc) + sum(p.stat().st_size for p in paths)
    if (num_train_blocks + num_heldout_blocks) * block_size > available:
        raise ValueError(f"built-in text has at most {available} tokens; {num_train_blocks} train + "
                         f"{num_heldout_blocks} held-out blocks of {block_size} tokens need more (lower steps or "
                         "batch_size)")
    docs: list[str | pathlib.Path] = [*pydoc, *paths]
    random.Random(seed).shuffle(docs)
    train_ids: list[list[int]] = []
    heldout_ids: list[list[int]] = []
    counts = [0, 0]
    needs = [num_train_blocks * block_size, num_heldout_blocks * block_size]
    for i, text in enumerate(read_documents(docs)):
        side = 1 if i % 20 == 0 else 0
        if counts[side] >= needs[side] * 1.05 + block_size:
            if counts[1 - side] >= needs[1 - side] * 1.05 + block_size:
                break
            continue
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        (heldout_ids if side else train_ids).append(ids)
        counts[side] += len(ids) + 1
    train = pack_blocks(train_ids, block_size, tokenizer.eos_token_id)
    heldout = pack_blocks(heldout_ids, block_size, tokenizer.eos_token_id)
    if len(train) < num_train_blocks or len(heldout) < num_heldout_blocks:
        raise ValueError(f"built-in text gives {len(train)} train / {len(heldout)} held-out blocks of {block_size} "
                         f"tokens; need {num_train_blocks} / {num_heldout_blocks} (lower steps or batch_size)")
    return train[:num_train_blocks], heldout[:num_heldout_blocks]


# --------------------------------------------------------------------------------------------- training
def beta3_for(steps: int) -> float:
    """β3 = 1 − 5/T: the slow EMA's timescale 1/(1 − β3) is a fifth of the run."""
    return 1.0 - 5.0 / steps


def make_optimizer(name: str, groups: list[dict], lr: float, steps: int) -> torch.optim.Optimizer:
    """AdEMAMix (β3 = :func:`beta3_for`, α = 5, t_α = t_β3 = T) or AdamW, both β1 = 0.9, β2 = 0.999."""
    if name == "ademamix":
        return AdEMAMix(groups, lr=lr, betas=(0.9, 0.999, beta3_for(steps)), alpha=5.0, t_alpha=steps,
                        t_beta3=steps)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999))
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")


def mean_loss(model, blocks: torch.Tensor, batch: int = 64) -> float:
    """Mean next-token cross-entropy over ``blocks`` (eval mode, no grad)."""
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(blocks), batch):
            ids = blocks[start:start + batch]
            total += model(input_ids=ids, labels=ids).loss.item() * len(ids)
            count += len(ids)
    model.train()
    return total / count


def train_run(name: str, lr: float, run_steps: int, schedule_steps: int, seed: int, train: torch.Tensor,
              val: torch.Tensor, probe: torch.Tensor, control: torch.Tensor, s: dict,
              progress: Callable[[str], None]) -> dict:
    """Train ``run_steps`` steps (the optimizer's α/β3 horizon is ``schedule_steps`` = T); evaluate every
    ``eval_every`` steps; the ``probe`` batch replaces the stream's at step T/2."""
    config = yaml.safe_load(CONFIG.read_text())["model"]["init_args"]
    module = CausalLM(model=config["model"], init_seed=seed, weight_decay=0.1)
    model = module.model
    model.train()
    optimizer = make_optimizer(name, module.parameter_groups(), lr, schedule_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: min(1.0, (t + 1) / s["warmup"]))
    probe_step = schedule_steps // 2
    curve, forgetting = [], []
    batch = s["batch_size"]
    for step in range(1, run_steps + 1):
        ids = probe if step == probe_step else train[(step - 1) * batch:step * batch]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"{name} lr={lr} seed={seed}: loss {loss.item()} at step {step}")
        if step % s["eval_every"] == 0 or step in (schedule_steps, run_steps):
            curve.append((step, mean_loss(model, val)))
        after = step - probe_step
        if 0 <= after and step <= schedule_steps and (after % s["eval_every"] in (0, 1) or step == schedule_steps):
            forgetting.append((step, mean_loss(model, probe), mean_loss(model, control)))
        if step % max(1, run_steps // 4) == 0:
            progress(f"ademamix: {name} lr={lr:g} seed {seed}: step {step}/{run_steps}, loss {loss.item():.3f}")
    return {"curve": curve, "forgetting": forgetting, "final_val": dict(curve)[schedule_steps]}


def steps_to_reach(curve: list[tuple[int, float]], target: float) -> tuple[float, bool]:
    """First step at which the piecewise-linear loss curve (step, loss) reaches ``target``, and whether it did;
    when it never does, the last step (a lower bound)."""
    prev_step, prev_loss = 0, math.inf
    for step, loss in curve:
        if loss <= target:
            if not math.isfinite(prev_loss):
                return float(step), True
            return prev_step + (step - prev_step) * (prev_loss - target) / (prev_loss - loss), True
        prev_step, prev_loss = step, loss
    return float(curve[-1][0]), False


# --------------------------------------------------------------------------------------------------- run
def run(mode: str, seeds: int | None, out_dir: pathlib.Path, progress: Callable[[str], None],
        overrides: dict | None = None) -> dict:
    """Tune (full), train both optimizers per seed, return the claims (module docstring); ``overrides``
    replaces ``MODES[mode]`` entries (tests use tiny settings)."""
    s = mode_settings(MODES, mode, seeds, overrides)
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    T = s["steps"]
    s["warmup"] = s["warmup"] or max(1, T // 20)  # None: 5% of the run
    s["eval_every"] = s["eval_every"] or max(1, T // 20)  # None: 20 evaluations up to T
    horizon = int(round(s["adamw_horizon"] * T))
    tokenizer = CausalLM(model=yaml.safe_load(CONFIG.read_text())["model"]["init_args"]["model"]).tokenizer
    progress(f"ademamix: building the token stream ({horizon * s['batch_size']} blocks)")
    train, heldout = token_stream(tokenizer, horizon * s["batch_size"], s["val_blocks"] + 2 * s["batch_size"],
                                  s["block_size"])
    val, probe = heldout[:s["val_blocks"]], heldout[s["val_blocks"]:s["val_blocks"] + s["batch_size"]]
    control = heldout[s["val_blocks"] + s["batch_size"]:]
    data = (train, val, probe, control)

    lengths = {"ademamix": T, "adamw": horizon}
    grid, grid_runs = {}, {}
    if s["lr_grid"]:  # seed 0, full length: the winner's run is also seed 0's run (AdamW's loss at T is on its curve)
        for name in OPTIMIZERS:
            for lr in s["lr_grid"]:
                try:
                    grid_runs[name, lr] = train_run(name, lr, lengths[name], T, 0, *data, s, progress)
                    grid[name, lr] = grid_runs[name, lr]["final_val"]
                except FloatingPointError:
                    grid[name, lr] = math.inf
        lrs = {name: min(s["lr_grid"], key=lambda lr: grid[name, lr]) for name in OPTIMIZERS}
    else:
        lrs = dict(s["lr"])
    progress(f"ademamix: learning rates {lrs}")

    runs = {name: [] for name in OPTIMIZERS}
    for seed in range(s["seeds"]):
        for name in OPTIMIZERS:
            reused = grid_runs.get((name, lrs[name])) if seed == 0 else None
            runs[name].append(reused or train_run(name, lrs[name], lengths[name], T, seed, *data, s, progress))

    final = {name: [r["final_val"] for r in runs[name]] for name in OPTIMIZERS}
    reach = [steps_to_reach(w["curve"], a["final_val"]) for a, w in zip(runs["ademamix"], runs["adamw"])]
    retained = {name: [r["forgetting"][-1][2] - r["forgetting"][-1][1] for r in runs[name]] for name in OPTIMIZERS}
    claims = [
        claim("AdEMAMix reaches a lower validation loss than AdamW at equal steps", f"validation loss after {T} steps",
              final["ademamix"], final["adamw"], "AdamW", higher_is_better=False),
        claim("AdamW needs more steps to reach AdEMAMix's loss (the paper's token-efficiency measure)",
              f"steps AdamW needs / {T} (censored at {s['adamw_horizon']}x)", [r / T for r, _ in reach],
              [1.0] * len(reach), "equal steps", higher_is_better=True),
        claim("AdEMAMix forgets a batch seen once more slowly (forgetting probe)",
              f"loss(control) − loss(probe batch) at step {T}, probe seen once at step {T // 2}",
              retained["ademamix"], retained["adamw"], "AdamW", higher_is_better=True),
    ]
    figures = [draw(runs, T, out_dir)]
    s.update(lr=lrs, beta3=beta3_for(T), alpha=5.0, t_alpha=T, t_beta3=T, adamw_betas=[0.9, 0.999],
             schedule=f"linear warm-up over {s['warmup']} steps, then constant", weight_decay=0.1,
             config=str(CONFIG.relative_to(CONFIG.parents[2])), tokens_per_step=s["batch_size"] * s["block_size"],
             data="pydoc_data.topics and CPython stdlib sources shuffled together, read once (no repetition); "
                  "held-out documents for validation/probe/control",
             spread="sample std over seeds of the paired difference ours - baseline (None for one seed)",
             lr_source="grid (seed 0, loss at T)" if s["lr_grid"] else "MODES['quick'] (full-mode grid winners)")
    measurements = {"lr_grid": {f"{n}/{lr:g}": v for (n, lr), v in grid.items()},
                    "adamw_reached": [ok for _, ok in reach],
                    "runs": {n: [{k: r[k] for k in ("curve", "forgetting")} for r in runs[n]] for n in OPTIMIZERS}}
    return {"claims": claims, "figures": figures, "settings": s, "measurements": measurements}


def draw(runs: dict, T: int, out_dir: pathlib.Path) -> str:
    """Validation loss vs step (both optimizers, every seed) and the forgetting probe; returns the PNG's name."""
    fig = Figure(figsize=(10, 3.6), dpi=72)
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.14, top=0.9, wspace=0.25)
    left, right = fig.subplots(1, 2)
    for ci, name in enumerate(OPTIMIZERS):
        for i, r in enumerate(runs[name]):
            steps, losses = zip(*r["curve"])
            left.plot(steps, losses, color=f"C{ci}", alpha=0.8, label=name if i == 0 else None)
            fsteps, probe, control = zip(*r["forgetting"])
            right.plot(fsteps, [c - p for p, c in zip(probe, control)], color=f"C{ci}", label=name if i == 0 else None)
    left.axvline(T, color="gray", linewidth=0.8)
    left.set(xlabel="step", ylabel="validation loss", title="Equal steps (T marked); AdamW continues past T")
    right.set(xlabel="step", ylabel="loss(control) − loss(probe)", title=f"Forgetting: batch seen once at {T // 2}")
    left.legend(fontsize=8)
    right.legend(fontsize=8)
    name = "ademamix_vs_adamw.png"
    fig.savefig(out_dir / name, dpi=90)
    return name


def main(argv: list[str] | None = None) -> dict:
    parser = claim_parser(__doc__, "claim_ademamix")
    parser.add_argument("--steps", type=int, default=None, help="override T (documented in the output settings)")
    parser.add_argument("--lr-grid", type=float, nargs="+", default=None)
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in (("steps", args.steps), ("lr_grid", args.lr_grid)) if v is not None}
    return run_and_record(run, args, overrides, "claim_ademamix", argv)


if __name__ == "__main__":
    main()
