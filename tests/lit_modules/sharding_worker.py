"""Runs of the LLM modules for tests/lit_modules/test_sharding.py: the same few steps on one process
(called in the test process) or on 2 gloo processes under ``FSDP2Strategy`` (this file run as a script, one
process per rank, by :func:`launch`).

    python tests/lit_modules/sharding_worker.py OUT_DIR SCENARIO...   (env: LOCAL_RANK, WORLD_SIZE, MASTER_PORT)
"""

from __future__ import annotations

import gc
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from lit_modules import DPO, QDPO, CausalLM, MiniLLM  # noqa: E402
from lm.sharding import FSDP2Strategy, full_state_dict, memory_per_rank  # noqa: E402

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 2}
#: A layer-heavy ~55M-parameter Llama (218 MB in fp32; one decoder layer is 6 % of it) for the start-up memory.
MEDIUM = {"hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 16, "num_attention_heads": 8,
          "num_key_value_heads": 8}
STEPS, GLOBAL_BATCH, SEQ = 4, 4, 12
WORLD = 2


def token_rows(n: int = GLOBAL_BATCH * STEPS // 2, seed: int = 0) -> torch.Tensor:
    """Fixed-length rows of byte tokens 3..258 (no padding: every rank sees the same number of tokens)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 259, (n, SEQ), generator=g)


def rank_rows(rows):
    """This rank's rows, r::WORLD under the launched processes (so step k of rank r holds rows of the single
    process's global batch k), all rows in one process; the trainer's own distributed sampler is off."""
    rank = os.environ.get("LOCAL_RANK")
    return rows if rank is None else rows[int(rank)::WORLD]


def lm_loader(batch: int, n: int = GLOBAL_BATCH * STEPS // 2) -> DataLoader:
    rows = rank_rows(token_rows(n))
    data = [{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r, "prompt_input_ids": r[:4],
             "prompt_attention_mask": torch.ones(4, dtype=torch.long)} for r in rows]
    return DataLoader(data, batch_size=batch)


def pair_loader(batch: int) -> DataLoader:
    """Preference pairs sharing a 4-token prompt; rows chosen first, as datamodules.preference collates."""
    chosen, rejected = token_rows(seed=1), token_rows(seed=2)
    rejected[:, :4] = chosen[:, :4]
    pairs = rank_rows(list(zip(range(len(chosen)), chosen, rejected)))

    def collate(items):
        ids = torch.stack([c for _, c, _ in items] + [r for _, _, r in items])
        resp = torch.ones_like(ids)
        resp[:, :4] = 0
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "response_mask": resp,
                "index": torch.tensor([i for i, _, _ in items])}

    return DataLoader(pairs, batch_size=batch, collate_fn=collate)


def write_pretrained(out: Path) -> Path:
    """A ``save_pretrained`` directory of a tiny Llama with tied input/output embeddings, in ``out``."""
    from lm.hf import load_causal_lm, save_pretrained_with_tokenizer
    from lm.tokenizers import byte_tokenizer

    tied = TINY | {"tie_word_embeddings": True}
    return save_pretrained_with_tokenizer(load_causal_lm(tied, vocab_size=259, seed=3), byte_tokenizer(),
                                          out / "pretrained")


def build(kind: str, out: Path | None = None):
    if kind == "causal_lm":
        return CausalLM(model=TINY, lr=1e-2, lr_decay="constant"), lm_loader
    if kind == "causal_lm_pretrained":  # the directory write_pretrained(out) wrote
        return CausalLM(model=str(out / "pretrained"), lr=1e-2, lr_decay="constant"), lm_loader
    if kind == "dpo":
        return DPO(model=TINY, lr=1e-2, lr_decay="constant"), pair_loader
    if kind == "dpo_precompute":
        return DPO(model=TINY, precompute_ref_logps=True, lr=1e-2, lr_decay="constant"), pair_loader
    if kind == "minillm_kd":
        return MiniLLM(student=TINY, teacher=TINY | {"hidden_size": 48}, objective="kd", lr=1e-2,
                       lr_decay="constant"), lm_loader
    if kind == "minillm":
        return MiniLLM(student=TINY, teacher=TINY | {"hidden_size": 48}, objective="minillm", lm_coef=0.0,
                       max_new_tokens=5, ppo_epochs=1, lr=1e-2, lr_decay="constant"), lm_loader
    if kind == "qdpo":
        return QDPO(model=TINY | {"hidden_size": 64}, group_size=32, precompute_ref_logps=False, lr=1e-2,
                    lr_decay="constant"), pair_loader
    raise ValueError(kind)


class Data(L.LightningDataModule):
    def __init__(self, loader: DataLoader):
        super().__init__()
        self.loader = loader

    def train_dataloader(self) -> DataLoader:
        return self.loader

    def val_dataloader(self) -> list:
        return []


class Record(L.Callback):
    """Per-step training losses and, at the last step (gradients present), the rank's local bytes; with
    ``stop_after`` a checkpoint at the end of the epoch that reaches that step, then the run stops ("killed")."""

    def __init__(self, stop_after: int | None = None, ckpt: Path | None = None):
        self.losses, self.memory, self.stop_after, self.ckpt = [], None, stop_after, ckpt

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))

    def on_train_epoch_end(self, trainer, pl_module):
        if self.stop_after is not None and trainer.global_step == self.stop_after:
            trainer.save_checkpoint(self.ckpt)
            trainer.should_stop = True

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == STEPS - 1:
            self.memory = memory_per_rank(pl_module, optimizer)


def trainer(sharded: bool, callback: Record, max_steps: int = STEPS, **kwargs) -> L.Trainer:
    strategy = FSDP2Strategy(**kwargs) if sharded else "auto"
    return L.Trainer(accelerator="cpu", devices=WORLD if sharded else 1, strategy=strategy, max_steps=max_steps,
                     use_distributed_sampler=False, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     callbacks=[callback], num_sanity_val_steps=0)


def fit(kind: str, sharded: bool, out: Path, export: bool = False, **strategy_kwargs) -> dict:
    """Train ``STEPS`` steps; return the losses, the memory and (rank 0) the gathered weights."""
    L.seed_everything(0, verbose=False)
    module, loader = build(kind, out)
    if export:
        module.export_dir = str(out / f"{kind}_export")
    rec = Record()
    per_rank = GLOBAL_BATCH // WORLD if sharded else GLOBAL_BATCH
    data = Data(loader(per_rank))  # precomputed reference log-probs read the loaders from a datamodule
    trainer(sharded, rec, **strategy_kwargs).fit(module, datamodule=data)
    return {"losses": rec.losses, "memory": rec.memory, "weights": trainable_weights(module)}


def trainable_weights(module) -> dict[str, torch.Tensor]:
    net = module.model if hasattr(module, "model") else module.policy
    return full_state_dict(net)


def interrupted_then_resumed(kind: str, out: Path) -> dict:
    """An uninterrupted run, and one stopped after its checkpoint at step 2 then resumed from it in a new
    trainer to ``STEPS``. One batch per epoch: Lightning 2.6 restarts an epoch-end checkpoint's epoch from its
    first batch with a plain loader (the loader's position is ExactResume's business, not the strategy's)."""
    ckpt = out / f"{kind}_step2.ckpt"
    results = {}
    for name, callback, ckpt_path in (("uninterrupted", Record(), None), ("interrupted", Record(2, ckpt), None),
                                      ("resumed", Record(), ckpt)):
        L.seed_everything(0, verbose=False)
        module, _ = build(kind)
        trainer(True, callback).fit(module, lm_loader(GLOBAL_BATCH // WORLD, n=GLOBAL_BATCH), ckpt_path=ckpt_path)
        results[name] = {"losses": callback.losses, "weights": trainable_weights(module)}
    return {"losses": results["resumed"]["losses"], "uninterrupted_losses": results["uninterrupted"]["losses"],
            "is_dir": ckpt.is_dir(), "weights": results["resumed"]["weights"],
            "uninterrupted_weights": results["uninterrupted"]["weights"],
            "interrupted_weights": results["interrupted"]["weights"]}


def rss_kib(field: str) -> int:
    """``VmRSS`` (now) or ``VmHWM`` (peak since the last reset) of this process, in KiB (Linux)."""
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


class PeakAtFitStart(L.Callback):
    def on_fit_start(self, trainer, pl_module):
        self.peak_kib = rss_kib("VmHWM")


def start_up_memory() -> dict:
    """The peak resident memory this rank adds from just before a :data:`MEDIUM` ``CausalLM`` is constructed
    until ``fit`` starts (networks built, sharded, materialised; optimizer created), and the whole model's bytes.
    The peak is reset first (``/proc/self/clear_refs`` 5), so it is the peak of this interval."""
    peak = PeakAtFitStart()
    fitter = trainer(True, peak, max_steps=1)
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    before = rss_kib("VmRSS")
    module = CausalLM(model=MEDIUM, lr=1e-2, lr_decay="constant")
    fitter.fit(module, lm_loader(1, n=2))
    whole = sum(p.numel() * p.element_size() for p in module.model.parameters())  # a DTensor's numel is global
    return {"peak_growth_bytes": (peak.peak_kib - before) * 1024, "whole_bytes": whole}


def counting_generation():
    """Make ``QDPOPairsDataModule``'s pair generation (``lm.sampling.generate_answers`` there) count its calls;
    return the counter (a one-element list)."""
    import datamodules.qdpo_pairs as qdpo_pairs

    calls, real = [0], qdpo_pairs.generate_answers

    def counted(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    qdpo_pairs.generate_answers = counted
    return calls


def qdpo_with_pairs_data(out: Path) -> dict:
    """``fit`` QDPO with the pair datamodule under ``FSDP2Strategy``: the error, and how many pair generations
    ran before it."""
    from datamodules import QDPOPairsDataModule

    calls = counting_generation()
    module = QDPO(model=TINY | {"hidden_size": 64}, group_size=32, lr=1e-2)
    data = QDPOPairsDataModule(num_prompts=4, max_new_tokens=2, batch_size=1, val_fraction=0.5,
                               pairs_cache_dir=str(out / "qdpo_pairs"))
    try:
        trainer(True, Record()).fit(module, datamodule=data)
        error = None
    except Exception as e:  # noqa: BLE001 - the test checks the message
        error = f"{type(e).__name__}: {e}"
    return {"error": error, "generate_answers_calls": calls[0]}


def main(out: Path, scenarios: list[str]) -> None:
    rank = int(os.environ["LOCAL_RANK"])
    results = {}
    for scenario in scenarios:
        if scenario == "resume":
            results[scenario] = interrupted_then_resumed("causal_lm", out)
        elif scenario == "start_up_memory":
            results[scenario] = start_up_memory()
        elif scenario == "qdpo_pairs":
            results[scenario] = qdpo_with_pairs_data(out)
        elif scenario == "qdpo":
            try:
                fit("qdpo", True, out)
                results[scenario] = {"error": None}
            except Exception as e:  # noqa: BLE001 - the test checks the message
                results[scenario] = {"error": f"{type(e).__name__}: {e}"}
        elif scenario.endswith("_bf16"):
            results[scenario] = fit(scenario[: -len("_bf16")], True, out, mixed_precision="bf16",
                                    activation_checkpointing=True)
        else:
            results[scenario] = fit(scenario, True, out, export=scenario == "causal_lm")
        if scenario == "minillm_kd":
            results["rollout"] = sharded_rollout(out)
    weights = {k: v.pop("weights", None) for k, v in results.items() if isinstance(v, dict)}
    for key in ("uninterrupted_weights", "interrupted_weights"):
        weights[f"resume_{key}"] = results.get("resume", {}).pop(key, None)
    if rank == 0:
        torch.save(weights, out / "weights.pt")
    (out / f"rank{rank}.json").write_text(json.dumps(results))


def sharded_rollout(out: Path) -> dict:
    """MiniLLM steps (teacher-mixed rollouts, α 0.2) with sharded student and teacher, then one more rollout
    at α 0.5 with each rank's own prompts and coins (ranks would call different models under a lazy sampler)."""
    L.seed_everything(0, verbose=False)
    module, loader = build("minillm")
    rec = Record()
    trainer(True, rec, max_steps=2).fit(module, loader(GLOBAL_BATCH // WORLD))
    rank = int(os.environ["LOCAL_RANK"])
    prompts = token_rows(2, seed=10 + rank)[:, :4]
    rollout = module.rollout({"prompt_input_ids": prompts, "prompt_attention_mask": torch.ones_like(prompts)},
                             alpha=0.5, generator=torch.Generator().manual_seed(rank))
    return {"response_shape": list(rollout.response_ids.shape), "losses": rec.losses}


def launch(out: Path, scenarios: list[str], timeout: float = 240) -> list[dict]:
    """Run this file on ``WORLD`` local processes (gloo); return each rank's results."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(WORLD):
        # MALLOC_MMAP_THRESHOLD_: glibc returns every freed block >= 128 KiB to the OS at once, so the resident
        # memory follows the live tensors (with its default, adaptive threshold, freed FSDP all-gather buffers
        # stay resident and the start-up peak measures the allocator, not the tensors)
        env = os.environ | {"MALLOC_MMAP_THRESHOLD_": "131072", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(WORLD),
                            "LOCAL_RANK": str(rank), "NODE_RANK": "0", "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, __file__, str(out), *scenarios], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        logs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for rank, (p, text) in enumerate(zip(procs, logs)):
        (out / f"rank{rank}.log").write_text(text)
    if any(p.returncode != 0 for p in procs):
        first = min(range(WORLD), key=lambda r: "Traceback" not in logs[r])  # the rank that failed first
        raise RuntimeError(f"sharded worker rank {first} exited with {procs[first].returncode}:\n"
                           f"{logs[first][-4000:]}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(Path(sys.argv[1]), sys.argv[2:])
