"""Claim test of "Transformers need glasses!" (Barbero et al., NeurIPS 2024; docs/papers.md, over-squashing) for
``litpapers reproduce``: representational collapse vs length (fp32, bf16 with its rounding noise floor, commas) and
the sensitivity profile, on a tiny Llama trained on the built-in sequence tasks.

    python -m benchmarks.claim_oversquashing [--full] [--seeds N] [--steps N] [--out DIR]

Settings (:data:`MODES`): quick 3 seeds × 300 training steps (~15 CPU s per seed); full 5 seeds × 1000 steps and a
third sensitivity length (~5 min of one core).

Model and data: ``configs/probes/tasks_quick.yaml`` (byte-level Llama, hidden 64, 2 layers, copy/count/sum/
find-odd tasks of 1-16 digits), trained ``steps`` steps per seed (init and data order seeded). Probes: the
library's :class:`callbacks.RepresentationalCollapseProbe` (prefix ``"count:"``; families ones / digits /
ones_commas; fp32, bf16 autocast, bf16 weights; noise floors against a float64 copy) and
:class:`callbacks.OverSquashingProbe` (prefix ``"odd:"``, exact Jacobian norms). Claims (per-seed values, paired):

1. Thm 4.2: ‖Δ‖∞ between [x, a] and [x, a, a] shrinks with n (fp32, ones): Δ at the longest vs the shortest length.
2. §4.2: in bf16 (weights, as served) the longest pair collapses: Δ at or below bf16's rounding noise floor.
3. §4.3: commas every third digit keep Δ larger than plain ones (fp32, longest length).
4. Thm 5.1: the last token is more sensitive to the first tokens (positions ≤ 10%) than to the middle (40-60%);
   the baseline is a flat profile (ratio 1).
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable

import lightning as L
import yaml

from benchmarks.claim_common import claim, claim_parser, mode_settings, run_and_record
from callbacks import OverSquashingProbe, RepresentationalCollapseProbe
from callbacks.oversquashing import FAMILIES, eval_mode
from datamodules import SequenceTasksDataModule
from lit_modules import CausalLM

CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "probes" / "tasks_quick.yaml"
PRECISIONS = ["fp32", "bf16", "bf16_weights"]
MODES = {
    "quick": dict(steps=300, seeds=3, lengths=[8, 16, 32, 64, 128, 256, 512, 1024], sensitivity_lengths=[32, 64],
                  sensitivity_samples=2),
    "full": dict(steps=1000, seeds=5, lengths=[8, 16, 32, 64, 128, 256, 512, 1024],
                 sensitivity_lengths=[32, 64, 128], sensitivity_samples=4),
}


def train_model(steps: int, seed: int) -> CausalLM:
    """The config's CausalLM trained ``steps`` steps on its SequenceTasksDataModule (no logger, no validation)."""
    config = yaml.safe_load(CONFIG.read_text())
    model_args = dict(config["model"]["init_args"], export_dir=None, init_seed=seed)
    data_args = dict(config["data"]["init_args"], seed=seed, num_train=max(64, steps * 32))
    L.seed_everything(seed, workers=True, verbose=False)
    module, data = CausalLM(**model_args), SequenceTasksDataModule(**data_args)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        gradient_clip_val=config["trainer"]["gradient_clip_val"])
    trainer.fit(module, data)
    return module


def probe_claims(values: dict[str, list[float]], short: int, long: int, seeds: int) -> list[dict]:
    """The paper's four probe claims from the per-seed ``values`` (``delta_ones_fp32_long``/``_short``,
    ``delta_ones_bf16w_long``, ``noise_ones_bf16w_long``, ``delta_commas_fp32_long``, ``start_over_middle``) at the
    shortest and longest lengths; also the real model's (``benchmarks.claim_real.probes``)."""
    return [
        claim("Last-token states of [x, a] and [x, a, a] converge as the sequence grows (Thm 4.2)",
              f"‖Δ‖∞ final layer, fp32, ones, n={long}", values["delta_ones_fp32_long"],
              values["delta_ones_fp32_short"], f"same at n={short}", higher_is_better=False),
        claim("In bf16 the long pair collapses: Δ falls to the rounding noise floor (§4.2)",
              f"‖Δ‖∞ final layer, bf16 weights, ones, n={long}", values["delta_ones_bf16w_long"],
              values["noise_ones_bf16w_long"], "bf16 noise floor ε_a + ε_b (vs a float64 copy)",
              higher_is_better=False),
        claim("Commas every third digit keep the representations apart (§4.3)",
              f"‖Δ‖∞ final layer, fp32, ones with commas, n={long}", values["delta_commas_fp32_long"],
              values["delta_ones_fp32_long"], "plain ones", higher_is_better=True),
        claim("The last token is more sensitive to the first tokens than to the middle ones (Thm 5.1)",
              "sensitivity start/middle (positions ≤ 10% vs 40-60%, profiles normalised to mean 1)",
              values["start_over_middle"], [1.0] * seeds, "flat profile", higher_is_better=True),
    ]


