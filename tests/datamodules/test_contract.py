"""The datamodule ↔ module contract (datamodules/contract.py): the shipped classes provide what the other side
reads, and the tokenizer hand-off goes through the protocol's attribute."""

import h5py
import numpy as np

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
