"""QDPO claim (``litpapers reproduce``): QDPO brings a quantized model closer to its full-precision self than RTN.

Paper claim (Lee et al., ACL 2024, docs/papers.md §4): after weight-only quantization, aligning the quantized model to
the full-precision (FP) model's own answers with DPO (QDPO) reduces token flips and recovers the FP model's
behaviour better than plain round-to-nearest (RTN) post-training quantization. Experiment:
``benchmarks.qdpo_table`` (int4, group 32; the FP model is the built-in ``checkpoints/minillm_teacher``, trained
on first use; pairs FP greedy answer ≻ RTN greedy answer; one epoch of DPO through fake quantization), evaluated on
held-out built-in prompts by ``callbacks.evaluate_against_full_precision``: token-flip rate against the FP answers,
the FP model's per-token log-likelihood of the quantized model's answers, and the task checker's score. Its pairs
and reference cache lives in this report's folder (a new report never reuses pairs built by older code). Each seed
draws other pair prompts and trains its own QDPO model: 3 seeds in quick (~35 CPU s once the FP model exists), 5 in
full. The evaluation results of every seed are also written as TensorBoard runs (``tb/qdpo_table/seed<i>``).

Quantizer grid (issue 25): does QDPO still help once a stronger post-training quantizer has closed part of the gap,
and more where RTN collapses (low bits)? For each quantizer × bits cell of :data:`GRID` (group 32), the same
experiment with that quantizer's PTQ model as the baseline and as QDPO's start (``lm/quantization.py``: ``rtn``
and ``awq`` (after folding its scales) train with RTN's scales recomputed from the latent weights, ``hqq``/``gptq`` on
the PTQ grid kept fixed;
GPTQ/AWQ calibrated on built-in training-side prompts, never the evaluated ones): one token-flip claim per cell,
QDPO vs that PTQ model alone, paired by seed, and the cell's FP / PTQ / QDPO per-seed values of :data:`GRID_METRICS`
(with Rouge-L to the FP answers and the perplexity of held-out built-in task text) in ``settings.quantizer_grid``.
The RTN int4 cell is the main experiment's first seeds. ``python -m benchmarks.claim_qdpo --update-docs RESULTS_JSON``
writes the grid's table and per-cell answer into docs/qdpo.md (:func:`quantizer_table`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
from pathlib import Path

from benchmarks.claim_common import log_scalars, paired_spread

# eval prompts are drawn, deduplicated and stripped of training prompts (300 drawn left 98): draw 1000. A seed costs
# ~10 s CPU on the built-in setup, so quick runs 3 (the verdicts need the spread over seeds)
SETTINGS = {"quick": {"seeds": 3, "num_prompts": 1500, "eval_prompts": 1000},
            "full": {"seeds": 5, "num_prompts": 1500, "eval_prompts": 1000}}
METRICS = (("flip_rate", "token-flip rate vs the FP model's answers", False),
           ("fp_loglik", "FP model's mean log-likelihood per token of the answers", True),
           ("check_score", "valid-answer rate (task checker)", True))
#: the grid's measures: the claims' metrics, Rouge-L to the FP answers, and perplexity on held-out text (built-in task
#: examples here; CPython's documentation on SmolLM2: callbacks.quantization_eval.heldout_text)
GRID_METRICS = (*METRICS, ("rouge_l", "Rouge-L F1 of the answers vs the FP model's answers", True),
                ("perplexity", "perplexity of held-out text", False))


#: quantizer × bits cells (PTQ alone vs PTQ + QDPO vs FP), seeds per cell. No 8-bit cells: on the built-in setup
#: RTN int8's greedy answers equal the FP model's on all 577 distinct pair prompts of seed 0 (measured), so QDPO has
#: no pair to train on.
GRID = {"quick": {"quantizers": ("rtn", "gptq"), "bits": (4, 3), "seeds": 2},
        "full": {"quantizers": ("rtn", "hqq", "gptq", "awq"), "bits": (2, 3, 4), "seeds": 3}}

DESIGN = ("int4 g32 round-to-nearest vs QDPO (DPO on FP-greedy ≻ RTN-greedy pairs through fake quantization, one "
          "epoch) from the same RTN start, per seed other pair prompts; both scored against the FP model's own "
          "answers on held-out prompts")


def draw(per_metric: dict[str, dict[str, list[float]]], out_dir: Path) -> str:
    """Per metric, FP / RTN / QDPO with each seed's three values joined (paired by seed); returns the PNG's name."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 3.4), dpi=72)
    fig.subplots_adjust(left=0.06, right=0.99, bottom=0.12, top=0.86, wspace=0.3)
    for ax, (key, metric, higher) in zip(fig.subplots(1, len(METRICS)), METRICS):
        values = per_metric[key]
        for seed in range(len(values["fp"])):
            ax.plot([0, 1, 2], [values[n][seed] for n in ("fp", "rtn", "qdpo")], color="gray", alpha=0.5, marker="o")
        ax.plot([0, 1, 2], [statistics.mean(values[n]) for n in ("fp", "rtn", "qdpo")], color="C0", linewidth=2.5,
                marker="s", label="mean over seeds")
        ax.set_xticks([0, 1, 2], ["FP", "RTN int4", "QDPO int4"])
        ax.set_title(f"{metric} ({'higher' if higher else 'lower'} is better)", fontsize=9)
    fig.axes[0].legend(fontsize=8)
    name = "qdpo_vs_rtn.png"
    fig.savefig(out_dir / name, dpi=90)
    return name


