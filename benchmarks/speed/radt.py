"""RADT speed: vectorized return-alignment evaluation vs a one-episode-at-a-time loop, and RADT's training step
vs Decision Transformer's at equal size.

    python -m benchmarks.speed.radt [--device cpu|cuda] [--quick] [--threads N]

1. **Evaluation** (needs gymnasium + MuJoCo; skipped with a note otherwise): an untrained paper-size RADT
   (embed 128, 3 layers, 1 head, K 20) acts in ``HalfCheetah-v5`` limited to ``steps`` steps per episode
   (no early termination, so every episode has exactly ``steps`` steps), all through ``rollout_returns``.
   *Vectorized* (ours, what ``ReturnAlignmentEval`` does): 7 targets × 5 episodes in one ``SyncVectorEnv``, one
   ``RADT.act`` (batch 35) per step. *Sequential, reference-style* (the anchor): one episode at a time and
   batch-1 forwards of the whole model taking the last prediction, as the reference's ``evaluate_episode_rtg``
   does (``predict_actions(window)[:, -1]``). *Sequential, ours*: one episode at a time through ``RADT.act``
   (isolates the gain of batching from the gain of ``act``'s newest-token-only forward). Sequential sides run
   one episode per target (env-steps/s is a rate, so 7 episodes suffice). Ratios are of env-steps/s,
   medians of ``repeats`` runs.
2. **Training step**: forward + backward + AdamW step on a fixed random batch (64 windows, K 20, HalfCheetah
   sizes: state 17, action 6), for DT, RADT and its two ablations at the same embed/layers/heads; median
   time per step over ``steps`` steps after warm-up, ratio to DT measured in the same run.
3. **Built-in data** (not with ``--quick``): generation (or cache read) time and the return distribution
   (min / 5th / 50th / 95th percentile / max) of both built-in datasets, in ``$LITPAPERS_CACHE``.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time

import torch

from benchmarks.common import apply_threads, benchmark_parser
from lit_modules import RADT, DecisionTransformer

STATE_DIM, ACT_DIM, K, BATCH = 17, 6, 20, 64


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def eval_speed(device: torch.device, steps: int, repeats: int) -> dict:
    """Env-steps/s of the vectorized evaluation and of the sequential anchor (see module docstring)."""
    import gymnasium as gym

    from callbacks.return_alignment import rollout_returns

    torch.manual_seed(0)
    model = RADT(state_dim=STATE_DIM, act_dim=ACT_DIM)
    model.configure_model()
    model = model.to(device).eval()
    make_env = lambda: gym.make("HalfCheetah-v5", max_episode_steps=steps)  # noqa: E731
    targets = [float(x) for x in torch.linspace(-400, 100, 7)]
    @torch.no_grad()
    def full_forward(states, actions, returns_to_go, timesteps, mask, cache):
        batch = {"states": states, "actions": actions, "returns_to_go": returns_to_go, "timesteps": timesteps,
                 "mask": mask}
        return model.predict_actions(batch)[:, -1]

    sides = {"vectorized": (model.act, dict(episodes_per_target=5, num_envs=None)),
             "sequential_reference_style": (full_forward, dict(episodes_per_target=1, num_envs=1)),
             "sequential_ours": (model.act, dict(episodes_per_target=1, num_envs=1))}
    times: dict[str, list[float]] = {name: [] for name in sides}
    rollout_returns(model.act, make_env, targets[:1], 1, K, 1, device=device)  # warm-up
    for _ in range(repeats):
        for name, (policy, kw) in sides.items():
            sync(device)
            start = time.perf_counter()
            rollout_returns(policy, make_env, targets, context_len=K, device=device, **kw)
            sync(device)
            times[name].append(time.perf_counter() - start)
    out = {}
    for name, (_, kw) in sides.items():
        env_steps = len(targets) * kw["episodes_per_target"] * steps
        med = statistics.median(times[name])
        out[name] = {"episodes": len(targets) * kw["episodes_per_target"], "env_steps": env_steps,
                     "batch_per_forward": len(targets) * kw["episodes_per_target"] if kw["num_envs"] is None else 1,
                     "seconds": [round(t, 3) for t in times[name]], "median_s": round(med, 3),
                     "env_steps_per_s": round(env_steps / med, 1)}
    rate = {name: out[name]["env_steps_per_s"] for name in sides}
    out["speedup_vectorized_vs_sequential_reference_style"] = round(rate["vectorized"]
                                                                    / rate["sequential_reference_style"], 2)
    out["speedup_vectorized_vs_sequential_ours"] = round(rate["vectorized"] / rate["sequential_ours"], 2)
    out["settings"] = f"HalfCheetah-v5, {steps} steps/episode, 7 targets, untrained RADT (embed 128, 3 layers, K {K})"
    return out


def train_step_time(device: torch.device, steps: int, repeats: int) -> dict:
    """Median seconds per training step for DT, RADT and the ablations at equal size, ratio to DT."""
    g = torch.Generator().manual_seed(0)
    batch = {"states": torch.randn(BATCH, K, STATE_DIM, generator=g),
             "actions": torch.rand(BATCH, K, ACT_DIM, generator=g) * 2 - 1,
             "returns_to_go": torch.randn(BATCH, K, generator=g) * 300,
             "timesteps": torch.arange(K).repeat(BATCH, 1), "mask": torch.ones(BATCH, K)}
    batch = {k: v.to(device) for k, v in batch.items()}
    variants = {"DT": (DecisionTransformer, {}), "RADT": (RADT, {}),
                "RADT (SeqRA only)": (RADT, {"stepra": False}), "RADT (StepRA only)": (RADT, {"seqra": False})}
    models, opts = {}, {}
    for name, (cls, kw) in variants.items():
        torch.manual_seed(0)
        models[name] = cls(state_dim=STATE_DIM, act_dim=ACT_DIM, **kw).to(device).train()
        opts[name] = torch.optim.AdamW(models[name].parameters(), lr=1e-4, weight_decay=1e-4)

    def step(name: str) -> None:
        loss = models[name].action_loss(models[name].predict_actions(batch), batch["actions"], batch["mask"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(models[name].parameters(), 0.25)
        opts[name].step()
        opts[name].zero_grad(set_to_none=True)

    for name in variants:  # warm-up
        for _ in range(3):
            step(name)
    per_step: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):  # interleave the variants so machine noise hits all of them alike
        for name in variants:
            sync(device)
            start = time.perf_counter()
            for _ in range(steps):
                step(name)
            sync(device)
            per_step[name].append((time.perf_counter() - start) / steps)
    dt = statistics.median(per_step["DT"])
    return {name: {"params": sum(p.numel() for p in models[name].parameters()),
                   "ms_per_step": [round(1e3 * t, 2) for t in per_step[name]],
                   "median_ms": round(1e3 * statistics.median(per_step[name]), 2),
                   "ratio_vs_DT": round(statistics.median(per_step[name]) / dt, 3)} for name in variants} | {
        "settings": f"batch {BATCH}, K {K}, embed 128, 3 layers, 1 head, dropout 0.1, fp32, AdamW + clip 0.25, "
                    f"{steps} steps x {repeats} repeats"}


def builtin_data() -> dict:
    """Generation/cache time and return distribution of each built-in dataset."""
    from datamodules.offline_rl import OfflineRLDataModule
    from datamodules.offline_rl_generate import BUILTIN_DATASETS, return_summary

    out = {}
    for name in BUILTIN_DATASETS:
        dm = OfflineRLDataModule(dataset=name)
        fresh = not (dm.builtin_root() / name / "data").exists()
        start = time.perf_counter()
        dm.setup("fit")
        out[name] = {"env": dm.env_id, "episodes": len(dm.episode_returns), "steps": int(dm.total_steps),
                     "seconds": round(time.perf_counter() - start, 1),
                     "generated_now": fresh, "returns": return_summary(dm.episode_returns)}
    return out


def main() -> None:
    parser = benchmark_parser(__doc__, quick_help="fewer steps/repeats, no dataset report")
    args = parser.parse_args()
    apply_threads(args)
    device = torch.device(args.device)
    result: dict = {"machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                                "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                                "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}}
    result["train_step"] = train_step_time(device, steps=3 if args.quick else 10, repeats=3 if args.quick else 5)
    try:
        import gymnasium  # noqa: F401
    except ImportError:
        result["eval"] = {"skipped": "gymnasium/mujoco not installed"}
    else:
        result["eval"] = eval_speed(device, steps=40 if args.quick else 200, repeats=2 if args.quick else 3)
        if not args.quick:
            result["builtin_data"] = builtin_data()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
