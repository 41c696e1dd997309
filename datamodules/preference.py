"""Preference pairs (prompt, chosen, rejected) for DPO-style training: your files, in-memory rows, or a built-in
default generated from the instruction tasks, where the chosen answer passes ``check_answer`` and the rejected
one is a plausible answer that fails it.

Batches (what :class:`lit_modules.DPO` consumes) hold B pairs as 2B rows, chosen first::

    input_ids      (2B, T)  rows 0..B-1 = prompt+chosen, rows B..2B-1 = prompt+rejected, right-padded
    attention_mask (2B, T)  1 on real tokens
    response_mask  (2B, T)  1 on response tokens only (the answer and its EOS); prompt and padding are 0
    index          (B,)     stable id of each pair (its position in the dataset after dropping identical pairs)
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from datamodules.common import ResumableDataLoader, check_batch_size, resolve_tokenizer
from datamodules.instruction_tasks import TASKS, WORDS, check_answer, format_prompt, generate_examples
from datamodules.io import read_records
from lm.tensors import pad_sequences
from lm.tokenizers import PROMPT_TEMPLATE, check_prompt_template, resolve_prompt_template

log = logging.getLogger(__name__)


def corrupt_answer(example: dict, rng: random.Random, max_tries: int = 1000) -> str:
    """A plausible *invalid* answer to an instruction-task ``example``: same format as a valid one (a number
    near the range, a real word, "a+b", three letters), rejected by :func:`check_answer`."""
    task, p = example["task"], example["params"]
    for _ in range(max_tries):
        if task == "even":
            cand = str(rng.randint(max(0, p["lo"] - 8), p["hi"] + 8))
        elif task == "starts_with":
            cand = rng.choice(WORDS)
        elif task == "sum_to":
            cand = f"{rng.randint(0, p['n'] + 3)}+{rng.randint(0, p['n'] + 3)}"
        elif task == "order":
            cand = "".join(rng.sample("abcdefgh", 3))
        elif task == "multiple":
            cand = str(rng.randint(1, p["m"] + p["k"]))
        else:
            raise ValueError(f"unknown task {task!r}")
        if not check_answer(example, cand):
            return cand
    raise RuntimeError(f"no invalid answer found for {example['instruction']!r}")


def builtin_preference_records(n: int, seed: int = 0, tasks: Sequence[str] | None = None,
                               template: str = PROMPT_TEMPLATE) -> list[dict]:
    """``n`` pairs from :func:`datamodules.instruction_tasks.generate_examples`, prompts filled into ``template``:
    chosen = a valid answer, rejected = :func:`corrupt_answer`. Each row keeps the task ``example`` so answers
    can be checked."""
    rng = random.Random(seed + 1)
    rows = []
    for ex in generate_examples(n, seed=seed, tasks=tuple(tasks) if tasks else None):
        rows.append({"prompt": format_prompt(ex["instruction"], ex["context"], template), "chosen": ex["response"],
                     "rejected": corrupt_answer(ex, rng), "example": ex})
    return rows


def _where(row: dict, i: int, source: str) -> str:
    return f"{source}:{row['_line']}" if "_line" in row else f"{source} row {i}"


def _check_messages(value: Any, field: str, where: str) -> None:
    if not (isinstance(value, list) and value and all(isinstance(m, dict) and "role" in m and "content" in m
                                                      for m in value)):
        raise ValueError(f"{where}: field {field!r} must be a string or a non-empty list of "
                         f"{{'role', 'content'}} messages, got {type(value).__name__}")


def _check_answer_not_empty(value: Any, field: str, where: str) -> None:
    """An empty (or blank) ``chosen``/``rejected`` answer is a broken row, not a pair to learn from: raise naming
    the row and the field. A message list counts as empty when every message's content is blank."""
    if isinstance(value, str):
        empty = not value.strip()
    elif isinstance(value, list):
        empty = all(isinstance(m, dict) and not str(m.get("content", "")).strip() for m in value)
    else:
        return  # wrong types are reported by the checks that follow
    if empty:
        raise ValueError(f"{where}: field {field!r} is empty")


