"""Claim test of AdEMAMix (Pagliardini, Ablin, Grangier; ICLR 2025; docs/papers.md §5) for ``litpapers reproduce``:
AdEMAMix vs AdamW at equal steps on i.i.d. batches that never repeat.

    python -m benchmarks.claim_ademamix [--full] [--seeds N] [--out DIR]

Design (docs/papers.md §5, "a fair small-scale test"; fixed before the final run, written into the report):

- Model: the tiny byte-level Llama of ``configs/ademamix/quick.yaml`` (hidden 64, 2 layers).
- Data: the built-in corpus (``pydoc_data.topics``) and CPython's standard-library sources, shuffled together at
  document level once (data seed 0); every 20th document is held out (validation, forgetting-probe and control
  batches); the rest are packed into a pool of blocks ``pool_factor`` times larger than the longest run reads.
  Each training seed draws its own random order of the pool (:func:`batch_order`): batches are i.i.d. draws without
  replacement, no block is read twice, and consecutive steps do not come from the same document. (The first design
  read the packed stream in order: one stdlib file spanned hundreds of consecutive steps, which works against a
  slow momentum term, and every seed saw the same order.) Both optimizers of a seed see the same order and init.
- Schedule: linear warm-up over ``warmup_frac`` of the run, then cosine decay to ``final_lr_frac`` of the peak, per
  run length (the paper's setup). AdEMAMix: β = (0.9, 0.999, β3), β3 = 1 − 5/T (:func:`beta3_for`: the slow EMA's
  timescale 1/(1 − β3) = T/5, so the run is five timescales long), α = 5, t_α = t_β3 = T. AdamW: β = (0.9, 0.999).
  Both: weight decay 0.1 on matrices, gradient clipping 1.0.
- Learning rates: tuned per optimizer on ``lr_grid`` with a tuning seed (``tune_seed``: its own init and data
  order, disjoint from the evaluation seeds 0..n−1); a winner on the grid's edge extends the grid by a factor 2
  beyond that edge, up to ``max_extensions`` times (:func:`grid_extension`), so the chosen lr is bracketed; whether
  it was is reported.
- Metric: validation loss (``val_blocks`` held-out blocks) averaged over the last ``eval_last`` evaluations up to T
  (one evaluation is noisy), per seed.

Claims (per evaluation seed, paired):

1. Lower validation loss than AdamW after the same T steps.
2. The paper's measure, token efficiency: the steps AdamW needs to reach AdEMAMix's loss at T, as a multiple of T.
   AdamW also runs ``adamw_horizon``·T steps (its own cosine); the multiple is read off the line through AdamW's
   (log steps, loss) at T and at h·T (:func:`steps_to_match`), clipped to [1/h, h]. Baseline 1 (equal steps).
3. Forgetting probe: a held-out batch is trained on once, at step T/2, instead of the drawn batch; at T its loss is
   compared with that of a fresh held-out control batch: loss(control) − loss(probe), the advantage still retained
   from the single visit (higher = slower forgetting).

Settings (:data:`MODES`): ``full`` T = 1200 steps of 16 × 64 tokens, 3 seeds, grid {5e-4, 1e-3, 2e-3, 4e-3},
AdamW also to 2 T, 256 validation blocks; ``quick`` T = 400, 2 seeds, grid {1e-3, 2e-3, 4e-3}. ``--steps`` /
``--lr-grid`` (or ``overrides``) change them.
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
MODES = {
    "quick": dict(steps=400, seeds=2, batch_size=16, block_size=64, warmup_frac=0.05, final_lr_frac=0.1,
                  eval_every=None, eval_last=3, adamw_horizon=2.0, lr_grid=[1e-3, 2e-3, 4e-3], max_extensions=1,
                  val_blocks=128, pool_factor=2, tune_seed=1000),
    "full": dict(steps=1200, seeds=3, batch_size=16, block_size=64, warmup_frac=0.05, final_lr_frac=0.1,
                 eval_every=None, eval_last=3, adamw_horizon=2.0, lr_grid=[5e-4, 1e-3, 2e-3, 4e-3],
                 max_extensions=2, val_blocks=256, pool_factor=2, tune_seed=1000),
}
OPTIMIZERS = ("ademamix", "adamw")
DESIGN = ("i.i.d. batches drawn without replacement from a pool of packed blocks, a data order and init per seed "
          "(paired across optimizers); warm-up + cosine per run; lr tuned per optimizer on a separate tuning seed "
          "(grid extended until the winner is bracketed); loss = mean of the last evaluations up to T; AdamW also "
          "run to 2 T for the steps-to-match ratio")


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
    shuffled together with ``seed`` (so both sides have the same mix); every 20th document is held out; each side is
    packed. No document (hence no block) occurs twice. Files are read and tokenized only as far as needed.
    ``ValueError`` when the built-in text is too short for the requested sizes (checked first against its size in
    bytes, an upper bound on the tokens of a byte-level or subword tokenizer)."""
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