def run(mode: str, seeds: int | None, out_dir: Path, progress) -> dict:
    from benchmarks import qdpo_table

    s = SETTINGS[mode]
    n_seeds = seeds or s["seeds"]
    argv = ["--num-prompts", str(s["num_prompts"]), "--eval-prompts", str(s["eval_prompts"]),
            "--seeds", *map(str, range(n_seeds)), "--cache", str(out_dir / "cache")]
    progress(f"benchmarks.qdpo_table {' '.join(argv)} (FP model trained first if missing, ~3 min)", 0.0)
    with open(out_dir / "qdpo_table.log", "w") as log, contextlib.redirect_stdout(log):
        table = qdpo_table.main(argv)
    if "skipped" in table:
        raise RuntimeError(f"qdpo_table skipped: {table['skipped']}")
    runs = table["runs"]
    for r in runs:  # one TensorBoard run per seed: every model's held-out metrics and the stage timings
        log_scalars(out_dir / "tb", "qdpo_table", f"seed{r['seed']}",
                    {f"eval/{name}/{key}": r["results"][name][key] for name in ("fp", "rtn", "qdpo")
                     for key, _, _ in METRICS} | {"pairs_kept": r["pairs_kept"], "final_train_loss":
                                                  r["final_train_loss"]}
                    | {f"time/{k}": v for k, v in r["timings_s"].items()})
    claims, per_metric = [], {}
    for key, metric, higher in METRICS:
        per_seed = per_metric[key] = {name: [r["results"][name][key] for r in runs] for name in ("fp", "rtn", "qdpo")}
        ours, rtn = statistics.mean(per_seed["qdpo"]), statistics.mean(per_seed["rtn"])
        spread = paired_spread(per_seed["qdpo"], per_seed["rtn"])
        claims.append({"claim": f"QDPO closer to full precision than RTN (FP: {statistics.mean(per_seed['fp']):.4g})",
                       "metric": metric, "ours": ours, "baseline": rtn, "baseline_name": "RTN int4 g32",
                       "higher_is_better": higher, "spread": spread})
    grid = quantizer_grid(mode, runs, s, out_dir, progress)
    for cell, g in grid.items():
        if cell != "rtn-int4":  # that cell's claim is the main one above
            claims.append({"claim": f"QDPO closer to full precision than {cell} g32 PTQ alone "
                                    f"(FP: {statistics.mean(g['fp']['flip_rate']):.4g})",
                           "metric": METRICS[0][1], "ours": statistics.mean(g["qdpo"]["flip_rate"]),
                           "baseline": statistics.mean(g["ptq"]["flip_rate"]), "baseline_name": f"{cell} g32 PTQ",
                           "higher_is_better": False, "spread": paired_spread(g["qdpo"]["flip_rate"],
                                                                               g["ptq"]["flip_rate"])})
    return {"claims": claims, "figures": [draw(per_metric, out_dir)],
            "settings": {**s, "design": DESIGN, "seeds": n_seeds, "per_seed": per_metric, "argv": argv, "qdpo_table_settings": table["settings"],
                         "median": table["median"], "recovered": table["recovered"],
                         "pairs_kept": [r["pairs_kept"] for r in runs],
                         "eval_prompts_used": [r["eval_prompts"] for r in runs],
                         "timings_s": table["median_timings_s"], "fp_sft_s": table["fp_sft_s"],
                         "quantizer_grid": {"cells": GRID[mode], "per_seed": grid}}}


