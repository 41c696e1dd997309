"""Instruction-following data (prompt → response): your Dolly-style files, or the built-in checkable tasks.

Records users bring (JSONL, a JSON list, or a HF dataset saved with ``save_to_disk``) need either
``instruction`` (+ optional ``context``) and ``response`` — Dolly-15k's schema, filled into the prompt
template — or ``prompt`` and ``response``, where ``prompt`` is used verbatim. The template is the model's own
prompt format (:func:`lm.tokenizers.resolve_prompt_template`) unless one is configured; the module's
tokenizer then records the template it is trained with, so its export carries it. An optional ``references`` list is kept
for Rouge-L (default: ``[response]``). ``path=None`` is the built-in task generator of
:mod:`datamodules.instruction_tasks` (several valid answers per prompt, each checkable by
:func:`~datamodules.instruction_tasks.check_answer`).

Every batch holds, for SFT (``lit_modules.CausalLM`` trains on it unchanged)::

    input_ids, attention_mask   (B, L) prompt + response + EOS, right-padded
    labels                      (B, L) response tokens (and EOS); prompt and padding are −100

and for generation / evaluation::

    prompt_input_ids, prompt_attention_mask   (B, P) prompt only, LEFT-padded (generation appends on the right)
    examples                                  list of the B record dicts (``references``, ``task``, ``params``…)

plus ``pt_input_ids`` (B, block) when a pretraining text stream is configured (``pretrain_path`` or
``pretrain=True`` for the built-in corpus), read by :class:`datamodules.TextDataModule`'s loader.
"""

from __future__ import annotations

import functools
import logging
import random
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from datamodules.common import ResumableDataLoader, check_batch_size, resolve_tokenizer
from datamodules.instruction_tasks import format_prompt, generate_examples
from datamodules.io import read_records
from datamodules.text import TextDataModule
from lm.tensors import pad_sequences
from lm.tokenizers import PROMPT_TEMPLATE, check_prompt_template, resolve_prompt_template, set_prompt_template

log = logging.getLogger(__name__)


def load_instruction_records(path: str | None, num_examples: int = 2000, seed: int = 0,
                             template: str = PROMPT_TEMPLATE, tasks: list[str] | None = None,
                             require_response: bool = True) -> list[dict[str, Any]]:
    """Records with ``instruction``, ``context``, ``prompt`` (the filled template), ``response`` and
    ``references``; built-in records (``path=None``: ``num_examples`` seeded examples of ``tasks``) also
    carry ``task`` and ``params`` for :func:`~datamodules.instruction_tasks.check_answer`.

    Raises a ``KeyError`` naming ``file:line`` and the missing field for a record without a prompt
    (``instruction`` or ``prompt``) or — with ``require_response`` — without a ``response``.
    """
    if path is None:
        rows = generate_examples(num_examples, seed=seed, tasks=tuple(tasks) if tasks else None)
        for row in rows:
            row["prompt"] = format_prompt(row["instruction"], row["context"], template)
        return rows
    records = []
    for i, row in enumerate(read_records(path)):
        where = f"{path}:{row.get('_line', i + 1)}"
        if "instruction" in row:
            instruction, context = str(row["instruction"]), str(row.get("context") or "")
            prompt = format_prompt(instruction, context, template)
        elif "prompt" in row:
            instruction, context, prompt = str(row["prompt"]), "", str(row["prompt"])
        else:
            raise KeyError(f"{where}: record has neither 'instruction' nor 'prompt' (fields: {sorted(row)})")
        if "response" not in row and require_response:
            raise KeyError(f"{where}: record has no 'response' field (fields: {sorted(row)})")
        response = str(row.get("response") or "")
        references = row.get("references") or ([response] if response else [])
        if not isinstance(references, list):
            raise ValueError(f"{where}: 'references' must be a list of strings, got {type(references).__name__}")
        extra = {k: v for k, v in row.items() if k not in ("instruction", "context", "prompt", "response",
                                                             "references", "_line")}
        records.append(extra | {"instruction": instruction, "context": context, "prompt": prompt,
                                "response": response, "references": [str(r) for r in references],
                                "source": where})
    return records


