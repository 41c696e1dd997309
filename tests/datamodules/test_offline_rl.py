"""OfflineRLDataModule: returns-to-go, D4RL hdf5 and Minari loading on files made here, windows, bad input,
and the built-in scripted-policy generator (tiny settings)."""

import os
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from datamodules import OfflineRLDataModule
from datamodules.offline_rl import COMPLETE_MARKER, load_minari_episodes, returns_to_go, split_d4rl_episodes


def d4rl_arrays():
    """Two episodes (3 steps ending in a terminal, 2 steps ending in a timeout) + 1 unfinished step."""
    return {"observations": np.arange(12, dtype=np.float32).reshape(6, 2),
            "actions": np.linspace(-1, 1, 6, dtype=np.float32)[:, None],
            "rewards": np.array([1, 2, 3, 10, -4, 7], np.float32),
            "terminals": np.array([0, 0, 1, 0, 0, 0], bool),
            "timeouts": np.array([0, 0, 0, 0, 1, 0], bool)}


def write_hdf5(path, data):
    with h5py.File(path, "w") as f:
        for k, v in data.items():
            f[k] = v
    return str(path)


def test_returns_to_go_hand_built_episode():
    assert returns_to_go(np.array([1.0, 2.0, 3.0, -1.0])).tolist() == [5.0, 4.0, 2.0, -1.0]


def test_d4rl_split_at_terminals_and_timeouts_drops_unfinished_tail(caplog):
    eps = split_d4rl_episodes(d4rl_arrays())
    assert [len(e) for e in eps] == [3, 2]
    assert [e.total_return for e in eps] == [6.0, 6.0]
    assert eps[1].observations.tolist() == [[6, 7], [8, 9]]
    assert "dropped 1 steps" in caplog.text


def test_hdf5_windows_left_padded_with_rtg_timesteps_and_mask(tmp_path):
    dm = OfflineRLDataModule(dataset=write_hdf5(tmp_path / "d.hdf5", d4rl_arrays()), context_len=2,
                             val_fraction=0.0, batch_size=2)
    dm.setup("fit")
    assert (dm.state_dim, dm.act_dim, dm.discrete) == (2, 1, False)
    assert len(dm.train_set) == 5  # one window ending at each of the 5 steps
    w = dm.train_set[0]  # episode 0, step 0: one padding step
    assert w["mask"].tolist() == [0, 1] and w["timesteps"].tolist() == [0, 0]
    assert w["returns_to_go"].tolist() == [0, 6] and w["states"].tolist() == [[0, 0], [0, 1]]
    w = dm.train_set[2]  # episode 0, steps 1..2
    assert w["mask"].tolist() == [1, 1] and w["timesteps"].tolist() == [1, 2]
    assert w["returns_to_go"].tolist() == [5, 3]
    w = dm.train_set[4]  # episode 1, steps 0..1
    assert w["returns_to_go"].tolist() == [6, -4] and w["states"].tolist() == [[6, 7], [8, 9]]
    obs = np.arange(10, dtype=np.float64).reshape(5, 2)
    np.testing.assert_allclose(dm.state_mean, obs.mean(0), rtol=1e-6)
    np.testing.assert_allclose(dm.state_std, obs.std(0), rtol=1e-5)
    batch = next(iter(dm.train_dataloader()))
    assert batch["states"].shape == (2, 2, 2) and batch["actions"].shape == (2, 2, 1)


@pytest.mark.parametrize("bad, message", [
    ({"drop": "timeouts"}, "missing D4RL key(s) ['timeouts']"),
    ({"rewards": np.zeros(5, np.float32)}, "'observations' has 6 rows but 'rewards' has 5"),
    ({"observations": np.zeros(6, np.float32)}, "'observations' must be 2-D"),
])
def test_hdf5_bad_input_names_file_and_field(tmp_path, bad, message):
    data, bad = d4rl_arrays(), dict(bad)
    data.pop(bad.pop("drop", None), None)
    data.update(bad)
    path = write_hdf5(tmp_path / "bad.hdf5", data)
    dm = OfflineRLDataModule(dataset=path)
    with pytest.raises((KeyError, ValueError)) as err:
        dm.setup("fit")
    assert message in str(err.value) and "bad.hdf5" in str(err.value)


