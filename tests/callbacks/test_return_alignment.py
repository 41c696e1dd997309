"""Return-alignment evaluation: targets, errors and the rollout bookkeeping on a toy environment with known rewards."""

import gymnasium as gym
import h5py
import lightning as L
import numpy as np
import pytest
import torch

from callbacks import ReturnAlignmentEval
from callbacks.return_alignment import alignment_errors, evenly_spaced_targets, rollout_returns


class CountdownEnv(gym.Env):
    """Observation [t]; reward = the action; the episode terminates after L = 2 + (reset seed mod 3) steps
    (L = ``fixed_length`` if given)."""

    observation_space = gym.spaces.Box(-1e3, 1e3, (1,), np.float32)
    action_space = gym.spaces.Box(-1e3, 1e3, (1,), np.float32)

    def __init__(self, fixed_length: int | None = None):
        self.fixed_length, self.length = fixed_length, fixed_length or 2

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        if seed is not None:  # the vector env's automatic reset after an episode ends passes no seed
            self.length = self.fixed_length or 2 + (seed % 3)
        return np.array([0.0], np.float32), {}

    def step(self, action):
        self.t += 1
        return np.array([self.t], np.float32), float(action[0]), self.t >= self.length, False, {}


def test_evenly_spaced_targets_are_percentile_linspace():
    # returns 0..100: the 5th / 95th percentiles are 5 and 95 -> 7 targets 15 apart
    assert evenly_spaced_targets(np.arange(101), n=7) == pytest.approx([5, 20, 35, 50, 65, 80, 95])


def test_alignment_errors_hand_computed():
    actual = np.array([[10.0, 20.0], [0.0, 4.0]])  # means 15 and 2
    assert alignment_errors(actual, [12.0, 5.0]) == pytest.approx([3.0, 3.0])


@pytest.mark.parametrize("num_envs", [None, 1, 4])
def test_constant_policy_returns_match_episode_lengths(num_envs):
    # action 1 each step -> return = episode length = 2 + (seed mod 3), seed = 100 + i*N + e
    ones = lambda s, a, r, t, m, cache: torch.ones(s.shape[0], 1)  # noqa: E731
    actual = rollout_returns(ones, CountdownEnv, targets=[0.0, 50.0], episodes_per_target=3, context_len=4,
                             num_envs=num_envs, seed=100)
    expected = np.array([[2 + (100 + i * 3 + e) % 3 for e in range(3)] for i in range(2)], dtype=float)
    np.testing.assert_array_equal(actual, expected)
    assert alignment_errors(actual, [0.0, 50.0]) == pytest.approx([3.0, 47.0])


def test_returns_to_go_are_decremented_by_rewards_and_windows_slide():
    # The policy spends the remaining return evenly over the remaining steps of a 5-step episode:
    # a_t = R̂_t / (5 - t). Only if R̂_t = target - sum of earlier rewards does the return equal the target.
    K, seen = 3, []

    def spend(states, actions, rtg, timesteps, mask, cache):
        seen.append((states[0, :, 0].clone(), rtg[0].clone(), timesteps[0].clone(), mask[0].clone(),
                     actions[0, :, 0].clone()))
        return (rtg[:, -1] / (5 - timesteps[:, -1])).unsqueeze(-1)

    targets = [10.0, -4.0, 7.5]
    actual = rollout_returns(spend, lambda: CountdownEnv(fixed_length=5), targets, episodes_per_target=2,
                             context_len=K)
    np.testing.assert_allclose(actual, np.repeat(np.array(targets)[:, None], 2, axis=1), rtol=1e-5)
    # what the policy saw for the first episode (target 10, reward 2 per step): left padding, then a slide
    rtg_hist = [10.0, 8.0, 6.0, 4.0, 2.0]
    for t, (obs, rtg, ts, mask, act) in enumerate(seen):
        n = min(t + 1, K)
        assert mask.tolist() == [0.0] * (K - n) + [1.0] * n
        assert ts[-n:].tolist() == list(range(t - n + 1, t + 1))
        assert obs[-n:].tolist() == [float(x) for x in range(t - n + 1, t + 1)]
        assert rtg[-n:].tolist() == pytest.approx(rtg_hist[t - n + 1:t + 1])
        assert act[-n:].tolist() == pytest.approx([2.0] * (n - 1) + [0.0])  # the current action is unknown: 0


def test_callback_logs_alignment_and_figure_in_validate(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger

    from datamodules import OfflineRLDataModule
    from lit_modules import RADT

    gym.register("LitpapersCountdown-v0", entry_point=CountdownEnv, kwargs={"fixed_length": 4})
    rng = np.random.default_rng(0)
    n = 40  # 10 episodes of 4 steps with returns 0..9
    rewards = np.repeat(np.arange(10) / 4.0, 4).astype(np.float32)
    with h5py.File(tmp_path / "toy.hdf5", "w") as f:
        f["observations"] = np.tile(np.arange(4, dtype=np.float32), 10)[:, None]
        f["actions"] = rng.uniform(-1, 1, (n, 1)).astype(np.float32)
        f["rewards"] = rewards
        f["terminals"] = np.tile([0, 0, 0, 1], 10).astype(bool)
        f["timeouts"] = np.zeros(n, bool)
    dm = OfflineRLDataModule(dataset=str(tmp_path / "toy.hdf5"), env_id="LitpapersCountdown-v0", context_len=4,
                             batch_size=8, val_fraction=0.2)
    model = RADT(embed_dim=16, n_layers=1, context_len=4, max_timestep=8, rtg_scale=10.0)
    cb = ReturnAlignmentEval(episodes_per_target=2, n_targets=3)
    trainer = L.Trainer(logger=TensorBoardLogger(tmp_path, name="tb"), callbacks=[cb], enable_progress_bar=False,
                        enable_model_summary=False)
    metrics = trainer.validate(model, datamodule=dm)[0]
    # targets: 5th..95th percentile of returns 0..9 = 0.45..8.55 in 3 steps
    assert cb.last_result["targets"] == pytest.approx([0.45, 4.5, 8.55])
    # the untrained policy's actions are in (-1, 1): 4 steps give a return in (-4, 4)
    actual = np.array(cb.last_result["actual"])
    assert actual.shape == (3, 2) and np.all(np.abs(actual) < 4)
    expected = np.abs(actual.mean(1) - np.array([0.45, 4.5, 8.55])).mean()
    assert metrics["val/return_alignment_error"] == pytest.approx(expected, rel=1e-5)
    assert metrics["val/return_target/2"] == pytest.approx(8.55)
    assert "val/action_loss" in metrics
    events = list((tmp_path / "tb").rglob("events.out.tfevents*"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events[0].parent), size_guidance={"images": 0}).Reload()
    assert "val/return_alignment" in acc.Tags()["images"]
