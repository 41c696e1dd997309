"""The sensitive-sequence tasks of "Transformers need glasses!" (Barbero et al., NeurIPS 2024, §3 and §6).

Each example is a short prompt over a sequence of digits and a numeric answer, written compactly so a
byte-level tiny model learns them on CPU (digits are single tokens under the byte-level tokenizer)::

    first:7250913=7          copy the first digit            (relevant token at the start)
    last:7250913=3           copy the last digit             (relevant token at the end)
    count:11111111=8         count the ones                  (paper: counting a run of ones)
    sum:1+1+1+1=4            sum of ones                     (paper: 1+1+…+1)
    odd:4444494444=9         the one digit that differs      (relevant token anywhere: the U-shape probe)

``length`` is the number of digits (ones for ``count``/``sum``). ``separator=","`` with ``separator_every=3``
inserts a comma after every third digit (``111,111,11``) — the paper's fix against representational collapse;
``sum`` always uses ``+`` between its ones. Copy tasks use random digits (the paper's "1…10"/"01…1" prompts
have a constant answer, which a trained model would learn without reading the sequence).

Every example is a dict ``{"prompt", "answer", "task", "length", "position"}`` where ``position`` is the
relative position in [0, 1] of the token that decides the answer (``None`` for ``count``/``sum``).
"""

from __future__ import annotations

import logging
import random

import lightning as L
import torch
from torch.utils.data import DataLoader

from datamodules.common import ResumableDataLoader, check_batch_size, resolve_tokenizer
from datamodules.io import read_records
from lm.tensors import pad_sequences

log = logging.getLogger(__name__)

TASKS: tuple[str, ...] = ("copy_first", "copy_last", "count_ones", "sum_ones", "find_odd")
_TAGS = {"copy_first": "first", "copy_last": "last", "count_ones": "count", "sum_ones": "sum", "find_odd": "odd"}


def format_digits(digits: str, separator: str = "", every: int = 3) -> str:
    """``digits`` with ``separator`` inserted after every ``every`` digits (none after the last group)."""
    if not separator:
        return digits
    return separator.join(digits[i:i + every] for i in range(0, len(digits), every))


def make_example(task: str, length: int, rng: random.Random, separator: str = "",
                 separator_every: int = 3) -> dict:
    """One seeded example of ``task`` over ``length`` digits (see the module docstring for the formats)."""
    if task not in _TAGS:
        raise ValueError(f"unknown task {task!r}; choose from {list(TASKS)}")
    if length < 1 or (task == "find_odd" and length < 3):
        raise ValueError(f"length {length} too short for task {task!r} (needs >= {3 if task == 'find_odd' else 1})")
    position: float | None = None
    if task in ("copy_first", "copy_last"):
        digits = "".join(rng.choice("0123456789") for _ in range(length))
        answer = digits[0] if task == "copy_first" else digits[-1]
        position = 0.0 if task == "copy_first" else 1.0
    elif task == "find_odd":
        base, odd = rng.sample("0123456789", 2)
        index = rng.randrange(length)
        digits = base * index + odd + base * (length - index - 1)
        answer, position = odd, index / (length - 1)
    else:
        digits, answer = "1" * length, str(length)
    body = "+".join(digits) if task == "sum_ones" else format_digits(digits, separator, separator_every)
    return {"prompt": f"{_TAGS[task]}:{body}=", "answer": answer, "task": task, "length": length,
            "position": position}


def generate_examples(n: int, tasks: tuple[str, ...] = TASKS, min_length: int = 1, max_length: int = 32,
                      separator: str = "", separator_every: int = 3, seed: int = 0) -> list[dict]:
    """``n`` examples, tasks drawn uniformly, lengths uniform in [min_length, max_length] (3+ for find_odd)."""
    if min_length > max_length:
        raise ValueError(f"min_length={min_length} > max_length={max_length}")
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        task = rng.choice(tasks)
        lo = max(min_length, 3) if task == "find_odd" else min_length
        out.append(make_example(task, rng.randint(lo, max(lo, max_length)), rng, separator, separator_every))
    return out


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without the tokenizer's trailing specials, after its BOS when it has one."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = getattr(tokenizer, "bos_token_id", None)
    return ([bos] if bos is not None else []) + list(ids)


