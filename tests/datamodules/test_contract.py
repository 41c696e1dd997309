"""The datamodule ↔ module contract (datamodules/contract.py): the shipped classes provide what the other side
reads, and the tokenizer hand-off goes through the protocol's attribute."""

import h5py
import numpy as np
import pytest

from datamodules import OfflineRLDataModule, PreferenceDataModule, TextDataModule
from datamodules.common import resolve_tokenizer
from datamodules.contract import OfflineRLSource, PairModelSource, PairsSource, TokenizerSource


def test_language_modules_are_tokenizer_sources_and_the_datamodule_reads_it():
    from lit_modules import CausalLM

    module = CausalLM(model={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                             "num_attention_heads": 2, "num_key_value_heads": 2})
    assert isinstance(module, TokenizerSource)
    marker = object()

    class Source:
        tokenizer = marker

    class Trainer:
        lightning_module = Source()

    dm = TextDataModule()
    dm.trainer = Trainer()
    assert resolve_tokenizer(dm, None) is marker  # the module's tokenizer, not a fresh byte-level one


def test_qdpo_provides_pair_models_and_preference_data_provides_pairs():
    from lit_modules import DPO, QDPO

    assert issubclass(QDPO, PairModelSource)
    assert not issubclass(DPO, PairModelSource)  # plain DPO cannot make QDPO pairs
    dm = PreferenceDataModule.from_records([{"prompt": "p", "chosen": "a", "rejected": "b"}] * 2, val_fraction=0.0)
    dm.setup("fit")
    assert isinstance(dm, PairsSource) and len(dm.pairs) == 2


def test_offline_rl_datamodule_is_an_offline_rl_source(tmp_path):
    path = tmp_path / "d.hdf5"
    with h5py.File(path, "w") as f:
        f["observations"] = np.arange(8, dtype=np.float32).reshape(4, 2)
        f["actions"] = np.zeros((4, 1), np.float32)
        f["rewards"] = np.ones(4, np.float32)
        f["terminals"] = np.array([0, 1, 0, 1], bool)
        f["timeouts"] = np.zeros(4, bool)
    dm = OfflineRLDataModule(dataset=str(path), context_len=2, val_fraction=0.0)
    assert not isinstance(dm, OfflineRLSource)  # the attributes appear at setup
    dm.setup("fit")
    assert isinstance(dm, OfflineRLSource)
    assert (dm.state_dim, dm.act_dim) == (2, 1) and dm.state_mean.shape == dm.state_std.shape == (2,)
    # the one object the policies read: observations 0..7 as 4 rows of 2 -> means (0+2+4+6)/4, (1+3+5+7)/4
    assert (dm.spec.state_dim, dm.spec.act_dim, dm.spec.discrete, dm.spec.max_episode_len) == (2, 1, False, 2)
    assert np.allclose(dm.spec.state_mean, [3.0, 4.0]) and np.allclose(dm.spec.state_std, [5 ** 0.5] * 2)


def test_return_conditioned_policies_read_the_data_spec_and_nothing_else():
    """RADT/DT size themselves and set their normalisation from ``datamodule.spec`` alone: a datamodule that
    has nothing but a spec is enough."""
    from types import SimpleNamespace

    from datamodules.contract import OfflineRLSpec
    from lit_modules import RADT

    spec = OfflineRLSpec("toy", state_dim=3, act_dim=2, discrete=False, state_mean=np.array([1.0, 2.0, 3.0]),
                         state_std=np.array([0.5, 1.0, 2.0]), max_episode_len=7)
    module = RADT(embed_dim=16, n_layers=1, n_heads=1, max_timestep=8)
    module._trainer = SimpleNamespace(datamodule=SimpleNamespace(spec=spec))
    module.setup("fit")
    assert (module.state_dim, module.act_dim, module.discrete) == (3, 2, False)
    module.configure_model()  # the trainer's next step: the networks get weights, the buffers the data's statistics
    assert module.state_mean.tolist() == [1.0, 2.0, 3.0] and module.state_std.tolist() == [0.5, 1.0, 2.0]
    too_long = OfflineRLSpec("toy", 3, 2, False, spec.state_mean, spec.state_std, max_episode_len=9)
    module._trainer = SimpleNamespace(datamodule=SimpleNamespace(spec=too_long))
    with pytest.raises(ValueError, match="episodes of toy reach 9 steps > max_timestep=8"):
        module.setup("fit")
