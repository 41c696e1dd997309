"""Overhead of the over-squashing probes on a training run (target: ≤ 5% at default settings).

    python -m benchmarks.speed.probe_overhead [--device cpu|cuda] [--quick] [--config configs/probes/tasks_quick.yaml]

Model, data and probes come from the config (``configs/probes/tasks_quick.yaml``: tiny Llama, batch 32,
fp32; the three probes at their settings there, run at every validation). Interleaved, ``--repeats`` times:

- ``step_s``: one training step (forward + backward + AdamW step) of the config's module on its batches,
  in a plain loop — no Lightning, logging or data-loading overhead, which makes the overhead ratio an
  upper bound (a real step is slower).
- ``probe_round_s``: one round of all the config's probes (what runs at each validation end), including
  their figures drawn for a TensorBoard logger.

Overhead of the config's schedule = rounds × probe_round_s / (max_steps × step_s), rounds =
max_steps // val_check_interval; medians of each.

End to end, also interleaved: the same Lightning ``Trainer.fit`` (fresh seeded model, ``e2e_steps`` steps,
validation every ``e2e_steps // 2`` steps, TensorBoard logger, no checkpointing) with and without the probes;
``e2e_ratio`` = median time with / median without. Two probe rounds in ``e2e_steps`` steps is denser than the
config's schedule; ``e2e_overhead_at_config_schedule`` rescales the measured per-round cost to it.
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]


def instantiate(spec: dict):
    module_name, _, class_name = spec["class_path"].rpartition(".")
    return getattr(importlib.import_module(module_name), class_name)(**spec.get("init_args", {}))


def fit_seconds(config: dict, device: str, steps: int, with_probes: bool) -> float:
    """Wall time of ``Trainer.fit`` for ``steps`` steps of the config's module/data, with or without its probes."""
    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger

    L.seed_everything(0, verbose=False)
    model_spec = {**config["model"], "init_args": {**config["model"].get("init_args", {}), "export_dir": None}}
    module, data = instantiate(model_spec), instantiate(config["data"])
    probes = [instantiate(c) for c in config["trainer"]["callbacks"] if c["class_path"].startswith("callbacks.")]
    for probe in probes:
        probe.figure_dir = None
    with tempfile.TemporaryDirectory() as tmp:
        trainer = L.Trainer(max_steps=steps, val_check_interval=steps // 2, check_val_every_n_epoch=None,
                            limit_val_batches=config["trainer"].get("limit_val_batches", 1.0),
                            gradient_clip_val=config["trainer"].get("gradient_clip_val"), accelerator=device,
                            devices=1, logger=TensorBoardLogger(tmp, name="e2e"), enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                            callbacks=probes if with_probes else [])
        start = time.perf_counter()
        trainer.fit(module, data)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="fewer steps per measurement and repeats")
    parser.add_argument("--config", default=str(ROOT / "configs" / "probes" / "tasks_quick.yaml"))
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args()
    from lightning.pytorch.loggers import TensorBoardLogger

    config = yaml.safe_load(Path(args.config).read_text())
    torch.manual_seed(0)
    module = instantiate(config["model"]).to(args.device)
    data = instantiate(config["data"])
    data.tokenizer_name = None
    data.setup("fit")
    probes = [instantiate(c) for c in config["trainer"]["callbacks"] if c["class_path"].startswith("callbacks.")]
    for probe in probes:
        probe.figure_dir = None
    max_steps = config["trainer"]["max_steps"]
    rounds = max_steps // config["trainer"]["val_check_interval"]
    steps_per_sample, repeats = (5, 3) if args.quick else (20, 5)
    repeats = args.repeats or repeats

    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-3)
    batches = itertools.cycle(data.train_dataloader())

    def train_steps(n: int) -> float:
        module.train()
        if args.device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(n):
            batch = {k: v.to(args.device) for k, v in next(batches).items()}
            loss = module.model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if args.device == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / n

    with tempfile.TemporaryDirectory() as tmp:
        logger = TensorBoardLogger(tmp, name="probe_overhead")
        step = 0

        def probe_round() -> float:
            nonlocal step
            step += 1
            trainer = SimpleNamespace(is_global_zero=True, global_step=step, loggers=[logger], sanity_checking=False)
            if args.device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for probe in probes:
                probe.run(trainer, module)
            if args.device == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - start

        train_steps(2), probe_round()  # warm-up
        step_times, probe_times = [], []
        for _ in range(repeats):
            step_times.append(train_steps(steps_per_sample))
            probe_times.append(probe_round())

    e2e_steps, e2e_repeats = (100, 2) if args.quick else (300, 3)
    e2e = {"with": [], "without": []}
    for _ in range(e2e_repeats):
        for side in ("without", "with"):
            e2e[side].append(fit_seconds(config, args.device, e2e_steps, side == "with"))

    step_s, probe_s = statistics.median(step_times), statistics.median(probe_times)
    with_s, without_s = statistics.median(e2e["with"]), statistics.median(e2e["without"])
    per_round_s = (with_s - without_s) / 2
    overhead = rounds * probe_s / (max_steps * step_s)
    result = {
        "benchmark": "probe_overhead", "device": args.device, "config": str(Path(args.config).relative_to(ROOT)),
        "settings": {"train": f"plain loop, AdamW, fp32, batch {data.batch_size}, {steps_per_sample} steps/sample",
                     "probes": [type(p).__name__ for p in probes], "probe_schedule": f"{rounds} rounds in "
                     f"{max_steps} steps (every val_check_interval={config['trainer']['val_check_interval']})",
                     "torch_threads": torch.get_num_threads(), "repeats": repeats},
        "step_s": step_times, "probe_round_s": probe_times,
        "median_step_s": step_s, "median_probe_round_s": probe_s,
        "probe_round_in_steps": probe_s / step_s,
        "overhead_ratio": overhead, "within_5_percent": overhead <= 0.05,
        "e2e_settings": f"Trainer.fit {e2e_steps} steps, 2 probe rounds, {e2e_repeats} repeats per side",
        "e2e_fit_s": e2e, "e2e_ratio": with_s / without_s,
        "e2e_overhead_at_config_schedule": rounds * per_round_s / (max_steps * without_s / e2e_steps),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
