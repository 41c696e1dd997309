"""Built-in offline-RL data: seeded scripted policies of varied quality rolled out in MuJoCo, saved as Minari.

A return-conditioned policy needs a wide spread of returns (docs/papers.md §3, DESIGN.md "Offline RL data"), so each
episode draws its own open-loop *phase-oscillator gait*

    a_t = clip(A ⊙ sin(2π f t Δt + φ) + σ ε_t),  ε_t ~ N(0, I),

with per-joint amplitudes A ~ U(0.2, 1), a frequency f ~ U(0.5, 4) Hz, per-joint phases φ ~ U(0, 2π) and
action noise σ ~ U(0, 0.4); a fraction ``random_fraction`` of episodes are uniform random actions instead.
Depending on the phases the gait runs forwards, backwards or flips, which gives returns from strongly negative
to strongly positive (``python -m benchmarks.speed.radt`` prints the distribution of the built-in datasets).
Rollouts run ``num_envs`` episodes at a time in a ``gymnasium.vector.SyncVectorEnv`` and are written with
``minari.create_dataset_from_buffers`` from whole-episode ``EpisodeBuffer``s (no jax needed).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np

from lm.extras import require

if TYPE_CHECKING:  # gymnasium/minari are imported lazily: GPU benchmark machines may not have them.
    import minari

BUILTIN_DATASETS: dict[str, str] = {
    "litpapers/halfcheetah/scripted-v0": "HalfCheetah-v5",
    "litpapers/swimmer/scripted-v0": "Swimmer-v5",
}


@dataclasses.dataclass
class GaitParams:
    """Per-episode parameters of the scripted policy (each array has one row per episode)."""

    amplitude: np.ndarray  # (n, act_dim)
    frequency: np.ndarray  # (n, 1), Hz
    phase: np.ndarray  # (n, act_dim)
    noise: np.ndarray  # (n, 1)
    random: np.ndarray  # (n, 1) bool: uniform random actions instead of the gait

    @classmethod
    def sample(cls, rng: np.random.Generator, n: int, act_dim: int, random_fraction: float) -> GaitParams:
        return cls(amplitude=rng.uniform(0.2, 1.0, (n, act_dim)), frequency=rng.uniform(0.5, 4.0, (n, 1)),
                   phase=rng.uniform(0.0, 2 * np.pi, (n, act_dim)), noise=rng.uniform(0.0, 0.4, (n, 1)),
                   random=rng.random((n, 1)) < random_fraction)


def scripted_actions(params: GaitParams, t: int, dt: float, rng: np.random.Generator) -> np.ndarray:
    """Actions in [−1, 1] at step ``t``: ``clip(A sin(2π f t dt + φ) + σ ε)``, or U(−1, 1) for random episodes."""
    gait = params.amplitude * np.sin(2 * np.pi * params.frequency * t * dt + params.phase)
    gait = gait + params.noise * rng.standard_normal(gait.shape)
    uniform = rng.uniform(-1.0, 1.0, gait.shape)
    return np.clip(np.where(params.random, uniform, gait), -1.0, 1.0)


def rollout_scripted_episodes(env_id: str, n_episodes: int, max_episode_steps: int, seed: int = 0,
                              num_envs: int = 16, random_fraction: float = 0.1) -> list:
    """Roll out ``n_episodes`` scripted episodes, ``num_envs`` at a time; returns ``minari`` ``EpisodeBuffer``s.

    An episode ends at termination or at ``max_episode_steps``; observations have T+1 rows (Minari layout).
    """
    gym = require("gymnasium", "rl")
    EpisodeBuffer = require("minari.data_collector", "rl").EpisodeBuffer

    rng = np.random.default_rng(seed)
    buffers: list = []
    envs = gym.vector.SyncVectorEnv([lambda: gym.make(env_id, max_episode_steps=max_episode_steps)
                                     for _ in range(min(num_envs, n_episodes))])
    space = envs.single_action_space
    low, high = space.low.astype(np.float64), space.high.astype(np.float64)
    dt = float(envs.envs[0].unwrapped.dt)
    try:
        while len(buffers) < n_episodes:
            n = envs.num_envs
            params = GaitParams.sample(rng, n, space.shape[0], random_fraction)
            obs, _ = envs.reset(seed=seed + len(buffers))
            observations, actions, rewards, terms, truncs = [obs], [], [], [], []
            alive = np.ones(n, dtype=bool)
            length = np.zeros(n, dtype=int)
            t = 0
            while alive.any():
                unit = scripted_actions(params, t, dt, rng)
                action = (low + (unit + 1.0) * 0.5 * (high - low)).astype(space.dtype)
                obs, reward, terminated, truncated, _ = envs.step(action)
                for lst, x in ((observations, obs), (actions, action), (rewards, reward), (terms, terminated),
                               (truncs, truncated)):
                    lst.append(x)
                length += alive
                alive &= ~(terminated | truncated)
                t += 1
            for i in range(min(n, n_episodes - len(buffers))):
                T = int(length[i])
                buffers.append(EpisodeBuffer(
                    id=len(buffers), seed=seed + len(buffers),
                    observations=np.stack([o[i] for o in observations[:T + 1]]),
                    actions=np.stack([a[i] for a in actions[:T]]),
                    rewards=[float(r[i]) for r in rewards[:T]],
                    terminations=[bool(x[i]) for x in terms[:T]],
                    truncations=[bool(x[i]) for x in truncs[:T]]))
    finally:
        envs.close()
    return buffers


def generate_minari_dataset(dataset_id: str, env_id: str, n_episodes: int = 300, max_episode_steps: int = 500,
                            seed: int = 0, num_envs: int = 16, random_fraction: float = 0.1) -> minari.MinariDataset:
    """Roll out the scripted policies and write them as the Minari dataset ``dataset_id`` under the current
    Minari root (``$MINARI_DATASETS_PATH``); the env spec recorded carries ``max_episode_steps``."""
    gym = require("gymnasium", "rl")
    minari = require("minari", "rl")

    buffers = rollout_scripted_episodes(env_id, n_episodes, max_episode_steps, seed, num_envs, random_fraction)
    spec = dataclasses.replace(gym.spec(env_id), max_episode_steps=max_episode_steps)
    return minari.create_dataset_from_buffers(
        dataset_id, buffers, env=spec, eval_env=spec, algorithm_name="scripted phase-oscillator gaits + random",
        author="litpapers", author_email="litpapers@example.invalid", code_permalink="datamodules/offline_rl_generate.py",
        description=f"{n_episodes} seeded scripted episodes (seed {seed}) of {env_id}, "
                    f"max {max_episode_steps} steps, random fraction {random_fraction}")


def return_summary(returns: np.ndarray) -> dict[str, float]:
    """min / 5th / 50th / 95th percentile / max of episode returns."""
    q = np.percentile(np.asarray(returns, dtype=np.float64), [0, 5, 50, 95, 100])
    return dict(zip(["min", "p5", "p50", "p95", "max"], (round(float(x), 1) for x in q)))