def quantizer_grid(mode: str, main_runs: list[dict], s: dict, out_dir: Path, progress) -> dict[str, dict]:
    """Per cell ``"<quantizer>-int<bits>"``: {"fp"|"ptq"|"qdpo": {metric: per-seed values}} (module docstring)."""
    from benchmarks import qdpo_table

    g = GRID[mode]
    cells = {}
    for quantizer in g["quantizers"]:
        for bits in g["bits"]:
            cell = f"{quantizer}-int{bits}"
            if (quantizer, bits) == ("rtn", 4) and len(main_runs) >= g["seeds"]:
                runs = main_runs[:g["seeds"]]
            else:
                argv = ["--quantizer", quantizer, "--bits", str(bits), "--num-prompts", str(s["num_prompts"]),
                        "--eval-prompts", str(s["eval_prompts"]), "--seeds", *map(str, range(g["seeds"])),
                        "--cache", str(out_dir / "cache")]
                progress(f"benchmarks.qdpo_table {' '.join(argv)}", None)
                with open(out_dir / f"qdpo_table_{cell}.log", "w") as log, contextlib.redirect_stdout(log):
                    runs = qdpo_table.main(argv)["runs"]
            cells[cell] = per_seed_cell(runs)
    return cells


def per_seed_cell(runs: list[dict]) -> dict[str, dict[str, list]]:
    """{"fp"|"ptq"|"qdpo": {metric of :data:`GRID_METRICS`: per-seed values}} of one cell's ``qdpo_table`` runs
    (its PTQ model is reported under the key ``rtn`` whatever the quantizer)."""
    return {name: {key: [r["results"][src][key] for r in runs] for key, _, _ in GRID_METRICS}
            for name, src in (("fp", "fp"), ("ptq", "rtn"), ("qdpo", "qdpo"))}


# ------------------------------------------------------------------------------ docs/qdpo.md's quantizer table
DOC_BEGIN, DOC_END = "<!-- qdpo quantizer grid: begin (generated) -->", "<!-- qdpo quantizer grid: end -->"


def grid_rows(result: dict) -> list[dict]:
    """One row per quantizer × bits cell of a result with ``settings.quantizer_grid.per_seed`` (``results.json``'s
    ``papers.qdpo``, or the SmolLM2 record ``real_qdpo.json``): per-seed means of every metric for FP, PTQ and
    PTQ + QDPO (``None`` where a metric has no value, e.g. the checker on free-form prompts), and the token-flip claim
    QDPO vs PTQ by the report's rule — d = mean(PTQ − QDPO) flip rate (lower is better), s =
    :func:`~benchmarks.claim_common.paired_spread`, verdict :func:`benchmarks.reproduce.verdict`."""
    from benchmarks.reproduce import verdict

    mean = lambda v: None if not v or None in v else statistics.mean(v)  # noqa: E731
    rows = []
    for cell, g in result["settings"]["quantizer_grid"]["per_seed"].items():
        quantizer, bits = cell.rsplit("-int", 1)
        means = {name: {key: mean(g[name].get(key)) for key, _, _ in GRID_METRICS} for name in ("fp", "ptq", "qdpo")}
        ours, ptq = g["qdpo"]["flip_rate"], g["ptq"]["flip_rate"]
        spread = paired_spread(ours, ptq)
        rows.append({"quantizer": quantizer, "bits": int(bits), "seeds": len(ours), **means,
                     "d": statistics.mean(ptq) - statistics.mean(ours), "spread": spread,
                     "verdict": verdict(statistics.mean(ours), statistics.mean(ptq), False, spread)})
    return rows


