"""Per-rank memory of FSDP2 sharding (lit_modules.sharding) for a ~110M-parameter Llama on N CPU processes (gloo).

Trains CausalLM and DPO (policy + frozen reference, both sharded) for 2 steps under ``FSDP2Strategy`` and
records, on every rank at the second optimizer step (gradients and AdamW state present), the bytes of the local
shards of trainable parameters, gradients, optimizer state and frozen parameters, next to the whole model's
bytes (what one unsharded process holds), and the rank's peak resident memory. Writes JSON (rank 0).

    OMP_NUM_THREADS=1 python benchmarks/sharding_memory.py --out docs/results/sharding_memory.json
    python benchmarks/sharding_memory.py --render-docs docs/sharding.md     # the table in docs/sharding.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import resource
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning as L  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from lit_modules import DPO, CausalLM  # noqa: E402
from lit_modules.sharding import FSDP2Strategy, memory_per_rank  # noqa: E402

LLAMA_110M = {"model_type": "llama", "hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 12,
              "num_attention_heads": 12, "num_key_value_heads": 12, "vocab_size": 16384,
              "max_position_embeddings": 512, "tie_word_embeddings": False}


def whole_bytes(module, optimizer) -> dict[str, int]:
    """Bytes of the unsharded tensors (a DTensor's numel is the global one): params, grads, AdamW's 2 moments."""
    params = list(module.parameters())
    trainable = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
    frozen = sum(p.numel() * p.element_size() for p in params if not p.requires_grad)
    moments = sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
                  if isinstance(v, torch.Tensor) and v.ndim > 0)
    return {"trainable_params": trainable, "grads": trainable, "frozen_params": frozen, "optimizer_state": moments}


class Measure(L.Callback):
    def __init__(self):
        self.result = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == 1:
            local = memory_per_rank(pl_module, optimizer)
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            per_rank = [None] * dist.get_world_size()
            dist.all_gather_object(per_rank, {"local_bytes": local, "peak_rss_bytes": rss})
            self.result = {"per_rank": per_rank, "whole_bytes": whole_bytes(pl_module, optimizer)}


def batches(kind: str, seq: int):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 259, (8, seq), generator=g)
    if kind == "causal_lm":
        return DataLoader([{"input_ids": r} for r in ids], batch_size=1)
    resp = torch.ones_like(ids[:2])
    resp[:, : seq // 2] = 0

    def collate(items):
        return {"input_ids": torch.stack(items), "attention_mask": torch.ones(2, seq, dtype=torch.long),
                "response_mask": resp}

    return DataLoader(list(ids), batch_size=2, collate_fn=collate)


BEGIN, END = "<!-- sharding_memory: begin (generated) -->", "<!-- sharding_memory: end -->"
ROWS = (("trainable_params", "trainable parameters"), ("grads", "gradients"), ("optimizer_state", "AdamW state"),
        ("frozen_params", "frozen reference (sharded)"))


def render_table(report: dict) -> str:
    """Markdown table of the JSON report: per module and tensor kind, whole MiB, each rank's local MiB, share."""
    n = report["settings"]["processes"]
    lines = [f"| module | tensors | whole (MiB) | {' | '.join(f'rank {r} (MiB)' for r in range(n))} | rank 0 share |",
             "|" + "---|" * (4 + n)]
    for kind, r in report["results"].items():
        for key, label in ROWS:
            whole = r["whole_bytes"][key]
            if not whole:
                continue
            local = [p["local_bytes"][key] / 2**20 for p in r["per_rank"]]
            lines.append(f"| {kind} | {label} | {whole / 2**20:.1f} | {' | '.join(f'{x:.1f}' for x in local)} | "
                         f"{r['per_rank'][0]['local_bytes'][key] / whole:.3f} |")
        rss = ", ".join(f"{p['peak_rss_bytes'] / 2**30:.2f}" for p in r["per_rank"])
        lines.append(f"| {kind} | peak RSS per rank (GiB) | | {rss} | |".replace(", ", " | ", n - 1))
    return "\n".join(lines)


def render_docs(report: dict, doc: Path) -> None:
    """Replace the generated block of ``doc`` with :func:`render_table` of ``report``."""
    text = doc.read_text()
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    doc.write_text(f"{head}{BEGIN}\n{render_table(report)}\n{END}{tail}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="docs/results/sharding_memory.json")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--render-docs", metavar="MD", help="only rewrite MD's generated table from --out, then exit")
    args = parser.parse_args()
    if args.render_docs:
        render_docs(json.loads(Path(args.out).read_text()), Path(args.render_docs))
        return
    torch.set_num_threads(1)
    results = {}
    for kind in ("causal_lm", "dpo"):
        L.seed_everything(0, verbose=False)
        module = CausalLM(model=LLAMA_110M) if kind == "causal_lm" else DPO(model=LLAMA_110M)
        measure = Measure()
        trainer = L.Trainer(accelerator="cpu", devices=args.devices, strategy=FSDP2Strategy(), max_steps=2,
                            logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, callbacks=[measure])
        trainer.fit(module, batches(kind, args.seq))
        r = measure.result
        r["parameters"] = {"trainable": r["whole_bytes"]["trainable_params"] // 4,
                           "frozen": r["whole_bytes"]["frozen_params"] // 4}
        r["rank0_fraction_of_whole"] = {k: (r["per_rank"][0]["local_bytes"][k] / v if v else None)
                                        for k, v in r["whole_bytes"].items()}
        results[kind] = r
    if trainer.is_global_zero:
        report = {"command": "OMP_NUM_THREADS=1 python " + " ".join(sys.argv),
                  "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "machine": f"2-core CPU shared with other jobs ({platform.processor() or platform.machine()}), "
                             f"torch {torch.__version__}, lightning {L.__version__}, gloo",
                  "settings": {"model": LLAMA_110M, "processes": args.devices, "strategy": "FSDP2Strategy (fp32)",
                               "steps": 2, "seq_len": args.seq, "optimizer": "AdamW",
                               "measured_at": "second optimizer step, before it runs (grads and AdamW state present)"},
                  "results": results}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps({k: v["rank0_fraction_of_whole"] for k, v in results.items()}, indent=1))


if __name__ == "__main__":
    main()
