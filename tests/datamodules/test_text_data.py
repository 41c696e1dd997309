import json

import pytest
import torch

from datamodules.text import TextDataModule, pack_blocks
from lm.tokenizers import byte_tokenizer


def test_pack_blocks_concatenates_with_eos_and_drops_tail():
    blocks = pack_blocks([[5, 6, 7], [8, 9]], block_size=3, eos_id=1)
    # stream: 5 6 7 1 8 9 1 -> two full blocks, tail [1] dropped
    assert blocks.tolist() == [[5, 6, 7], [1, 8, 9]]


def test_byte_tokenizer_round_trip():
    tok = byte_tokenizer()
    ids = tok("héllo", add_special_tokens=False)["input_ids"]
    assert ids == [b + 3 for b in "héllo".encode()]
    assert tok.decode(ids) == "héllo"


def test_builtin_corpus_split_by_document_is_seeded_and_disjoint():
    dm = TextDataModule(block_size=64, batch_size=4, val_fraction=0.1, seed=3, max_documents=40)
    dm.setup("fit")
    again = TextDataModule(block_size=64, batch_size=4, val_fraction=0.1, seed=3, max_documents=40)
    again.setup("fit")
    assert torch.equal(dm.train_blocks, again.train_blocks) and torch.equal(dm.val_blocks, again.val_blocks)
    other = TextDataModule(block_size=64, batch_size=4, val_fraction=0.1, seed=4, max_documents=40)
    other.setup("fit")
    assert not torch.equal(dm.val_blocks[:1], other.val_blocks[:1])
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (4, 64)


def test_reads_text_dir_jsonl_and_saved_hf_dataset(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("alpha " * 50)
    (tmp_path / "d" / "b.md").write_text("beta " * 50)
    dm = TextDataModule(path=str(tmp_path / "d"), block_size=16, batch_size=2, val_fraction=0.5)
    assert {t[:5] for _, t in dm.documents()} == {"alpha", "beta "}

    rows = [{"text": "gamma " * 40}, {"text": "delta " * 40}]
    (tmp_path / "r.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    dm = TextDataModule(path=str(tmp_path / "r.jsonl"), block_size=16, batch_size=2, val_fraction=0.5)
    dm.setup("fit")
    # one document per side, 240 bytes + EOS = 241 tokens each -> 15 blocks of 16 per side
    assert dm.train_blocks.shape == (15, 16) and dm.val_blocks.shape == (15, 16)

    from datasets import Dataset

    Dataset.from_list(rows).save_to_disk(str(tmp_path / "hf"))
    dm = TextDataModule(path=str(tmp_path / "hf"), block_size=16)
    assert [t for _, t in dm.documents()] == [r["text"] for r in rows]


@pytest.mark.parametrize("content, suffix, match", [
    (None, ".txt", "does not exist"),
    (b"", ".txt", "no non-empty text"),
    (b"\xff\xfe\xfa bad", ".txt", "not UTF-8"),
    (b'{"text": "ok"}\n{"txt": "missing"}\n', ".jsonl", r"r\.jsonl:2: record has no 'text'"),
    (b'{"text": "ok"}\nnot json\n', ".jsonl", r"r\.jsonl:2: invalid JSON"),
])
def test_bad_files_raise_one_clear_error(tmp_path, content, suffix, match):
    path = tmp_path / f"r{suffix}"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises((FileNotFoundError, ValueError, KeyError), match=match):
        TextDataModule(path=str(path), block_size=8).setup("fit")


def test_too_little_text_for_a_block(tmp_path):
    (tmp_path / "a.txt").write_text("hi")
    (tmp_path / "b.txt").write_text("yo")
    with pytest.raises(ValueError, match="too little text"):
        TextDataModule(path=str(tmp_path), block_size=64).setup("fit")


def test_resumable_loader_continues_mid_epoch_and_leaves_the_global_rng_alone():
    from datamodules.common import ResumableDataLoader

    data = list(range(23))
    loader = ResumableDataLoader(data, batch_size=4, shuffle=True, drop_last=True)
    epochs = []
    for epoch in range(2):
        loader.sampler.set_epoch(epoch)
        epochs.append([b.tolist() for b in loader])
    for batches in epochs:  # 5 full batches of distinct indices each epoch, the tail of 3 dropped
        flat = [i for b in batches for i in b]
        assert len(batches) == 5 and len(set(flat)) == 20 and set(flat) <= set(data)
    assert epochs[0] != epochs[1]

    loader.sampler.set_epoch(1)
    rng = torch.get_rng_state()
    it = iter(loader)
    served = [next(it).tolist() for _ in range(2)]
    state = loader.state_dict()
    assert served == epochs[1][:2] and state["epoch"] == 1 and state["batches"] == 2
    assert torch.equal(torch.get_rng_state(), rng)  # shuffling and iterators draw nothing from the global RNG

    torch.manual_seed(123)  # a fresh run: different global state, hence a different sampler seed
    resumed = ResumableDataLoader(data, batch_size=4, shuffle=True, drop_last=True)
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(1)
    assert [b.tolist() for b in resumed] == epochs[1][2:]  # the rest of the interrupted epoch, nothing repeated
    resumed.sampler.set_epoch(1)
    assert [b.tolist() for b in resumed] == epochs[1]  # the saved position applies to one pass only
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(2)  # the saved epoch is over: a new epoch starts from its beginning
    assert len([b for b in resumed]) == 5