def encode_example(tokenizer, example: dict) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)``: prompt + answer + EOS; labels are −100 on the prompt (loss on the answer only)."""
    prompt = encode_prompt(tokenizer, example["prompt"])
    answer = list(tokenizer(example["answer"], add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is not None:
        answer.append(tokenizer.eos_token_id)
    return prompt + answer, [-100] * len(prompt) + answer


def read_examples(path: str) -> list[dict]:
    """Examples from a JSONL/JSON/saved-HF-dataset file with string fields ``prompt`` and ``answer``."""
    rows = read_records(path)
    out = []
    for i, row in enumerate(rows):
        where = f"{path}:{row.get('_line', i + 1)}"
        for field in ("prompt", "answer"):
            if not isinstance(row.get(field), str):
                raise ValueError(f"{where}: field {field!r} missing or not a string")
        out.append({"prompt": row["prompt"], "answer": row["answer"], "task": row.get("task", "custom"),
                    "length": row.get("length"), "position": row.get("position")})
    return out


class SequenceTasksDataModule(L.LightningDataModule):
    """Prompt → answer data for the paper's copying/counting/summing tasks (loss on the answer tokens only).

    Args:
        path: ``None`` = the built-in seeded generator; otherwise a JSONL/JSON file or saved HF dataset with
            ``prompt``/``answer`` string fields (split into train/val by ``val_fraction``).
        tasks: subset of ``TASKS``.
        min_length, max_length: range of sequence lengths (digits) of the generated training examples.
        val_max_length: longest validation length (default ``max_length``; larger tests length generalisation).
        separator, separator_every: e.g. ``","`` and 3 for ``111,111,1``.
        num_train, num_val: number of generated examples.
        tokenizer: name/path; ``None`` uses the module's tokenizer (byte-level by default).

    The generated data is a pure function of the arguments (seeded), so every rank builds the same set in
    ``setup``; nothing is cached on disk.
    """

    def __init__(self, path: str | None = None, tasks: list[str] | None = None, min_length: int = 1,
                 max_length: int = 32, val_max_length: int | None = None, separator: str = "",
                 separator_every: int = 3, num_train: int = 20000, num_val: int = 500, val_fraction: float = 0.05,
                 batch_size: int = 64, seed: int = 0, tokenizer: str | None = None, num_workers: int = 0):
        super().__init__()
        check_batch_size(batch_size, type(self).__name__)
        tasks = list(TASKS) if tasks is None else list(tasks)
        unknown = [t for t in tasks if t not in TASKS]
        if unknown or not tasks:
            raise ValueError(f"tasks={tasks}: unknown {unknown}; choose from {list(TASKS)}")
        if min_length < 1 or min_length > max_length:
            raise ValueError(f"need 1 <= min_length <= max_length, got {min_length}, {max_length}")
        if separator_every < 1:
            raise ValueError(f"separator_every must be >= 1, got {separator_every}")
        self.save_hyperparameters()
        self.path, self.tasks = path, tuple(tasks)
        self.min_length, self.max_length = min_length, max_length
        self.val_max_length = val_max_length or max_length
        self.separator, self.separator_every = separator, separator_every
        self.num_train, self.num_val, self.val_fraction = num_train, num_val, val_fraction
        self.batch_size, self.seed, self.tokenizer_name, self.num_workers = batch_size, seed, tokenizer, num_workers
        self.tokenizer = None
        self.train_examples: list[dict] | None = None
        self.val_examples: list[dict] | None = None

    def examples(self) -> tuple[list[dict], list[dict]]:
        """(train, val) example dicts, before tokenization."""
        if self.path is not None:
            rows = read_examples(self.path)
            random.Random(self.seed).shuffle(rows)
            n_val = max(1, round(len(rows) * self.val_fraction)) if len(rows) > 1 else 0
            return rows[n_val:], rows[:n_val]
        kw = dict(tasks=self.tasks, separator=self.separator, separator_every=self.separator_every)
        train = generate_examples(self.num_train, min_length=self.min_length, max_length=self.max_length,
                                  seed=self.seed, **kw)
        val = generate_examples(self.num_val, min_length=self.min_length, max_length=self.val_max_length,
                                seed=self.seed + 1, **kw)
        return train, val

    def setup(self, stage: str | None = None) -> None:
        if self.train_examples is not None:
            return
        self.tokenizer = resolve_tokenizer(self, self.tokenizer_name)
        self.train_examples, self.val_examples = self.examples()
        log.info("SequenceTasksDataModule: %d train / %d val examples (%s)", len(self.train_examples),
                 len(self.val_examples), self.path or "generated")

    def collate(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        pairs = [encode_example(self.tokenizer, ex) for ex in examples]
        pad = self.tokenizer.pad_token_id
        input_ids = pad_sequences([p[0] for p in pairs], pad)
        return {"input_ids": input_ids,
                "attention_mask": pad_sequences([[1] * len(p[0]) for p in pairs], 0),
                "labels": pad_sequences([p[1] for p in pairs], -100)}

    def _loader(self, examples: list[dict], shuffle: bool) -> DataLoader:
        return ResumableDataLoader(examples, batch_size=self.batch_size, shuffle=shuffle, collate_fn=self.collate,
                                   num_workers=self.num_workers,
                                   drop_last=shuffle and len(examples) > self.batch_size)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_examples, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_examples, shuffle=False)
