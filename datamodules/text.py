"""Plain-text language-modelling data: your files, or CPython's own documentation as a built-in corpus.

Documents are tokenized, each followed by EOS, concatenated and cut into fixed blocks of ``block_size``
tokens (packing: no padding, every token is a target). The train/val split is by document, with a seed,
so no text appears on both sides.
"""

from __future__ import annotations

import logging
import random

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from datamodules.common import ResumableDataLoader, check_batch_size, resolve_tokenizer
from datamodules.io import iter_text_documents

log = logging.getLogger(__name__)


def builtin_documents() -> list[tuple[str, str]]:
    """The built-in corpus: every topic of ``pydoc_data.topics`` (~465 KB of English Python docs)."""
    from pydoc_data.topics import topics

    return [(f"pydoc_data.topics:{name}", text) for name, text in sorted(topics.items())]


def pack_blocks(token_lists: list[list[int]], block_size: int, eos_id: int | None) -> torch.Tensor:
    """Concatenate documents (each followed by ``eos_id``) and cut into (N, block_size) blocks; the tail
    shorter than a block is dropped."""
    stream: list[int] = []
    for ids in token_lists:
        stream.extend(ids)
        if eos_id is not None and (not ids or ids[-1] != eos_id):
            stream.append(eos_id)
    n = len(stream) // block_size
    return torch.tensor(stream[: n * block_size], dtype=torch.long).view(n, block_size)


def stack_blocks(rows: list[tuple[torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.stack([r[0] for r in rows])}


class TextDataModule(L.LightningDataModule):
    """Packed next-token data.

    Args:
        path: a text file, a directory (recursively: .txt/.md/.rst/.jsonl/.json), a JSONL/JSON file
            (``text_field`` of each record) or a HF dataset saved with ``save_to_disk``. ``None`` = built-in
            corpus (``pydoc_data.topics``).
        text_field: field holding the text in JSON records.
        block_size: tokens per training example.
        val_fraction: fraction of documents held out for validation.
        seed: seed of the document split.
        max_documents: keep only the first N documents (after shuffling) — for quick runs.
        tokenizer: tokenizer name/path; ``None`` uses the module's tokenizer (byte-level by default).
    """

    def __init__(self, path: str | None = None, text_field: str = "text", block_size: int = 128,
                 batch_size: int = 16, val_fraction: float = 0.05, seed: int = 0, max_documents: int | None = None,
                 tokenizer: str | None = None, num_workers: int = 0):
        super().__init__()
        check_batch_size(batch_size, type(self).__name__)
        if block_size < 2:
            raise ValueError(f"block_size must be >= 2, got {block_size}")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        self.save_hyperparameters()
        self.path, self.text_field, self.block_size = path, text_field, block_size
        self.batch_size, self.val_fraction, self.seed = batch_size, val_fraction, seed
        self.max_documents, self.tokenizer_name, self.num_workers = max_documents, tokenizer, num_workers
        self.train_blocks: torch.Tensor | None = None
        self.val_blocks: torch.Tensor | None = None

    def documents(self) -> list[tuple[str, str]]:
        docs = builtin_documents() if self.path is None else list(iter_text_documents(self.path, self.text_field))
        docs = [(src, text) for src, text in docs if text.strip()]
        if not docs:
            raise ValueError(f"no non-empty text found in {self.path or 'the built-in corpus'}")
        return docs

    def setup(self, stage: str | None = None) -> None:
        if self.train_blocks is not None:
            return
        tokenizer = resolve_tokenizer(self, self.tokenizer_name)
        docs = self.documents()
        random.Random(self.seed).shuffle(docs)
        if self.max_documents:
            docs = docs[: self.max_documents]
        n_val = max(1, round(len(docs) * self.val_fraction)) if len(docs) > 1 else 0
        encode = lambda part: [tokenizer(text, add_special_tokens=False)["input_ids"] for _, text in part]  # noqa: E731
        self.val_blocks = pack_blocks(encode(docs[:n_val]), self.block_size, tokenizer.eos_token_id)
        self.train_blocks = pack_blocks(encode(docs[n_val:]), self.block_size, tokenizer.eos_token_id)
        if len(self.train_blocks) == 0:
            raise ValueError(f"{self.path or 'built-in corpus'}: too little text for one block of "
                             f"{self.block_size} tokens")
        log.info("TextDataModule: %d documents -> %d train / %d val blocks of %d tokens", len(docs),
                 len(self.train_blocks), len(self.val_blocks), self.block_size)

    def _loader(self, blocks: torch.Tensor, shuffle: bool) -> DataLoader:
        dataset = TensorDataset(blocks)
        return ResumableDataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle,
                                   num_workers=self.num_workers, collate_fn=stack_blocks,
                                   drop_last=shuffle and len(dataset) > self.batch_size)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_blocks, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        if self.val_blocks is None or len(self.val_blocks) == 0:
            return []
        return self._loader(self.val_blocks, shuffle=False)
