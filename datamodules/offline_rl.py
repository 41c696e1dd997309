"""Offline-RL trajectories for return-conditioned transformers (Decision Transformer, RADT; docs/papers.md §3).

``OfflineRLDataModule(dataset=...)`` reads

* a **Minari** dataset id (``minari.load_dataset(id)``; looked up under ``$MINARI_DATASETS_PATH`` or
  ``~/.minari/datasets``; observations have T+1 rows per episode, the last is dropped),
* a **D4RL-format .hdf5** file with ``observations (N, S)``, ``actions (N, A)``, ``rewards (N,)``,
  ``terminals (N,)`` and ``timeouts (N,)``: an episode ends where ``terminals | timeouts``; steps after the
  last end are an unfinished episode and are dropped with a logged count (as the DT reference does),
* or one of the **built-in** ids in :data:`datamodules.offline_rl_generate.BUILTIN_DATASETS`, generated on
  first use (``prepare_data``) into ``cache_dir("minari", <generator settings>)`` with seeded scripted policies.
  It is generated under a private temporary root and its folder renamed into place only when complete, with a
  marker file (:data:`COMPLETE_MARKER`) inside; a folder without the marker (a run killed while writing it with
  an older version) is deleted and rebuilt.

Every input is checked where it is loaded: observations, actions and rewards must be finite (NaN/inf fails with
the file, the field and the index), shapes must agree.

Training examples are K-step windows *ending* at every timestep of every training episode, so each epoch
visits each step once as the newest position: episodes are drawn in proportion to their length and the end
uniformly within (the DT recipe's length-weighted sampling). Windows shorter than K (the first K−1 steps of
an episode) are left-padded, with ``mask`` 0 on the padding. Each window holds the raw states, actions,
returns-to-go R̂_t = Σ_{t'≥t} r_t' (undiscounted) and absolute timesteps; the model normalises states with
the dataset mean/std (:attr:`state_mean`, :attr:`state_std`) and scales returns itself.
A ``val_fraction`` of episodes is held out for the validation action loss.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from datamodules.contract import OfflineRLSpec
from datamodules.common import ResumableDataLoader, cache_dir, check_batch_size
from datamodules.offline_rl_generate import BUILTIN_DATASETS, generate_minari_dataset
from lm.extras import require

log = logging.getLogger(__name__)

D4RL_KEYS = ("observations", "actions", "rewards", "terminals", "timeouts")
COMPLETE_MARKER = "litpapers_complete.json"  # written into a built-in dataset's folder before it is renamed in


@dataclasses.dataclass
class Episode:
    """One trajectory: ``observations (T, S)``, ``actions (T, A)`` (or ``(T,)`` ints for discrete), ``rewards (T,)``."""

    observations: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray

    def __len__(self) -> int:
        return len(self.rewards)

    @property
    def total_return(self) -> float:
        return float(self.rewards.sum())


def returns_to_go(rewards: np.ndarray) -> np.ndarray:
    """R̂_t = Σ_{t' = t}^{T−1} r_{t'} (undiscounted, as in DT and RADT): a reversed cumulative sum."""
    rewards = np.asarray(rewards, dtype=np.float64)
    return np.cumsum(rewards[::-1])[::-1].copy()


def check_finite(values: np.ndarray, field: str, source: str) -> None:
    """Raise ``ValueError`` naming ``source``, ``field``, the number of NaN/±inf entries and the index of the
    first one (row, or (row, column)), if a floating-point array has any; integer arrays pass."""
    values = np.asarray(values)
    if not np.issubdtype(values.dtype, np.floating):
        return
    bad = ~np.isfinite(values)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"{source}: {field!r} has {int(bad.sum())} non-finite value(s); the first, "
                         f"{values[first]}, at index {first[0] if len(first) == 1 else first}")


def split_d4rl_episodes(data: dict[str, np.ndarray], source: str = "data") -> list[Episode]:
    """Cut flat D4RL arrays into episodes at ``terminals | timeouts``; checks keys, lengths and that
    observations, actions and rewards are finite (indices are rows of the flat arrays) first."""
    missing = [k for k in D4RL_KEYS if k not in data]
    if missing:
        raise KeyError(f"{source}: missing D4RL key(s) {missing} (has {sorted(data)}); "
                       f"need {list(D4RL_KEYS)}")
    n = len(data["rewards"])
    for key in D4RL_KEYS:
        if len(data[key]) != n:
            raise ValueError(f"{source}: {key!r} has {len(data[key])} rows but 'rewards' has {n}")
    if data["observations"].ndim != 2:
        raise ValueError(f"{source}: 'observations' must be 2-D (N, state_dim), got shape "
                         f"{data['observations'].shape}")
    for key in ("observations", "actions", "rewards"):
        check_finite(data[key], key, source)
    ends = np.flatnonzero(np.asarray(data["terminals"], bool) | np.asarray(data["timeouts"], bool))
    episodes, start = [], 0
    for end in ends:
        sl = slice(start, end + 1)
        episodes.append(Episode(np.asarray(data["observations"][sl], np.float32), np.asarray(data["actions"][sl]),
                                np.asarray(data["rewards"][sl], np.float32)))
        start = end + 1
    if start < n:
        log.warning("%s: dropped %d steps after the last terminal/timeout (an unfinished episode)", source,
                    n - start)
    if not episodes:
        raise ValueError(f"{source}: no complete episode (no terminals/timeouts set)")
    return episodes


def load_d4rl_hdf5(path: str | Path) -> list[Episode]:
    """Episodes of a D4RL-format hdf5 file (see the module docstring for the keys)."""
    h5py = require("h5py", "rl")

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"D4RL hdf5 file {str(path)!r} does not exist")
    with h5py.File(path, "r") as f:
        data = {k: f[k][()] for k in f.keys() if isinstance(f[k], h5py.Dataset)}
    return split_d4rl_episodes(data, source=str(path))


@contextlib.contextmanager
def minari_root(path: str | Path | None) -> Iterator[None]:
    """Temporarily point Minari at ``path`` (its datasets root); ``None`` leaves the environment as is."""
    if path is None:
        yield
        return
    old = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = str(path)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("MINARI_DATASETS_PATH", None)
        else:
            os.environ["MINARI_DATASETS_PATH"] = old


def load_minari_episodes(dataset_id: str, root: str | Path | None = None) -> tuple[list[Episode], object, object]:
    """Episodes, the env spec (or ``None``) and the action space of a local Minari dataset."""
    gym = require("gymnasium", "rl")
    minari = require("minari", "rl")

    with minari_root(root):
        local = sorted(minari.list_local_datasets())
        if dataset_id not in local:
            where = os.environ.get("MINARI_DATASETS_PATH", "~/.minari/datasets")
            if dataset_id in BUILTIN_DATASETS:
                raise ValueError(f"built-in offline-RL dataset {dataset_id!r} is missing or unreadable in its cache "
                                 f"{Path(where) / dataset_id} (Minari found {local} there); delete that folder "
                                 "and run again to rebuild it")
            raise ValueError(f"unknown offline-RL dataset {dataset_id!r}: not a file, not a built-in id "
                             f"({sorted(BUILTIN_DATASETS)}), not a local Minari dataset under {where} "
                             f"(found {local}). Download it with `minari download {dataset_id}` first.")
        ds = minari.load_dataset(dataset_id)
        if not isinstance(ds.observation_space, gym.spaces.Box):
            raise ValueError(f"Minari dataset {dataset_id!r}: only Box observations are supported, got "
                             f"{ds.observation_space}")
        episodes = []
        for ep in ds.iterate_episodes():
            T = len(ep.rewards)
            if len(ep.observations) != T + 1 or len(ep.actions) != T:
                raise ValueError(f"Minari dataset {dataset_id!r} episode {ep.id}: {len(ep.observations)} "
                                 f"observations and {len(ep.actions)} actions for {T} rewards "
                                 f"(expected T+1 and T)")
            source = f"Minari dataset {dataset_id!r} ({ds.spec.data_path}) episode {ep.id}"
            for field, values in (("observations", ep.observations[:T]), ("actions", ep.actions),
                                  ("rewards", ep.rewards)):
                check_finite(values, field, source)
            episodes.append(Episode(np.asarray(ep.observations[:T], np.float32), np.asarray(ep.actions),
                                    np.asarray(ep.rewards, np.float32)))
        return episodes, ds.spec.env_spec, ds.action_space


def builtin_dataset_complete(root: Path, dataset_id: str) -> bool:
    """Whether the built-in ``dataset_id`` under Minari root ``root`` was written completely (its marker exists)."""
    return (root / dataset_id / COMPLETE_MARKER).is_file()


def _pid_alive(pid: int) -> bool:
    """Whether a process with ``pid`` exists on this machine (one owned by another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temp_roots(root: Path) -> list[Path]:
    """Delete the private temporary roots (``.<root name>.tmp-<pid>``, see :func:`build_builtin_dataset`) left
    next to ``root`` by builds whose process no longer exists (killed, out of memory, power loss); a folder of a
    live process is kept (it is still building). Returns the folders removed."""
    removed = []
    for folder in root.parent.glob(f".{root.name}.tmp-*"):
        pid = folder.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            log.info("removing %s, left by a dataset build that did not finish (process %s is gone)", folder, pid)
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def build_builtin_dataset(root: Path, dataset_id: str, settings: dict) -> None:
    """Generate the built-in ``dataset_id`` with ``settings`` under a private temporary root next to ``root``, write
    the marker, then rename the finished folder to ``root / dataset_id``. A partial folder there (no marker) is
    deleted first; if another process completed the dataset meanwhile, ours is discarded."""
    target = root / dataset_id
    tmp_root = root.parent / f".{root.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp_root, ignore_errors=True)
    try:
        log.info("generating built-in dataset %s into %s", dataset_id, root)
        with minari_root(tmp_root):
            generate_minari_dataset(dataset_id, BUILTIN_DATASETS[dataset_id], **settings)
        (tmp_root / dataset_id / COMPLETE_MARKER).write_text(json.dumps(settings))
        if target.exists() and not builtin_dataset_complete(root, dataset_id):
            log.warning("deleting the partial built-in dataset %s (no %s: an interrupted build)", target,
                        COMPLETE_MARKER)
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(tmp_root / dataset_id, target)
        except OSError:  # target exists: another process renamed its complete copy in first
            if not builtin_dataset_complete(root, dataset_id):
                raise
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)