class _EncodedExamples(Dataset):
    """Tokenized examples (prompt ids, response ids + EOS) with an optional pretraining block per index."""

    def __init__(self, records: list[dict], prompt_ids: list[list[int]], response_ids: list[list[int]],
                 pt_blocks: torch.Tensor | None = None):
        self.records, self.prompt_ids, self.response_ids, self.pt_blocks = records, prompt_ids, response_ids, pt_blocks

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        item = {"record": self.records[i], "prompt_ids": self.prompt_ids[i], "response_ids": self.response_ids[i]}
        if self.pt_blocks is not None:
            item["pt"] = self.pt_blocks[i % len(self.pt_blocks)]
        return item


def collate_instruction(items: list[dict], pad_id: int) -> dict[str, Any]:
    """Build the SFT tensors (right-padded, prompt masked to −100) and the left-padded prompts."""
    full = [it["prompt_ids"] + it["response_ids"] for it in items]
    labels = [[-100] * len(it["prompt_ids"]) + it["response_ids"] for it in items]
    prompts = [it["prompt_ids"] for it in items]
    batch = {
        "input_ids": pad_sequences(full, pad_id),
        "attention_mask": pad_sequences([[1] * len(s) for s in full], 0),
        "labels": pad_sequences(labels, -100),
        "prompt_input_ids": pad_sequences(prompts, pad_id, left=True),
        "prompt_attention_mask": pad_sequences([[1] * len(p) for p in prompts], 0, left=True),
        "examples": [it["record"] for it in items],
    }
    if "pt" in items[0]:
        batch["pt_input_ids"] = torch.stack([it["pt"] for it in items])
    return batch