class PreferenceDataModule(L.LightningDataModule):
    """Preference pairs from a file, from in-memory rows, or built in.

    Args:
        path: JSONL / JSON list / HF dataset saved with ``save_to_disk``, rows with ``prompt``, ``chosen``,
            ``rejected``: strings, or chat message lists (``[{"role": ..., "content": ...}]``; the prompt's
            messages end before the answer, ``chosen``/``rejected`` hold the assistant turn(s)) rendered with
            the tokenizer's chat template (or ``chat_template``). ``None`` = the built-in instruction pairs.
        prompt_field, chosen_field, rejected_field: field names in the rows.
        num_examples, tasks: size and tasks (``datamodules.instruction_tasks.TASKS``) of the built-in data.
        max_prompt_length: prompts longer than this keep their last tokens.
        max_length: prompt + response tokens; longer responses are cut at the end (counted and logged).
        batch_size: pairs per batch (a batch has 2·batch_size sequences).
        val_fraction: fraction of pairs held out for validation (seeded split).
        seed: seed of the built-in generator and of the split.
        tokenizer: tokenizer name/path; ``None`` uses the module's tokenizer (byte-level by default).
        chat_template: a Jinja chat template for tokenizers without one (only for message-list rows).
        template: prompt template of the built-in pairs; ``None`` = the model's own prompt format
            (:func:`lm.tokenizers.resolve_prompt_template`; a different one is used with a warning).
        num_workers: DataLoader worker processes.

    Subclasses (or :meth:`from_records`) can supply rows in memory by overriding :meth:`records`.
    """

    def __init__(self, path: str | None = None, prompt_field: str = "prompt", chosen_field: str = "chosen",
                 rejected_field: str = "rejected", num_examples: int = 2000, tasks: list[str] | None = None,
                 max_prompt_length: int = 128, max_length: int = 256, batch_size: int = 8,
                 val_fraction: float = 0.1, seed: int = 0, tokenizer: str | None = None,
                 chat_template: str | None = None, template: str | None = None, num_workers: int = 0):
        super().__init__()
        check_batch_size(batch_size, type(self).__name__)
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if max_prompt_length < 1 or max_length <= max_prompt_length:
            raise ValueError(f"need 1 <= max_prompt_length < max_length, got {max_prompt_length}, {max_length}")
        if tasks is not None and set(tasks) - set(TASKS):
            raise ValueError(f"unknown tasks {sorted(set(tasks) - set(TASKS))}; choose from {sorted(TASKS)}")
        self.save_hyperparameters()
        self.path, self.fields = path, (prompt_field, chosen_field, rejected_field)
        self.num_examples, self.tasks, self.seed = num_examples, tasks, seed
        self.max_prompt_length, self.max_length = max_prompt_length, max_length
        self.batch_size, self.val_fraction, self.num_workers = batch_size, val_fraction, num_workers
        self.tokenizer_name, self.chat_template = tokenizer, chat_template
        self.template = check_prompt_template(template, f"{type(self).__name__}.template") if template else None
        self.prompt_template = PROMPT_TEMPLATE  # the built-in pairs' template, resolved against the model in setup
        self._records: list[dict] | None = None
        self.pairs: list[dict] | None = None       # every kept pair, position = "index"
        self.train_pairs: list[dict] = []
        self.val_pairs: list[dict] = []
        self.num_dropped_identical = 0
        self.num_truncated = 0

    @classmethod
    def from_records(cls, records: list[dict], **kwargs) -> PreferenceDataModule:
        """A datamodule over in-memory rows (same fields and checks as a file's)."""
        dm = cls(**kwargs)
        dm._records = list(records)
        return dm

    # ---------------------------------------------------------------- rows
    #: answers are a model's own generations: an empty one means the model ended at once, and its response is EOS
    #: alone (a real answer, and often the worst); in a user's file an empty answer is a broken row (an error)
    generated_answers = False

    def source_name(self) -> str:
        return str(self.path) if self.path is not None else ("records" if self._records is not None else "built-in")

    def records(self) -> list[dict]:
        """Raw rows: in-memory ones, else the file's, else the built-in pairs. Override to generate your own."""
        if self._records is not None:
            return self._records
        if self.path is not None:
            return read_records(self.path)
        return builtin_preference_records(self.num_examples, self.seed, self.tasks, self.prompt_template)

    def _texts(self, row: dict, i: int, tokenizer, source: str) -> tuple[str, str, str]:
        where = _where(row, i, source)
        missing = [f for f in self.fields if f not in row]
        if missing:
            raise KeyError(f"{where}: missing field(s) {missing} (fields: {sorted(k for k in row if k != '_line')})")
        prompt, chosen, rejected = (row[f] for f in self.fields)
        if not self.generated_answers:
            for field, answer in zip(self.fields[1:], (chosen, rejected)):
                _check_answer_not_empty(answer, field, where)
        if all(isinstance(v, str) for v in (prompt, chosen, rejected)):
            return prompt, chosen, rejected
        for field, value in zip(self.fields, (prompt, chosen, rejected)):
            if not isinstance(value, str):
                _check_messages(value, field, where)
        if isinstance(prompt, str) or isinstance(chosen, str) or isinstance(rejected, str):
            raise ValueError(f"{where}: {self.fields} must be all strings or all message lists")
        return self._render_chat(prompt, chosen, rejected, tokenizer, where)

    def _render_chat(self, prompt: list, chosen: list, rejected: list, tokenizer, where: str):
        template = self.chat_template or getattr(tokenizer, "chat_template", None)
        if not template:
            raise ValueError(f"{where}: rows are chat messages but the tokenizer has no chat template; "
                             "pass --data.chat_template")
        render = lambda msgs, gen: tokenizer.apply_chat_template(  # noqa: E731
            msgs, chat_template=template, tokenize=False, add_generation_prompt=gen)
        prompt_text = render(prompt, True)
        responses = []
        for field, answer in zip(self.fields[1:], (chosen, rejected)):
            full = render(prompt + answer, False)
            if not full.startswith(prompt_text):
                raise ValueError(f"{where}: the chat template's rendering of prompt+{field} does not start with "
                                 "the rendered prompt; cannot separate prompt from response")
            responses.append(full[len(prompt_text):])
        return prompt_text, responses[0], responses[1]

    def build_pairs(self, rows: list[dict], tokenizer) -> list[dict]:
        """Tokenize rows into ``{"index", "prompt_ids", "chosen_ids", "rejected_ids", "row"}``; identical
        chosen/rejected pairs are dropped and counted; over-long prompts/responses are truncated and counted."""
        source, pairs = self.source_name(), []
        eos = tokenizer.eos_token_id
        self.num_dropped_identical = self.num_truncated = 0
        for i, row in enumerate(rows):
            if not isinstance(row, dict):
                raise ValueError(f"{source} row {i}: expected a dict, got {type(row).__name__}")
            prompt, chosen, rejected = self._texts(row, i, tokenizer, source)
            if chosen == rejected:
                self.num_dropped_identical += 1
                continue
            encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
            full_prompt = encode(prompt)
            prompt_ids = full_prompt[-self.max_prompt_length:]
            budget = self.max_length - len(prompt_ids)
            full_responses = []
            for text in (chosen, rejected):
                ids = encode(text)
                full_responses.append(ids + [eos] if eos is not None and (not ids or ids[-1] != eos) else ids)
            responses = [ids[:budget] for ids in full_responses]
            truncated = len(full_prompt) > len(prompt_ids) or any(len(r) > budget for r in full_responses)
            self.num_truncated += int(truncated)
            pairs.append({"index": len(pairs), "prompt_ids": prompt_ids, "chosen_ids": responses[0],
                          "rejected_ids": responses[1], "row": row})
        if self.num_dropped_identical:
            log.warning("PreferenceDataModule: dropped %d pair(s) with identical chosen and rejected from %s",
                        self.num_dropped_identical, source)
        if self.num_truncated:
            log.warning("PreferenceDataModule: truncated %d pair(s) from %s to max_prompt_length=%d / "
                        "max_length=%d", self.num_truncated, source, self.max_prompt_length, self.max_length)
        if not pairs:
            chosen, rejected = self.fields[1:]
            why = (f"every row's {chosen!r} equals its {rejected!r} (first: {_where(rows[0], 0, source)})"
                   if rows and self.num_dropped_identical == len(rows) else "no rows")
            raise ValueError(f"{source}: no usable preference pairs: {why}")
        return pairs

    def setup(self, stage: str | None = None) -> None:
        if self.pairs is not None:
            return
        tokenizer = resolve_tokenizer(self, self.tokenizer_name)
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        if self.path is None and self._records is None:
            self.prompt_template = resolve_prompt_template(tokenizer, self.template, "PreferenceDataModule.template")
        self.pairs = self.build_pairs(self.records(), tokenizer)
        order = list(range(len(self.pairs)))
        random.Random(self.seed).shuffle(order)
        n_val = round(len(order) * self.val_fraction)
        self.val_pairs = [self.pairs[i] for i in sorted(order[:n_val])]
        self.train_pairs = [self.pairs[i] for i in sorted(order[n_val:])]
        log.info("PreferenceDataModule: %d pairs from %s -> %d train / %d val", len(self.pairs),
                 self.source_name(), len(self.train_pairs), len(self.val_pairs))

    # ---------------------------------------------------------------- batches
    def collate(self, pairs: list[dict]) -> dict[str, torch.Tensor]:
        """B pairs → the 2B-row batch described in the module docstring."""
        seqs, masks = [], []
        for key in ("chosen_ids", "rejected_ids"):
            for p in pairs:
                seqs.append(p["prompt_ids"] + p[key])
                masks.append([0] * len(p["prompt_ids"]) + [1] * len(p[key]))
        input_ids = pad_sequences(seqs, self.pad_token_id)
        attention_mask = pad_sequences([[1] * len(s) for s in seqs], 0)
        return {"input_ids": input_ids, "attention_mask": attention_mask,
                "response_mask": pad_sequences(masks, 0),
                "index": torch.tensor([p["index"] for p in pairs], dtype=torch.long)}

    def _loader(self, pairs: list[dict], shuffle: bool) -> DataLoader:
        return ResumableDataLoader(pairs, batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers,
                          collate_fn=self.collate, drop_last=shuffle and len(pairs) > self.batch_size)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_pairs, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader(self.val_pairs, shuffle=False) if self.val_pairs else []

    def all_dataloader(self) -> DataLoader:
        """Every pair once, in index order (used to precompute reference log-probs)."""
        return self._loader(self.pairs, shuffle=False)