def test_missing_file_and_unknown_id(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="nope.hdf5"):
        OfflineRLDataModule(dataset=str(tmp_path / "nope.hdf5")).prepare_data()
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    with pytest.raises(ValueError, match="unknown offline-RL dataset 'someone/nothing-v0'"):
        OfflineRLDataModule(dataset="someone/nothing-v0").setup("fit")


def test_minari_dataset_made_here(tmp_path, monkeypatch):
    import gymnasium as gym
    import minari
    from minari.data_collector import EpisodeBuffer

    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    buffers = [EpisodeBuffer(id=i, observations=np.full((T + 1, 3), i, np.float32),
                             actions=np.zeros((T, 2), np.float32), rewards=list(np.arange(T, dtype=float)),
                             terminations=[False] * (T - 1) + [True], truncations=[False] * T)
               for i, T in enumerate([4, 6])]
    minari.create_dataset_from_buffers("test/toy-v0", buffers, observation_space=gym.spaces.Box(-9, 9, (3,)),
                                       action_space=gym.spaces.Box(-1, 1, (2,)))
    dm = OfflineRLDataModule(dataset="test/toy-v0", context_len=3, val_fraction=0.0)
    dm.setup("fit")
    assert dm.episode_returns.tolist() == [6.0, 15.0]  # 0+1+2+3 and 0+..+5
    assert dm.total_steps == 10 and (dm.state_dim, dm.act_dim) == (3, 2)
    assert dm.train_set.episodes[1].observations.shape == (6, 3)  # the (T+1)-th observation is dropped
    assert dm.train_set[9]["returns_to_go"].tolist() == [12.0, 9.0, 5.0]


def test_builtin_generator_is_cached_seeded_and_spread():
    kw = dict(dataset="litpapers/swimmer/scripted-v0", generate_episodes=6, generate_max_steps=15,
              generate_num_envs=3, val_fraction=0.2, context_len=4)
    dm = OfflineRLDataModule(**kw)
    dm.prepare_data()
    data_file = next((dm.builtin_root() / "litpapers").rglob("main_data.hdf5"))
    stamp = data_file.stat().st_mtime_ns
    dm.setup("fit")
    assert len(dm.episode_returns) == 6 and dm.total_steps == 6 * 15
    assert dm.env_id == "Swimmer-v5" and dm.make_env().spec.max_episode_steps == 15
    assert len(dm.val_set) == 15 and len(dm.train_set) == 75  # one of 6 episodes held out
    assert np.std(dm.episode_returns) > 0
    again = OfflineRLDataModule(**kw)
    again.setup("fit")  # served from the cache: same file, same data
    assert data_file.stat().st_mtime_ns == stamp
    np.testing.assert_array_equal(again.episode_returns, dm.episode_returns)
    other_seed = OfflineRLDataModule(**{**kw, "generate_seed": 1})
    other_seed.setup("fit")
    assert not np.allclose(other_seed.episode_returns, dm.episode_returns)
    assert torch.is_tensor(dm.train_set[0]["states"])


TINY_BUILTIN = dict(dataset="litpapers/swimmer/scripted-v0", generate_episodes=2, generate_max_steps=6,
                    generate_num_envs=2, val_fraction=0.0, context_len=2)


def test_partial_builtin_cache_is_detected_and_rebuilt():
    # A run killed while Minari wrote the built-in data (older versions wrote in place) leaves data/ with a
    # truncated main_data.hdf5: it must be rebuilt, not served or reported as "not a built-in id".
    fresh = OfflineRLDataModule(**TINY_BUILTIN)
    fresh.setup("fit")
    folder = fresh.builtin_root() / TINY_BUILTIN["dataset"]
    (folder / COMPLETE_MARKER).unlink(missing_ok=True)
    data_file = folder / "data" / "main_data.hdf5"
    data_file.write_bytes(data_file.read_bytes()[:100])
    rebuilt = OfflineRLDataModule(**TINY_BUILTIN)
    rebuilt.setup("fit")
    np.testing.assert_array_equal(rebuilt.episode_returns, fresh.episode_returns)
    assert (folder / COMPLETE_MARKER).is_file() and h5py.is_hdf5(data_file)
    assert [p.name for p in fresh.builtin_root().parent.iterdir() if ".tmp-" in p.name] == []


