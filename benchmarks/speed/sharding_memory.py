"""Per-rank memory of FSDP2 sharding (lm.sharding) for a ~134M-parameter Llama, sharded over N CPU
processes (gloo) vs one unsharded process.

Runs, each in fresh processes (so each peak resident memory is that run's own):

- ``causal_lm/single``, ``causal_lm/sharded``: CausalLM, one process vs ``FSDP2Strategy`` on N processes;
- ``dpo/single``, ``dpo/sharded``, ``dpo/sharded_whole_reference``: DPO (policy + frozen reference), one process
  vs N processes with the reference sharded (default) or whole on every rank (``shard_frozen=False``).

Each trains 2 steps. At the second optimizer step (gradients and AdamW state present) every rank records the
bytes it holds of trainable parameters, gradients, optimizer state and frozen parameters (a sharded tensor
counts its local shard only); it also records its resident memory just before the module is constructed
(imports done), its peak resident memory up to the start of ``fit`` (the networks built, sharded and
materialised: the start-up) and its peak over the whole run (``ru_maxrss``). Writes JSON.

The resident memory depends on the allocator: with glibc's default, adaptive mmap threshold, the freed FSDP
all-gather buffers of one layer stay resident and are not reused by the next, so a sharded rank's resident
memory grows by about the unsharded model during its first forward. ``--malloc-mmap-threshold 131072`` (the
``MALLOC_MMAP_THRESHOLD_`` environment variable of every run) makes glibc return every freed block of 128 KiB
or more at once, so the resident memory follows the live tensors, as a GPU's caching allocator would reuse them.

    OMP_NUM_THREADS=1 python -m benchmarks.speed.sharding_memory --malloc-mmap-threshold 131072 \
        --out docs/results/sharding_memory.json
    OMP_NUM_THREADS=1 python -m benchmarks.speed.sharding_memory --out docs/results/sharding_memory_glibc_default.json
    python -m benchmarks.speed.sharding_memory --out docs/results/sharding_memory.json --render-docs docs/sharding.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from lit_modules import DPO, CausalLM
from lm.hf import load_causal_lm
from lm.sharding import FSDP2Strategy, memory_per_rank

LLAMA_134M = {"model_type": "llama", "hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 12,
              "num_attention_heads": 12, "num_key_value_heads": 12, "vocab_size": 32000,
              "max_position_embeddings": 512, "tie_word_embeddings": False}
RUNS = ("causal_lm/single", "causal_lm/sharded", "dpo/single", "dpo/sharded", "dpo/sharded_whole_reference")
KEYS = ("trainable_params", "grads", "optimizer_state", "frozen_params")


def rss_bytes(field: str = "VmRSS") -> int:
    """``VmRSS`` (now) or ``VmHWM`` (peak so far) of this process (Linux)."""
    return 1024 * int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


class Measure(L.Callback):
    """Peak resident memory at the start of fit; local bytes at the second optimizer step, before it runs."""

    def __init__(self, rss_before_model: int):
        self.record = {"rss_before_model_bytes": rss_before_model}

    def on_fit_start(self, trainer, pl_module):
        self.record["startup_peak_rss_bytes"] = rss_bytes("VmHWM")

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == 1:
            self.record["local_bytes"] = memory_per_rank(pl_module, optimizer)


def batches(kind: str, seq: int) -> DataLoader:
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


def one_run(run: str, devices: int, seq: int, part: Path) -> None:
    """Train ``run`` for 2 steps (this process, and under sharding the ranks Lightning starts with the same
    command line); rank 0 writes every rank's record to ``part``."""
    torch.set_num_threads(1)
    kind, mode = run.split("/")
    sharded = mode != "single"
    strategy = FSDP2Strategy(shard_frozen=mode != "sharded_whole_reference") if sharded else "auto"
    measure = Measure(rss_bytes())
    L.seed_everything(0, verbose=False)
    module = CausalLM(model=LLAMA_134M) if kind == "causal_lm" else DPO(model=LLAMA_134M)
    trainer = L.Trainer(accelerator="cpu", devices=devices if sharded else 1, strategy=strategy, max_steps=2,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[measure])
    trainer.fit(module, batches(kind, seq))
    measure.record["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    per_rank = [measure.record]
    if sharded:
        per_rank = [None] * dist.get_world_size()
        dist.all_gather_object(per_rank, measure.record)
    if trainer.is_global_zero:
        part.write_text(json.dumps({"per_rank": per_rank}))


def markers(name: str) -> tuple[str, str]:
    """The lines around the generated table of the result file named ``name`` (its stem) in the docs."""
    return f"<!-- {name}: begin (generated) -->", f"<!-- {name}: end -->"


COLUMNS = ("trainable parameters", "gradients", "AdamW state", "frozen reference")


def render_table(report: dict) -> str:
    """Markdown table of the JSON report: one row per run and rank, local MiB of each tensor kind, and GiB of
    resident memory before the model, at its start-up peak and at the run's peak."""
    lines = [f"| run | rank | {' (MiB) | '.join(COLUMNS)} (MiB) | RSS before model (GiB) | peak RSS to fit start "
             "(GiB) | peak RSS (GiB) |", "|" + "---|" * (2 + len(COLUMNS) + 3)]
    for run, r in report["results"].items():
        for rank, p in enumerate(r["per_rank"]):
            mib = " | ".join(f"{p['local_bytes'][k] / 2**20:.1f}" for k in KEYS)
            gib = " | ".join(f"{p[k] / 2**30:.2f}" for k in ("rss_before_model_bytes", "startup_peak_rss_bytes",
                                                              "peak_rss_bytes"))
            lines.append(f"| {run} | {rank} | {mib} | {gib} |")
    return "\n".join(lines)


def render_docs(report: dict, name: str, doc: Path) -> None:
    """Replace the generated block ``name`` of ``doc`` with :func:`render_table` of ``report``."""
    begin, end = markers(name)
    text = doc.read_text()
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    doc.write_text(f"{head}{begin}\n{render_table(report)}\n{end}{tail}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="docs/results/sharding_memory.json")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=RUNS)
    parser.add_argument("--code", default="this checkout", help="which code was measured (recorded in the JSON)")
    parser.add_argument("--malloc-mmap-threshold", type=int, help="MALLOC_MMAP_THRESHOLD_ of every run (bytes)")
    parser.add_argument("--render-docs", metavar="MD", help="only rewrite MD's generated table from --out, then exit")
    parser.add_argument("--run", choices=RUNS, help=argparse.SUPPRESS)  # internal: one run, in this process
    parser.add_argument("--part", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.render_docs:
        render_docs(json.loads(Path(args.out).read_text()), Path(args.out).stem, Path(args.render_docs))
        return
    if args.run:
        one_run(args.run, args.devices, args.seq, Path(args.part))
        return
    results = {}
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    if args.malloc_mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
    with tempfile.TemporaryDirectory() as tmp:
        for run in args.runs:
            part = Path(tmp) / f"{run.replace('/', '_')}.json"
            subprocess.run([sys.executable, "-m", __spec__.name, "--run", run, "--part", str(part), "--devices",
                            str(args.devices), "--seq", str(args.seq)], check=True, env=env)
            results[run] = json.loads(part.read_text())
            print(run, json.dumps(results[run]), flush=True)
    for kind in ("causal_lm", "dpo"):  # each sharded rank's share of the single process's bytes
        single = results.get(f"{kind}/single")
        for run in (r for r in results if r.startswith(kind + "/sharded") and single):
            whole = single["per_rank"][0]["local_bytes"]
            results[run]["share_of_single"] = [{k: (p["local_bytes"][k] / whole[k] if whole[k] else None)
                                                for k in KEYS} for p in results[run]["per_rank"]]
    with torch.device("meta"):
        n_params = sum(p.numel() for p in load_causal_lm(LLAMA_134M).parameters())
    report = {"command": f"OMP_NUM_THREADS=1 nice -n 10 python -m {__spec__.name} " + " ".join(sys.argv[1:]),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": f"2-core CPU shared with other jobs ({platform.processor() or platform.machine()}), "
                         f"torch {torch.__version__}, lightning {L.__version__}, gloo",
              "settings": {"code": args.code, "model": LLAMA_134M, "parameters_per_model": n_params,
                           "processes": args.devices,
                           "strategy": "FSDP2Strategy (fp32)", "steps": 2, "seq_len": args.seq,
                           "batch_per_rank": {"causal_lm": "1 sequence", "dpo": "1 pair (2 sequences)"},
                           "optimizer": "AdamW", "malloc_mmap_threshold": args.malloc_mmap_threshold
                           or "glibc default (adaptive)",
                           "measured_at": "local bytes: second optimizer step, before it runs (grads and AdamW "
                                          "state present); RSS: before the module is constructed, peak up to "
                                          "on_fit_start, peak over the process (ru_maxrss)"},
              "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