def batch_order(pool_size: int, steps: int, batch_size: int, seed: int) -> torch.Tensor:
    """``(steps, batch_size)`` indices into a pool of ``pool_size`` blocks: the first ``steps·batch_size`` entries of
    a uniformly random permutation drawn with ``seed``. Every batch is a uniform draw without replacement (i.i.d.
    up to the no-repeat constraint) and no block appears twice in a run; ``ValueError`` when the pool is too small."""
    if steps * batch_size > pool_size:
        raise ValueError(f"a run of {steps} steps x {batch_size} blocks needs {steps * batch_size} distinct blocks; "
                         f"the pool has {pool_size}")
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(pool_size, generator=generator)[:steps * batch_size].view(steps, batch_size)


# --------------------------------------------------------------------------------------------- training
def beta3_for(steps: int) -> float:
    """β3 = 1 − 5/T: the slow EMA's timescale 1/(1 − β3) is a fifth of the run."""
    return 1.0 - 5.0 / steps


def lr_factor(step: int, steps: int, warmup: int, final_frac: float) -> float:
    """Multiplier of the peak lr before optimizer step ``step`` (0-based) of a ``steps``-long run: linear warm-up
    (step+1)/warmup over the first ``warmup`` steps, then cosine from 1 down to ``final_frac`` at the last step:
    f + (1 − f)·½(1 + cos(π·p)), p = (step − warmup)/(steps − warmup − 1)."""
    if step < warmup:
        return (step + 1) / warmup
    p = (step - warmup) / max(1, steps - warmup - 1)
    return final_frac + (1.0 - final_frac) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, p)))


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


def final_loss(curve: list[tuple[int, float]], last: int) -> float:
    """Mean validation loss of the last ``last`` evaluations of ``curve`` [(step, loss), ...]."""
    values = [loss for _, loss in curve[-last:]]
    return sum(values) / len(values)