def quantizer_table(result: dict, source: str, text: str = "built-in task examples") -> str:
    """A generated block of docs/qdpo.md from a result with a quantizer grid: the table of :func:`grid_rows` and the
    answer per cell, ``source`` naming the results file it came from, ``text`` the perplexity's held-out text."""
    fmt = lambda v, f=".4f": "–" if v is None else format(v, f)  # noqa: E731
    pair = lambda r, key, f=".4f": f"{fmt(r['ptq'][key], f)} → {fmt(r['qdpo'][key], f)}"  # noqa: E731
    rows = grid_rows(result)
    lines = [f"Generated from `{source}` by `python -m benchmarks.claim_qdpo --update-docs {source}`. Token-flip rate "
             "vs the FP model's greedy answers on held-out prompts (lower is better; FP's own is 0); d = PTQ − "
             "(PTQ + QDPO), s = standard deviation over seeds of the paired difference; verdict: reproduced if "
             "d > 2s, not reproduced if d < −2s, else inconclusive (the report's rule). Group size 32, `lm_head` in "
             "full precision. FP log-lik = the FP model's mean per-token log-likelihood of the answers; Rouge-L = F1 "
             "of the answers vs FP's; check = valid-answer rate of the task checker (– without one); ppl = "
             f"perplexity of held-out text ({text}), FP's in its own column.", "",
             "| quantizer | bits | seeds | flip PTQ → +QDPO | d ± s | verdict | FP log-lik PTQ → +QDPO "
             "| Rouge-L PTQ → +QDPO | check PTQ → +QDPO | ppl FP | ppl PTQ → +QDPO |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['quantizer']} | {r['bits']} | {r['seeds']} | {pair(r, 'flip_rate')} | {fmt(r['d'])} ± "
                     f"{fmt(r['spread'])} | {r['verdict']} | {pair(r, 'fp_loglik')} | {pair(r, 'rouge_l', '.3f')} | "
                     f"{pair(r, 'check_score', '.3f')} | {fmt(r['fp']['perplexity'], '.3f')} | "
                     f"{pair(r, 'perplexity', '.3f')} |")
    lines.append("")
    for label in ("reproduced", "not reproduced", "inconclusive"):
        cells = [f"{r['quantizer']} int{r['bits']}" for r in rows if r["verdict"] == label]
        lines.append(f"- QDPO's gain over its PTQ start (token flips) **{label}**: {', '.join(cells) or 'none'}.")
    return "\n".join(lines)


REAL_BEGIN, REAL_END = "<!-- qdpo quantizer grid smollm2: begin (generated) -->", "<!-- qdpo quantizer grid smollm2: end -->"


def update_docs(results_json: Path, doc: Path) -> None:
    """Rewrite a generated quantizer block of ``doc``: from a report's ``results.json`` (its qdpo entry: the
    built-in grid), or from the SmolLM2 record ``real_qdpo.json`` (:mod:`benchmarks.claim_real`: its own block)."""
    from benchmarks.claim_common import fill_block

    data = json.loads(Path(results_json).read_text())
    source = Path(results_json).as_posix()
    if "papers" in data:
        fill_block(Path(doc), DOC_BEGIN, DOC_END, quantizer_table(data["papers"]["qdpo"], source))
    else:
        fill_block(Path(doc), REAL_BEGIN, REAL_END,
                   quantizer_table(data, source, "CPython's documentation, 32 blocks of 128 tokens"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="write docs/qdpo.md's quantizer tables from committed results")
    parser.add_argument("--update-docs", type=Path, required=True, metavar="RESULTS_JSON",
                        help="a report's results.json (built-in grid) or docs/results/real_qdpo.json (SmolLM2 grid)")
    parser.add_argument("--doc", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "qdpo.md")
    args = parser.parse_args(argv)
    update_docs(args.update_docs, args.doc)


if __name__ == "__main__":
    main()
