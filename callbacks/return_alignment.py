"""Return-alignment evaluation of return-conditioned policies (RADT paper, docs/papers.md §3 "Evaluation").

For each target return G (default: 7 targets evenly spaced from the 5th to the 95th percentile of the
dataset's episode returns) the policy is rolled out for N episodes starting from R̂_0 = G and updating
R̂_{t+1} = R̂_t − r_t after every reward. The **alignment error** of a target is |mean actual return − G|;
the paper reports it per target and summed/averaged over targets (the checkpoint criterion is the sum).

All episodes of all targets run together in ``gymnasium.vector.SyncVectorEnv`` and go through **one model
forward per environment step** (a batch of K-step windows, newest step last, left-padded with mask 0 while
t < K). Episodes that end early are masked out while the others continue. Episode e of target i is reset
with seed ``seed + i·N + e``, so results do not depend on how episodes are grouped (``num_envs``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import lightning as L
import numpy as np
import torch
import torchmetrics

from lm.extras import require

Policy = Callable[..., torch.Tensor]  # (states, actions, returns_to_go, timesteps, mask, cache=dict) -> actions


def evenly_spaced_targets(episode_returns: Sequence[float], n: int = 7, low: float = 5.0, high: float = 95.0) -> list[float]:
    """``n`` targets evenly spaced from the ``low``-th to the ``high``-th percentile of the episode returns."""
    lo, hi = np.percentile(np.asarray(episode_returns, dtype=np.float64), [low, high])
    return [float(x) for x in np.linspace(lo, hi, n)]


def alignment_errors(actual_returns: np.ndarray, targets: Sequence[float]) -> np.ndarray:
    """Per target |mean_e actual[i, e] − target_i| for ``actual_returns`` of shape (targets, episodes)."""
    return np.abs(np.asarray(actual_returns, dtype=np.float64).mean(axis=1) - np.asarray(targets, dtype=np.float64))


@torch.no_grad()
def rollout_returns(policy: Policy, make_env: Callable[[], object], targets: Sequence[float],
                    episodes_per_target: int, context_len: int, num_envs: int | None = None, seed: int = 0,
                    device: torch.device | str = "cpu") -> np.ndarray:
    """Actual undiscounted returns (len(targets), episodes_per_target) of ``policy`` conditioned on each target.

    ``policy(states (B,K,S), actions (B,K,A) or (B,K), returns_to_go (B,K), timesteps (B,K), mask (B,K),
    cache=dict)`` returns the next action for each of the B windows (raw states and returns; the newest step is
    last). ``cache`` is empty at the first step of a group of episodes and the same dict afterwards; every call's
    windows are the previous call's slid by one step, so a policy may keep per-step work there
    (``ReturnConditionedPolicy.act`` does).
    ``num_envs`` episodes run at once in one vector env (``None``: all of them; 1: one episode at a time).
    """
    gym = require("gymnasium", "rl")

    jobs = [(i, e) for i in range(len(targets)) for e in range(episodes_per_target)]
    returns = np.zeros((len(targets), episodes_per_target))
    width = len(jobs) if num_envs is None else num_envs
    for start in range(0, len(jobs), width):
        group = jobs[start:start + width]
        envs = gym.vector.SyncVectorEnv([make_env for _ in group])
        try:
            obs, _ = envs.reset(seed=[seed + i * episodes_per_target + e for i, e in group])
            rtg = np.array([targets[i] for i, _ in group], dtype=np.float64)
            got = _run_group(policy, envs, obs, rtg, context_len, torch.device(device))
        finally:
            envs.close()
        for (i, e), g in zip(group, got):
            returns[i, e] = g
    return returns


def _run_group(policy: Policy, envs, obs: np.ndarray, rtg: np.ndarray, K: int, device: torch.device) -> np.ndarray:
    """Roll the episodes of one vector env to their ends; returns their undiscounted returns."""
    gym = require("gymnasium", "rl")

    space = envs.single_action_space
    discrete = isinstance(space, gym.spaces.Discrete)
    B = len(rtg)
    states = torch.zeros(B, K, obs.shape[1], device=device)
    actions = torch.zeros((B, K) if discrete else (B, K, space.shape[0]), device=device,
                          dtype=torch.long if discrete else torch.float32)
    rtgs = torch.zeros(B, K, device=device)
    timesteps = torch.zeros(B, K, dtype=torch.long, device=device)
    mask = torch.zeros(B, K, device=device)
    total, alive, t, cache = np.zeros(B), np.ones(B, dtype=bool), 0, {}
    while alive.any():
        states[:, -1] = torch.as_tensor(obs, dtype=torch.float32, device=device)
        rtgs[:, -1] = torch.as_tensor(rtg, dtype=torch.float32, device=device)
        timesteps[:, -1], mask[:, -1] = t, 1.0
        actions[:, -1] = 0
        action = policy(states, actions, rtgs, timesteps, mask, cache=cache)
        actions[:, -1] = action
        action = action.cpu().numpy()
        if not discrete:
            action = np.clip(action, space.low, space.high).astype(space.dtype)
        obs, reward, terminated, truncated, _ = envs.step(action)
        total += reward * alive
        rtg -= reward
        alive &= ~(np.asarray(terminated) | np.asarray(truncated))
        t += 1
        for window in (states, actions, rtgs, timesteps, mask):  # slide: drop the oldest step
            window.copy_(window.roll(-1, dims=1))
    return total


class ReturnAlignmentEval(L.Callback):
    """Roll out the module for a sweep of target returns at the end of validation and log the alignment.

    Works during ``fit`` (every ``every_n_validations``-th validation, not the sanity check) and in
    ``validate``. Needs a module with ``act(states, actions, returns_to_go, timesteps, mask)`` and
    ``context_len`` (``DecisionTransformer``, ``RADT``), and a datamodule with ``make_env()`` and
    ``episode_returns`` (``OfflineRLDataModule``).

    Logs ``val/return_alignment_error`` (mean over targets of |mean actual − target|),
    ``val/return_alignment_error_sum`` (the paper's checkpoint criterion), ``val/return_actual/<i>`` and
    ``val/return_target/<i>`` per target, and (TensorBoard) the figure ``val/return_alignment`` of actual vs
    target return with the y = x line (drawn on global rank 0 only). Every rank runs the same seeded rollouts.

    Args:
        targets: explicit target returns; ``None``: ``n_targets`` from the dataset's percentiles.
        n_targets, low_percentile, high_percentile: the default sweep (paper: 7, 5, 95).
        episodes_per_target: N episodes per target (paper: 10 during training, 100 at test; reference
            ``gym/conf/default.yaml`` ``num_eval_episodes``/``num_test_episodes``).
        num_envs: episodes per vector env (``None``: all at once).
        every_n_validations: evaluate every n-th validation run during ``fit``.
        seed: base reset seed of the evaluation episodes.
    """

    def __init__(self, targets: list[float] | None = None, n_targets: int = 7, low_percentile: float = 5.0,
                 high_percentile: float = 95.0, episodes_per_target: int = 10, num_envs: int | None = None,
                 every_n_validations: int = 1, seed: int = 10_000):
        super().__init__()
        if episodes_per_target < 1 or n_targets < 1 or every_n_validations < 1:
            raise ValueError("episodes_per_target, n_targets and every_n_validations must be >= 1")
        self.targets, self.n_targets = targets, n_targets
        self.low_percentile, self.high_percentile = low_percentile, high_percentile
        self.episodes_per_target, self.num_envs = episodes_per_target, num_envs
        self.every_n_validations, self.seed = every_n_validations, seed
        self.validations = 0
        self.last_result: dict | None = None

    def resolve_targets(self, datamodule) -> list[float]:
        if self.targets is not None:
            return [float(x) for x in self.targets]
        if datamodule is None or not hasattr(datamodule, "episode_returns"):
            raise ValueError("ReturnAlignmentEval: pass targets=[...] or use a datamodule with episode_returns")
        return evenly_spaced_targets(datamodule.episode_returns, self.n_targets, self.low_percentile,
                                     self.high_percentile)

    def evaluate(self, module: L.LightningModule, datamodule) -> dict:
        """Rollouts for every target; returns targets, actual returns (targets × episodes) and errors."""
        targets = self.resolve_targets(datamodule)
        was_training = module.training
        module.eval()
        try:
            actual = rollout_returns(module.act, datamodule.make_env, targets, self.episodes_per_target,
                                     module.context_len, self.num_envs, self.seed, module.device)
        finally:
            module.train(was_training)
        errors = alignment_errors(actual, targets)
        mean_actual = torch.as_tensor(actual.mean(axis=1))
        mae = torchmetrics.functional.mean_absolute_error(mean_actual, torch.as_tensor(targets, dtype=torch.float64))
        self.last_result = {"targets": targets, "actual": actual.tolist(), "errors": errors.tolist(),
                            "mean_error": float(mae), "sum_error": float(errors.sum())}
        return self.last_result

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.validations += 1
        if trainer.state.fn == "fit" and (self.validations - 1) % self.every_n_validations:
            return
        result = self.evaluate(pl_module, trainer.datamodule)
        pl_module.log("val/return_alignment_error", result["mean_error"], prog_bar=True)
        pl_module.log("val/return_alignment_error_sum", result["sum_error"])
        for i, (target, actual) in enumerate(zip(result["targets"], result["actual"])):
            pl_module.log(f"val/return_target/{i}", target)
            pl_module.log(f"val/return_actual/{i}", float(np.mean(actual)))
        self._log_figure(trainer, result)

    @staticmethod
    def _log_figure(trainer: L.Trainer, result: dict) -> None:
        """Figure to the first TensorBoard logger, on global rank 0 only: other ranks' loggers are no-ops whose
        ``add_figure`` would never close (free) the pyplot figure, leaking one per validation under DDP."""
        from lightning.pytorch.loggers import TensorBoardLogger

        loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if not loggers or not trainer.is_global_zero:
            return
        loggers[0].experiment.add_figure("val/return_alignment", alignment_figure(result), trainer.global_step)


def alignment_figure(result: dict):
    """Matplotlib figure: mean ± std actual return per target against the target, with the y = x line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets, actual = np.asarray(result["targets"]), np.asarray(result["actual"])
    fig, ax = plt.subplots(figsize=(4.5, 4.0))
    lo, hi = min(targets.min(), actual.min()), max(targets.max(), actual.max())
    ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="y = x (perfect alignment)")
    ax.errorbar(targets, actual.mean(1), yerr=actual.std(1), fmt="o-", capsize=3, label="actual (mean ± std)")
    ax.set_xlabel("target return")
    ax.set_ylabel("actual return")
    ax.set_title(f"mean |actual − target| = {result['mean_error']:.1f}")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return fig