def train_run(name: str, lr: float, steps: int, seed: int, data: dict, s: dict, progress: Callable[[str], None],
              probe: bool = True) -> dict:
    """Train ``name`` for ``steps`` steps (its own warm-up + cosine; AdEMAMix's α/β3 horizon is ``steps``) from the
    init of ``seed`` on the batch order of ``seed``; evaluate every ``eval_every`` steps. With ``probe`` the probe
    batch replaces the drawn one at step ``steps // 2`` and the forgetting probe is measured."""
    config = yaml.safe_load(CONFIG.read_text())["model"]["init_args"]
    module = CausalLM(model=config["model"], init_seed=seed, weight_decay=0.1)
    module.configure_model()  # materialise the declared network: trained here without a Trainer
    model = module.model
    model.train()
    optimizer = make_optimizer(name, module.parameter_groups(), lr, steps)
    warmup = max(1, round(s["warmup_frac"] * steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda t: lr_factor(t, steps, warmup, s["final_lr_frac"]))
    order = batch_order(len(data["pool"]), steps, s["batch_size"], seed)
    probe_step = steps // 2 if probe else None
    every = s["eval_every"]
    curve, forgetting = [], []
    for step in range(1, steps + 1):
        ids = data["probe"] if step == probe_step else data["pool"][order[step - 1]]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"{name} lr={lr} seed={seed}: loss {loss.item()} at step {step}")
        if step % every == 0 or step == steps:
            curve.append((step, mean_loss(model, data["val"])))
        if probe_step is not None and step >= probe_step and ((step - probe_step) % every in (0, 1) or step == steps):
            forgetting.append((step, mean_loss(model, data["probe"]), mean_loss(model, data["control"])))
        if step % max(1, steps // 4) == 0:
            progress(f"ademamix: {name} lr={lr:g} seed {seed}: step {step}/{steps}, loss {loss.item():.3f}")
    return {"curve": curve, "forgetting": forgetting, "final": final_loss(curve, s["eval_last"])}


def grid_extension(losses: dict[float, float], extensions_left: int) -> float | None:
    """The next lr to try, or None when the grid's best (lowest loss) is bracketed or no extension is left: a best
    at the largest lr extends the grid to twice it, a best at the smallest to half of it."""
    if extensions_left <= 0:
        return None
    lrs = sorted(losses)
    best = min(lrs, key=lambda lr: losses[lr])
    if best == lrs[-1]:
        return lrs[-1] * 2
    if best == lrs[0]:
        return lrs[0] / 2
    return None


def tune(name: str, s: dict, data: dict, progress: Callable[[str], None]) -> tuple[float, dict[float, float], bool]:
    """(best lr, loss per lr tried, bracketed?) of ``name`` at T on the tuning seed; non-finite runs count as inf."""
    losses: dict[float, float] = {}
    pending, extensions = list(s["lr_grid"]), s["max_extensions"]
    while pending:
        for lr in pending:
            try:
                losses[lr] = train_run(name, lr, s["steps"], s["tune_seed"], data, s, progress, probe=False)["final"]
            except FloatingPointError:
                losses[lr] = math.inf
        nxt = grid_extension(losses, extensions)
        extensions -= 1
        pending = [nxt] if nxt is not None else []
    lrs = sorted(losses)
    best = min(lrs, key=lambda lr: losses[lr])
    return best, losses, lrs[0] < best < lrs[-1]


def steps_to_match(target: float, loss_at_t: float, loss_at_ht: float, horizon: float) -> tuple[float, bool]:
    """Steps AdamW needs to reach ``target`` (AdEMAMix's loss at T), as a multiple r of T, and whether r was clipped.

    Model: AdamW's final loss is linear in log(run length) through (T, ``loss_at_t``) and (h·T, ``loss_at_ht``):
    r = h^((L(T) − target) / (L(T) − L(hT))), clipped to [1/h, h] (clipped = censored: a bound, not a value).
    When the longer run is not better (L(hT) ≥ L(T)) r is h if the target is below L(T), else 1/h (clipped)."""
    if loss_at_ht >= loss_at_t:
        return (horizon if target < loss_at_t else 1.0 / horizon), True
    r = horizon ** ((loss_at_t - target) / (loss_at_t - loss_at_ht))
    clipped = min(horizon, max(1.0 / horizon, r))
    return clipped, clipped != r


# --------------------------------------------------------------------------------------------------- run
def build_data(s: dict, progress: Callable[[str], None]) -> dict:
    """The block pool (``pool_factor`` × the blocks of the longest run) and the held-out validation, probe and
    control blocks (:func:`token_stream`)."""
    tokenizer = CausalLM(model=yaml.safe_load(CONFIG.read_text())["model"]["init_args"]["model"]).tokenizer
    longest = int(round(s["adamw_horizon"] * s["steps"])) * s["batch_size"]
    progress(f"ademamix: building the block pool ({s['pool_factor'] * longest} blocks of {s['block_size']} tokens)")
    pool, heldout = token_stream(tokenizer, s["pool_factor"] * longest, s["val_blocks"] + 2 * s["batch_size"],
                                 s["block_size"])
    v, b = s["val_blocks"], s["batch_size"]
    return {"pool": pool, "val": heldout[:v], "probe": heldout[v:v + b], "control": heldout[v + b:]}


def run(mode: str, seeds: int | None, out_dir: pathlib.Path, progress: Callable[[str], None],
        overrides: dict | None = None) -> dict:
    """Tune each optimizer on the tuning seed, train both per evaluation seed, return the claims (module docstring);
    ``overrides`` replaces ``MODES[mode]`` entries (tests use tiny settings)."""
    s = mode_settings(MODES, mode, seeds, overrides)
    if s["tune_seed"] < s["seeds"]:
        raise ValueError(f"tune_seed {s['tune_seed']} must not be one of the evaluation seeds 0..{s['seeds'] - 1}")
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    T = s["steps"]
    s["eval_every"] = s["eval_every"] or max(1, T // 20)  # None: 20 evaluations up to T
    long_steps = int(round(s["adamw_horizon"] * T))
    data = build_data(s, progress)

    lrs, grid, bracketed = {}, {}, {}
    for name in OPTIMIZERS:
        lrs[name], grid[name], bracketed[name] = tune(name, s, data, progress)
    progress(f"ademamix: learning rates {lrs} (bracketed: {bracketed})")

    runs = {name: [] for name in OPTIMIZERS}
    long_runs = []
    for seed in range(s["seeds"]):
        for name in OPTIMIZERS:
            runs[name].append(train_run(name, lrs[name], T, seed, data, s, progress))
        long_runs.append(train_run("adamw", lrs["adamw"], long_steps, seed, data, s, progress, probe=False))

    final = {name: [r["final"] for r in runs[name]] for name in OPTIMIZERS}
    match = [steps_to_match(e, a, long["final"], s["adamw_horizon"])
             for e, a, long in zip(final["ademamix"], final["adamw"], long_runs)]
    retained = {name: [r["forgetting"][-1][2] - r["forgetting"][-1][1] for r in runs[name]] for name in OPTIMIZERS}
    h = s["adamw_horizon"]
    claims = [
        claim("AdEMAMix reaches a lower validation loss than AdamW at equal steps",
              f"validation loss at {T} steps (mean of the last {s['eval_last']} evaluations)",
              final["ademamix"], final["adamw"], "AdamW", higher_is_better=False),
        claim("AdamW needs more steps to reach AdEMAMix's loss (the paper's token-efficiency measure)",
              f"steps AdamW needs / {T} (log-linear between AdamW runs of {T} and {long_steps} steps, "
              f"clipped to [{1 / h:g}, {h:g}])", [r for r, _ in match], [1.0] * len(match), "equal steps",
              higher_is_better=True),
        claim("AdEMAMix forgets a batch seen once more slowly (forgetting probe)",
              f"loss(control) − loss(probe batch) at step {T}, probe seen once at step {T // 2}",
              retained["ademamix"], retained["adamw"], "AdamW", higher_is_better=True),
    ]
    figures = [draw(runs, long_runs, T, out_dir)]
    s.update(design=DESIGN, lr=lrs, lr_bracketed=bracketed,
             lr_grid_losses={n: {f"{lr:g}": v for lr, v in sorted(grid[n].items())} for n in OPTIMIZERS},
             beta3=beta3_for(T), alpha=5.0, t_alpha=T, t_beta3=T, adamw_betas=[0.9, 0.999],
             schedule=f"linear warm-up over {s['warmup_frac']:.0%} of each run, cosine to {s['final_lr_frac']:g} x "
                      "peak at its end", weight_decay=0.1, grad_clip=1.0,
             config=str(CONFIG.relative_to(CONFIG.parents[2])), tokens_per_step=s["batch_size"] * s["block_size"],
             data="pydoc_data.topics and CPython stdlib sources, split by document (every 20th held out), packed; "
                  f"a pool of {len(data['pool'])} blocks, each seed reads its own random order of it once",
             spread="sample std over seeds of the paired difference ours - baseline (None for one seed)",
             per_seed={"final_loss": final, "adamw_final_loss_long": [r["final"] for r in long_runs],
                       "steps_ratio": [r for r, _ in match], "steps_ratio_clipped": [c for _, c in match],
                       "retained": retained})
    measurements = {"runs": {n: [{k: r[k] for k in ("curve", "forgetting")} for r in runs[n]] for n in OPTIMIZERS},
                    "adamw_long_runs": [r["curve"] for r in long_runs]}
    return {"claims": claims, "figures": figures, "settings": s, "measurements": measurements}


def draw(runs: dict, long_runs: list[dict], T: int, out_dir: pathlib.Path) -> str:
    """Validation loss vs step (both optimizers, every seed; AdamW's longer runs dashed) and the forgetting probe;
    returns the PNG's name."""
    fig = Figure(figsize=(10, 3.6), dpi=72)
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.14, top=0.9, wspace=0.25)
    left, right = fig.subplots(1, 2)
    for ci, name in enumerate(OPTIMIZERS):
        for i, r in enumerate(runs[name]):
            steps, losses = zip(*r["curve"])
            left.plot(steps, losses, color=f"C{ci}", alpha=0.8, label=name if i == 0 else None)
            fsteps, probe, control = zip(*r["forgetting"])
            right.plot(fsteps, [c - p for p, c in zip(probe, control)], color=f"C{ci}", label=name if i == 0 else None)
    for i, r in enumerate(long_runs):
        steps, losses = zip(*r["curve"])
        left.plot(steps, losses, color="C1", linestyle="--", alpha=0.6, label="adamw, longer run" if i == 0 else None)
    left.axvline(T, color="gray", linewidth=0.8)
    left.set(xlabel="step", ylabel="validation loss", title="Validation loss (T marked; AdamW's longer runs dashed)")
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
