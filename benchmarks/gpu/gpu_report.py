"""The GPU numbers of the README, rendered from the committed JSON of ``benchmarks/gpu/gpu_check.sh``.

    python -m benchmarks.gpu.gpu_report                       # print the table
    python -m benchmarks.gpu.gpu_report --update-readme       # rewrite README.md between the gpu markers

Reads ``docs/results/gpu/gpu_check.json`` (the whole check: CUDA tests, rollout, DPO step, optimizer step) and, when
present, ``docs/results/gpu/dpo_throughput_ours_vs_trl.json`` (the DPO step against TRL with interleaved repeats,
which supersedes the check's single-repeat DPO row). Each row states its target from the GPU-speed issue and
whether the measurement met it; nothing is typed in by hand (a test re-renders the README block from the JSON).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "docs" / "results" / "gpu"
BEGIN, END = "<!-- gpu:begin -->\n", "<!-- gpu:end -->"


def _met(ok: bool) -> str:
    return "met" if ok else "**not met**"


def rows(check: dict, dpo: dict | None) -> list[tuple[str, str, str, str, str]]:
    """(measure, ours, anchor, ratio, target) per GPU target; ``dpo`` overrides the check's DPO row."""
    steps = check["steps"]
    out = []
    roll = steps["minillm_rollout"]["result"]
    tps, ratio = roll["tokens_per_s_median"], roll["ratios"]
    s = roll["settings"]
    size = f"{s['student_params'] / 1e6:.0f}M pair, batch {s['batch']}, {s['new_tokens']} new tokens"
    r = ratio["teacher_mixed_static_vs_generate_plus_teacher_forward"]
    out.append((f"MiniLLM teacher-mixed rollout, tokens/s ({size})", f"{tps['ours_teacher_mixed_static']:,.0f}",
                f"{tps['anchor_generate_plus_teacher_forward']:,.0f} (`generate` + teacher forward)", f"{r:.2f}×",
                f"≥ 3×: {_met(r >= 3)}"))
    r = ratio["student_only_static_vs_generate"]
    out.append(("student-only sampling, tokens/s", f"{tps['ours_student_only_static']:,.0f}",
                f"{tps['anchor_generate']:,.0f} (`generate`)", f"{r:.2f}×", f"≥ 3×: {_met(r >= 3)}"))
    dpo = dpo or steps["dpo_throughput"]["result"]
    med, d = dpo["median"], dpo["settings"]
    model = d["model"]
    what = (f"DPO step, pairs/s ({model['hidden_size']}-d × {model['num_hidden_layers']} "
            f"Llama, {d['precision']}, {d['batch_pairs']} pairs, median of {d['repeats']})")
    if "trl" in med:
        r = med["ours"]["pairs_per_s"] / med["trl"]["pairs_per_s"]
        out.append((what, f"{med['ours']['pairs_per_s']:.0f}", f"{med['trl']['pairs_per_s']:.0f} (TRL `DPOTrainer`)",
                    f"{r:.2f}×", "faster than TRL: " + _met(r > 1)))
    mfu = med["ours"].get("mfu")
    if mfu is not None:
        out.append(("DPO step MFU (6·N·tokens/s ÷ peak bf16)", f"{mfu:.1%}",
                    f"{med['trl']['mfu']:.1%} (TRL)" if "trl" in med else "—", "", f"≥ 40 %: {_met(mfu >= 0.4)}"))
    opt = steps["optimizer_step"]["result"]["results"]
    fused = opt["AdEMAMix(fused=True)"]
    r = fused["ratio_vs_adamw_fused"]
    params = steps["optimizer_step"]["result"]["param_set"]["parameters"]
    out.append((f"AdEMAMix step, ms ({params / 1e6:.0f}M fp32 params)", f"{fused['median_step_ms']:.3f}",
                f"{opt['AdamW(fused=True)']['median_step_ms']:.3f} (`AdamW(fused=True)`)", f"{r:.2f}×",
                f"≤ 1.25×: {_met(r <= 1.25)}"))
    return out


def render(check: dict, dpo: dict | None = None) -> str:
    """The README block: where and how it was measured, then the table."""
    tests = check["steps"]["cuda_tests"]["result"]
    passed = tests["tests"] - tests["failures"] - tests["errors"] - tests["skipped"]
    m = check["machine"]
    lines = [f"Measured on one **{check['device']}** (torch {m['torch']}, transformers {m['transformers']}), "
             f"{check['started'][:10]}, by `bash benchmarks/gpu/gpu_check.sh`"
             + (" and `python -m benchmarks.speed.dpo_throughput --device cuda --repeats 3 --sides ours,trl ...`" if dpo
                else "")
             + f"; CUDA tests {passed}/{tests['tests']} passed. Source: `docs/results/gpu/`.", "",
             "| measure | ours | anchor | ratio | target |", "|---|---|---|---|---|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows(check, dpo)]
    return "\n".join(lines) + "\n"


def load(results: Path = RESULTS) -> tuple[dict, dict | None]:
    check = json.loads((results / "gpu_check.json").read_text())
    dpo_path = results / "dpo_throughput_ours_vs_trl.json"
    return check, (json.loads(dpo_path.read_text()) if dpo_path.exists() else None)


def update_readme(readme: Path, text: str) -> None:
    doc = readme.read_text()
    if BEGIN not in doc or END not in doc:
        raise ValueError(f"{readme}: no '{BEGIN.strip()}' ... '{END}' block to fill")
    head, rest = doc.split(BEGIN, 1)
    readme.write_text(head + BEGIN + text + END + rest.split(END, 1)[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=RESULTS, help="folder with gpu_check.json")
    ap.add_argument("--update-readme", action="store_true", help="rewrite README.md's gpu block")
    args = ap.parse_args()
    text = render(*load(args.results))
    if args.update_readme:
        update_readme(ROOT / "README.md", text)
    print(text, end="")


if __name__ == "__main__":
    main()