class WindowDataset(Dataset):
    """K-step windows ending at each timestep of ``episodes`` (left-padded; ``mask`` 1 on real steps)."""

    def __init__(self, episodes: list[Episode], context_len: int, discrete: bool):
        self.episodes, self.K, self.discrete = episodes, context_len, discrete
        self.rtg = [returns_to_go(ep.rewards).astype(np.float32) for ep in episodes]
        self.index = np.concatenate([np.stack([np.full(len(ep), i), np.arange(len(ep))], 1)
                                     for i, ep in enumerate(episodes)])

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        i, end = (int(x) for x in self.index[idx])
        ep, K = self.episodes[i], self.K
        start = max(0, end - K + 1)
        n, pad = end + 1 - start, K - (end + 1 - start)

        def window(x: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
            w = torch.as_tensor(x[start:end + 1], dtype=dtype)
            return torch.cat([w.new_zeros((pad, *w.shape[1:])), w])

        return {"states": window(ep.observations, torch.float32),
                "actions": window(ep.actions, torch.long if self.discrete else torch.float32),
                "returns_to_go": window(self.rtg[i], torch.float32),
                "timesteps": window(np.arange(len(ep)), torch.long),
                "mask": torch.cat([torch.zeros(pad), torch.ones(n)])}


class OfflineRLDataModule(L.LightningDataModule):
    """Trajectory windows from Minari / D4RL hdf5 / the built-in scripted MuJoCo datasets.

    Args:
        dataset: a Minari dataset id, a path to a D4RL-format ``.hdf5`` file, or a built-in id
            (``litpapers/halfcheetah/scripted-v0``, ``litpapers/swimmer/scripted-v0``).
        env_id: gymnasium id for evaluation rollouts; default: the env spec recorded in the Minari dataset
            (required for evaluating on hdf5 data).
        context_len: K, steps per window.
        batch_size, num_workers: DataLoader settings.
        val_fraction: fraction of episodes (at least one when > 0) held out for the validation loss.
        max_val_windows: cap on validation windows (an evenly spaced subset) to keep validation cheap.
        seed: seed of the train/val episode split.
        generate_episodes, generate_max_steps, generate_seed, generate_num_envs: built-in data generation
            settings (episodes, steps per episode, seed, vectorized envs); each setting has its own cache.
    """

    def __init__(self, dataset: str = "litpapers/halfcheetah/scripted-v0", env_id: str | None = None,
                 context_len: int = 20, batch_size: int = 64, num_workers: int = 0, val_fraction: float = 0.05,
                 max_val_windows: int = 4096, seed: int = 0, generate_episodes: int = 300,
                 generate_max_steps: int = 500, generate_seed: int = 0, generate_num_envs: int = 16):
        super().__init__()
        check_batch_size(batch_size, type(self).__name__)
        if context_len < 1:
            raise ValueError(f"context_len must be >= 1, got {context_len}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self.save_hyperparameters()
        self.dataset, self.env_id, self.context_len = dataset, env_id, context_len
        self.batch_size, self.num_workers = batch_size, num_workers
        self.val_fraction, self.max_val_windows, self.seed = val_fraction, max_val_windows, seed
        self.generate = dict(n_episodes=generate_episodes, max_episode_steps=generate_max_steps,
                             seed=generate_seed, num_envs=generate_num_envs)
        self.episodes: list[Episode] | None = None

    # -- where the data lives -------------------------------------------------------------------------------
    def is_hdf5(self) -> bool:
        return self.dataset.endswith((".hdf5", ".h5")) or Path(self.dataset).is_file()

    def builtin_root(self) -> Path:
        """Cache root of the built-in datasets for these generator settings (all of them: the number of vector
        envs changes how the seeded random numbers are consumed, so it changes the data too)."""
        g = self.generate
        return cache_dir("minari", f"e{g['n_episodes']}_t{g['max_episode_steps']}_s{g['seed']}_n{g['num_envs']}")

    def minari_datasets_root(self) -> Path | None:
        """Where to look the dataset up: our cache for built-in ids, else Minari's own root (``None``)."""
        return self.builtin_root() if self.dataset in BUILTIN_DATASETS else None

    def prepare_data(self) -> None:
        """Generate a built-in dataset once (cached); other inputs only need to exist."""
        if self.is_hdf5():
            if not Path(self.dataset).is_file():
                raise FileNotFoundError(f"D4RL hdf5 file {self.dataset!r} does not exist")
            return
        if self.dataset in BUILTIN_DATASETS:
            remove_stale_temp_roots(self.builtin_root())
        if self.dataset in BUILTIN_DATASETS and not builtin_dataset_complete(self.builtin_root(), self.dataset):
            build_builtin_dataset(self.builtin_root(), self.dataset, self.generate)

    # -- reading --------------------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.episodes is not None:
            return
        n_actions = None  # number of discrete actions, None for continuous
        if self.is_hdf5():
            episodes, env_spec = load_d4rl_hdf5(self.dataset), None
            if episodes[0].actions.ndim == 1 and np.issubdtype(episodes[0].actions.dtype, np.integer):
                n_actions = int(max(int(ep.actions.max()) for ep in episodes)) + 1
        else:
            if self.dataset in BUILTIN_DATASETS:
                self.prepare_data()  # no-op when cached; makes setup() alone enough outside a Trainer
            episodes, env_spec, space = load_minari_episodes(self.dataset, self.minari_datasets_root())
            n_actions = int(space.n) if hasattr(space, "n") else None
        self.discrete = n_actions is not None
        self._check_shapes(episodes)
        self.env_spec = env_spec
        if self.env_id is None and env_spec is not None:
            self.env_id = env_spec.id
        self.episodes = episodes
        self.episode_returns = np.array([ep.total_return for ep in episodes])
        self.total_steps = sum(len(ep) for ep in episodes)
        self.max_episode_len = max(len(ep) for ep in episodes)
        self.state_dim = episodes[0].observations.shape[1]
        self.act_dim = n_actions if self.discrete else episodes[0].actions.shape[1]
        rng = np.random.default_rng(self.seed)
        order = rng.permutation(len(episodes))
        n_val = int(round(self.val_fraction * len(episodes)))
        n_val = min(max(n_val, 1 if self.val_fraction > 0 else 0), len(episodes) - 1)
        val_eps = [episodes[i] for i in sorted(order[:n_val])]
        train_eps = [episodes[i] for i in sorted(order[n_val:])]
        obs = np.concatenate([ep.observations for ep in train_eps]).astype(np.float64)
        self.state_mean = obs.mean(0).astype(np.float32)
        self.state_std = (obs.std(0) + 1e-6).astype(np.float32)
        self.spec = OfflineRLSpec(self.dataset, self.state_dim, self.act_dim, self.discrete, self.state_mean,
                                  self.state_std, self.max_episode_len)
        self.train_set = WindowDataset(train_eps, self.context_len, self.discrete)
        self.val_set = WindowDataset(val_eps, self.context_len, self.discrete) if val_eps else None
        if self.val_set is not None and len(self.val_set) > self.max_val_windows:
            keep = np.linspace(0, len(self.val_set) - 1, self.max_val_windows).round().astype(int)
            self.val_set.index = self.val_set.index[keep]

    def _check_shapes(self, episodes: list[Episode]) -> None:
        if not episodes:
            raise ValueError(f"{self.dataset}: no episodes")
        s_dim, a_shape = episodes[0].observations.shape[1:], episodes[0].actions.shape[1:]
        if episodes[0].actions.ndim != (1 if self.discrete else 2):
            raise ValueError(f"{self.dataset}: actions must be (T, act_dim) floats or (T,) integers, got shape "
                             f"{episodes[0].actions.shape} dtype {episodes[0].actions.dtype}")
        for i, ep in enumerate(episodes):
            if ep.observations.shape[1:] != s_dim or ep.actions.shape[1:] != a_shape:
                raise ValueError(f"{self.dataset}: episode {i} has observations {ep.observations.shape} / actions "
                                 f"{ep.actions.shape}, episode 0 has {s_dim} / {a_shape} per step")
            if len(ep.observations) != len(ep) or len(ep.actions) != len(ep):
                raise ValueError(f"{self.dataset}: episode {i} has {len(ep.observations)} observations, "
                                 f"{len(ep.actions)} actions and {len(ep)} rewards")

    def make_env(self, **kwargs):
        """A fresh evaluation environment (the dataset's env spec, incl. its time limit, or ``env_id``)."""
        gym = require("gymnasium", "rl")

        if self.env_id is None:
            raise ValueError(f"{self.dataset}: no environment recorded; pass env_id=... to OfflineRLDataModule")
        if self.env_spec is not None and self.env_spec.id == self.env_id:
            return gym.make(self.env_spec, **kwargs)
        return gym.make(self.env_id, **kwargs)

    # -- loaders --------------------------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        return ResumableDataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, drop_last=True,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_set is None:
            return []
        return DataLoader(self.val_set, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers)