def test_killed_builtin_generation_leaves_no_dataset_in_place(monkeypatch):
    import datamodules.offline_rl as offline_rl

    def killed_midway(dataset_id, env_id, **kw):  # writes part of the dataset under the current Minari root, dies
        partial = Path(os.environ["MINARI_DATASETS_PATH"]) / dataset_id / "data"
        partial.mkdir(parents=True)
        (partial / "main_data.hdf5").write_bytes(b"\x89HDF")
        raise KeyboardInterrupt

    monkeypatch.setattr(offline_rl, "generate_minari_dataset", killed_midway)
    dm = OfflineRLDataModule(**TINY_BUILTIN)
    with pytest.raises(KeyboardInterrupt):
        dm.prepare_data()
    assert not (dm.builtin_root() / TINY_BUILTIN["dataset"]).exists()
    assert [p.name for p in dm.builtin_root().parent.iterdir() if ".tmp-" in p.name] == []


def test_unreadable_builtin_dataset_message_says_builtin(tmp_path):
    with pytest.raises(ValueError, match="built-in offline-RL dataset 'litpapers/swimmer/scripted-v0' is missing"):
        load_minari_episodes("litpapers/swimmer/scripted-v0", tmp_path / "empty")


@pytest.mark.parametrize("field, index, shown", [("rewards", 4, "index 4"), ("observations", (2, 1), "index (2, 1)"),
                                                 ("actions", (5, 0), "index (5, 0)")])
def test_non_finite_hdf5_input_fails_with_file_field_and_index(tmp_path, field, index, shown):
    data = d4rl_arrays()
    data[field] = data[field].copy()
    data[field][index] = np.nan if field != "actions" else np.inf
    path = write_hdf5(tmp_path / "nan.hdf5", data)
    dm = OfflineRLDataModule(dataset=path, context_len=2, val_fraction=0.0)
    with pytest.raises(ValueError) as err:
        dm.setup("fit")
    msg = str(err.value)
    assert "nan.hdf5" in msg and repr(field) in msg and "1 non-finite" in msg and shown in msg


def test_non_finite_minari_reward_fails_with_episode_and_step(tmp_path, monkeypatch):
    import gymnasium as gym
    import minari
    from minari.data_collector import EpisodeBuffer

    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    rewards = [[0.0, 1.0, 2.0], [0.0, float("nan"), 2.0]]
    buffers = [EpisodeBuffer(id=i, observations=np.zeros((4, 2), np.float32), actions=np.zeros((3, 1), np.float32),
                             rewards=r, terminations=[False, False, True], truncations=[False] * 3)
               for i, r in enumerate(rewards)]
    minari.create_dataset_from_buffers("test/nan-v0", buffers, observation_space=gym.spaces.Box(-9, 9, (2,)),
                                       action_space=gym.spaces.Box(-1, 1, (1,)))
    with pytest.raises(ValueError, match=r"'test/nan-v0' .* episode 1: 'rewards' has 1 non-finite value\(s\); "
                                         r"the first, nan, at index 1"):
        OfflineRLDataModule(dataset="test/nan-v0", context_len=2).setup("fit")


def test_a_killed_builds_temporary_folder_is_removed_on_the_next_run():
    # a build killed with SIGKILL never reaches its ``finally``: its ``.<root>.tmp-<pid>`` stays next to the cache
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    dm = OfflineRLDataModule(**TINY_BUILTIN)
    root = dm.builtin_root()
    stale = root.parent / f".{root.name}.tmp-{dead.pid}"
    (stale / "data").mkdir(parents=True)
    (stale / "data" / "main_data.hdf5").write_bytes(b"\x89HDF" * 100)
    live = root.parent / f".{root.name}.tmp-{os.getppid()}"  # a live process: still building, kept
    live.mkdir()
    dm.prepare_data()
    assert not stale.exists() and live.is_dir()