def run(mode: str, seeds: int | None, out_dir: pathlib.Path, progress: Callable[[str], None],
        overrides: dict | None = None) -> dict:
    """Train, probe and return the claims (see the module docstring); ``overrides`` replaces ``MODES[mode]``
    entries (tests use tiny settings)."""
    settings = mode_settings(MODES, mode, seeds, overrides)
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lengths = sorted(settings["lengths"])
    short, long = lengths[0], lengths[-1]
    values: dict[str, list[float]] = {}
    curves, figures = [], []
    for seed in range(settings["seeds"]):
        progress(f"oversquashing: seed {seed + 1}/{settings['seeds']}: training {settings['steps']} steps")
        module = train_model(settings["steps"], seed)
        lm, tokenizer = module.model, module.tokenizer
        progress(f"oversquashing: seed {seed + 1}/{settings['seeds']}: collapse and sensitivity probes")
        collapse = RepresentationalCollapseProbe(lengths=lengths, families=FAMILIES, precisions=PRECISIONS,
                                                 prefix="count:", seed=seed)
        sensitivity = OverSquashingProbe(lengths=settings["sensitivity_lengths"], prefix="odd:",
                                         num_samples=settings["sensitivity_samples"], seed=seed)
        with eval_mode(lm):
            collapsed = collapse.measure(lm, tokenizer)
            profile = sensitivity.measure(lm, tokenizer)
        ratios = sensitivity.scalars(profile)
        final = {key: {k: (v[-1] if isinstance(v, list) else v) for k, v in r.items()} for key, r in collapsed.items()}
        for name, value in {
            "delta_ones_fp32_long": final["ones", "fp32", long]["delta"],
            "delta_ones_fp32_short": final["ones", "fp32", short]["delta"],
            "delta_ones_bf16w_long": final["ones", "bf16_weights", long]["delta"],
            "noise_ones_bf16w_long": final["ones", "bf16_weights", long]["noise"],
            "delta_commas_fp32_long": final["ones_commas", "fp32", long]["delta"],
            "start_over_middle": ratios["probes/sensitivity/start_over_middle"],
        }.items():
            values.setdefault(name, []).append(value)
        curves.append({"seed": seed, "collapse": {f"{f}/{p}/{n}": r for (f, p, n), r in final.items()},
                       "sensitivity": ratios})
        if seed == 0:
            for probe, results, name in ((collapse, collapsed, "oversquashing_collapse.png"),
                                         (sensitivity, profile, "oversquashing_sensitivity.png")):
                probe.figure(results).savefig(out_dir / name, dpi=90)
                figures.append(name)
    claims = probe_claims(values, short, long, settings["seeds"])
    settings.update(config=str(CONFIG.relative_to(CONFIG.parents[2])), precisions=PRECISIONS,
                    collapse_prefix="count:", sensitivity_prefix="odd:", model="tiny Llama trained on the tasks",
                    spread="sample std over seeds of the paired difference ours - baseline (None for one seed)")
    return {"claims": claims, "figures": figures, "settings": settings, "measurements": curves}


def main(argv: list[str] | None = None) -> dict:
    parser = claim_parser(__doc__, "claim_oversquashing")
    parser.add_argument("--steps", type=int, default=None, help="override the training steps (kept in settings)")
    args = parser.parse_args(argv)
    overrides = {"steps": args.steps} if args.steps is not None else None
    return run_and_record(run, args, overrides, "claim_oversquashing", argv)


if __name__ == "__main__":
    main()