class InstructionDataModule(L.LightningDataModule):
    """Prompt/response data for SFT, distillation and generation-based evaluation.

    Args:
        path: JSONL/JSON file or saved HF dataset (see module docstring); ``None`` = built-in tasks.
        template: prompt template (fields of :func:`~datamodules.instruction_tasks.format_prompt`); ``None`` =
            the model's own prompt format (its tokenizer's chat template), else ``### Instruction:…``. A template
            that differs from the model's own is used with a warning. The tokenizer then carries the template
            used (:func:`~lm.tokenizers.set_prompt_template`): the model trained here is exported with it.
        max_prompt_length: prompts longer than this keep their LAST tokens (the template's response header).
        max_response_length: responses are cut to this many tokens, EOS included.
        batch_size: examples per batch (train and val).
        val_fraction: fraction of records held out for validation (when ``num_val`` is ``None``).
        num_val: exact number of validation records (overrides ``val_fraction``).
        seed: seed of the built-in generator and of the train/val split.
        num_examples: number of built-in examples (ignored with ``path``).
        tasks: subset of built-in task names (default: all of ``instruction_tasks.TASKS``).
        pretrain_path: text data for the optional pretraining stream (any ``TextDataModule`` path).
        pretrain: use the pretraining stream; with ``pretrain_path=None`` it is the built-in corpus.
        pretrain_block_size: tokens per pretraining block.
        tokenizer: tokenizer name/path; ``None`` uses the module's tokenizer (byte-level by default).
    """

    def __init__(self, path: str | None = None, template: str | None = None, max_prompt_length: int = 256,
                 max_response_length: int = 64, batch_size: int = 16, val_fraction: float = 0.1,
                 num_val: int | None = None, seed: int = 0, num_examples: int = 2000,
                 tasks: list[str] | None = None, pretrain_path: str | None = None, pretrain: bool = False,
                 pretrain_block_size: int = 128, tokenizer: str | None = None, num_workers: int = 0):
        super().__init__()
        check_batch_size(batch_size, type(self).__name__)
        if max_prompt_length < 1 or max_response_length < 1:
            raise ValueError(f"max_prompt_length ({max_prompt_length}) and max_response_length "
                             f"({max_response_length}) must be >= 1")
        if num_val is None and not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        if template is not None:
            check_prompt_template(template, "InstructionDataModule.template")
        self.save_hyperparameters()
        self.path, self.template, self.seed = path, template, seed
        self.max_prompt_length, self.max_response_length = max_prompt_length, max_response_length
        self.batch_size, self.val_fraction, self.num_val = batch_size, val_fraction, num_val
        self.num_examples, self.tasks, self.num_workers = num_examples, tasks, num_workers
        self.pretrain = pretrain or pretrain_path is not None
        self.pretrain_path, self.pretrain_block_size = pretrain_path, pretrain_block_size
        self.tokenizer_name = tokenizer
        self.prompt_template: str | None = None  # the template in use, resolved in setup
        self.train_set: _EncodedExamples | None = None
        self.val_set: _EncodedExamples | None = None
        self.pad_id = 0

    def encode(self, tokenizer, records: list[dict]) -> tuple[list[list[int]], list[list[int]]]:
        """Prompt ids (left-truncated to ``max_prompt_length``) and response ids + EOS (≤ ``max_response_length``)."""
        eos = tokenizer.eos_token_id
        prompts, responses, cut = [], [], [0, 0]
        for r in records:
            p = tokenizer(r["prompt"], add_special_tokens=False)["input_ids"]
            y = tokenizer(r["response"], add_special_tokens=False)["input_ids"]
            cut[0] += len(p) > self.max_prompt_length
            cut[1] += len(y) > self.max_response_length - 1
            prompts.append(p[-self.max_prompt_length:])
            responses.append(y[: self.max_response_length - 1] + ([eos] if eos is not None else []))
        if any(cut):
            log.info("InstructionDataModule: truncated %d prompts (to their last %d tokens) and %d responses "
                     "(to %d tokens with EOS)", cut[0], self.max_prompt_length, cut[1], self.max_response_length)
        return prompts, responses

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        tokenizer = resolve_tokenizer(self, self.tokenizer_name)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.prompt_template = resolve_prompt_template(tokenizer, self.template, "InstructionDataModule.template")
        set_prompt_template(tokenizer, self.prompt_template)
        records = load_instruction_records(self.path, self.num_examples, self.seed, self.prompt_template, self.tasks)
        order = list(range(len(records)))
        random.Random(self.seed).shuffle(order)
        n_val = self.num_val if self.num_val is not None else max(1, round(len(records) * self.val_fraction))
        if len(records) - n_val < 1:
            raise ValueError(f"{self.path or 'built-in tasks'}: {len(records)} records leave none for training "
                             f"after holding out {n_val} for validation")
        val_recs = [records[i] for i in order[:n_val]]
        train_recs = [records[i] for i in order[n_val:]]
        pt_blocks = self._pretrain_blocks() if self.pretrain else None
        self.train_set = _EncodedExamples(train_recs, *self.encode(tokenizer, train_recs), pt_blocks)
        self.val_set = _EncodedExamples(val_recs, *self.encode(tokenizer, val_recs))
        log.info("InstructionDataModule: %d train / %d val examples from %s%s", len(train_recs), len(val_recs),
                 self.path or "the built-in tasks", f", {len(pt_blocks)} pretraining blocks" if self.pretrain else "")

    def _pretrain_blocks(self) -> torch.Tensor:
        text = TextDataModule(path=self.pretrain_path, block_size=self.pretrain_block_size, seed=self.seed,
                              tokenizer=self.tokenizer_name)
        text.trainer = self.trainer  # so it resolves the same (module's) tokenizer
        text.setup("fit")
        return text.train_blocks

    def _loader(self, dataset: _EncodedExamples, shuffle: bool) -> DataLoader:
        return ResumableDataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers,
                          collate_fn=functools.partial(collate_instruction, pad_id=self.pad_id),
                          drop_last=shuffle and len(dataset) > self.batch_size)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)
