"""The built-in instruction task: short prompts with *several* valid answers, each checkable by a program.

Used by MiniLLM (the teacher's distribution over answers is multimodal, which is where reverse KL's mode
seeking matters), by the preference data (a valid answer is checkably better than an invalid one) and by
QDPO (the checker scores the quantized model). Answers are a few bytes long so a byte-level tiny model can
learn them on CPU in minutes.

Every example is a dict in Dolly-15k's schema plus bookkeeping::

    {"instruction": str, "context": str, "response": str,   # one valid answer (the SFT target)
     "references": list[str],                              # all valid answers (for Rouge-L, best match)
     "task": str, "params": dict}                          # what :func:`check_answer` needs

Tasks (``TASKS``):
- ``even``: "Name an even number between A and B." — any even integer in [A, B].
- ``starts_with``: "Give a word that starts with 'x'." — any word of :data:`WORDS` with that first letter.
- ``sum_to``: "Write two numbers that add up to N." — "a+b" with a, b ≥ 0 integers and a + b = N.
- ``order``: "Write the letters x, y, z in any order." — any permutation, as "xyz".
- ``multiple``: "Name a multiple of K below M." — any positive multiple of K smaller than M.
"""

from __future__ import annotations

import itertools
import random
import re
from collections.abc import Callable

from lm.tokenizers import PROMPT_TEMPLATE

WORDS: tuple[str, ...] = (
    "apple", "arrow", "acorn", "bread", "brick", "berry", "cloud", "candle", "coral", "daisy", "dune",
    "dragon", "eagle", "ember", "engine", "flame", "frost", "feather", "grape", "glass", "garden", "harbor",
    "honey", "hill", "island", "ivory", "iron", "jelly", "jungle", "jewel", "kettle", "kite", "koala",
    "lemon", "lantern", "lake", "maple", "marble", "meadow", "night", "needle", "nest", "ocean", "olive",
    "orbit", "pearl", "piano", "pepper", "quartz", "quill", "queen", "river", "robin", "rocket", "stone",
    "silver", "spring", "tiger", "tulip", "thunder", "umbrella", "unicorn", "uncle", "violet", "valley",
    "velvet", "willow", "wagon", "winter", "yarn", "yellow", "yacht", "zebra", "zinc", "zephyr",
)
_LETTERS_WITH_WORDS = sorted({w[0] for w in WORDS})
_INT = re.compile(r"^\s*(\d+)\s*$")
_SUM = re.compile(r"^\s*(\d+)\s*\+\s*(\d+)\s*$")


def _even(rng: random.Random) -> dict:
    lo = rng.randint(2, 60)
    hi = lo + rng.randint(4, 16)
    valid = [str(n) for n in range(lo, hi + 1) if n % 2 == 0]
    return {"instruction": f"Name an even number between {lo} and {hi}.", "references": valid,
            "params": {"lo": lo, "hi": hi}}


def _starts_with(rng: random.Random) -> dict:
    letter = rng.choice(_LETTERS_WITH_WORDS)
    valid = [w for w in WORDS if w[0] == letter]
    return {"instruction": f"Give a word that starts with '{letter}'.", "references": valid,
            "params": {"letter": letter}}


def _sum_to(rng: random.Random) -> dict:
    n = rng.randint(3, 12)
    valid = [f"{a}+{n - a}" for a in range(n + 1)]
    return {"instruction": f"Write two numbers that add up to {n}.", "references": valid, "params": {"n": n}}


def _order(rng: random.Random) -> dict:
    letters = rng.sample("abcdefgh", 3)
    valid = ["".join(p) for p in itertools.permutations(letters)]
    return {"instruction": f"Write the letters {', '.join(letters)} in any order.", "references": valid,
            "params": {"letters": "".join(sorted(letters))}}


def _multiple(rng: random.Random) -> dict:
    k = rng.randint(3, 9)
    m = k * rng.randint(3, 6) + rng.randint(1, k - 1)
    valid = [str(v) for v in range(k, m, k)]
    return {"instruction": f"Name a multiple of {k} below {m}.", "references": valid, "params": {"k": k, "m": m}}


def format_prompt(instruction: str, context: str = "", template: str = PROMPT_TEMPLATE) -> str:
    """Fill ``template`` for one example. Fields: ``{instruction}``; ``{context}``; ``{context_block}`` =
    ``"### Context:\\n<context>\\n"`` (empty without context); ``{user}`` = the instruction, plus a blank line and
    the context when there is one (the user message of a chat template)."""
    context_block = f"### Context:\n{context}\n" if context else ""
    user = f"{instruction}\n\n{context}" if context else instruction
    return template.format(instruction=instruction, context=context, context_block=context_block, user=user)


TASKS: dict[str, Callable[[random.Random], dict]] = {
    "even": _even, "starts_with": _starts_with, "sum_to": _sum_to, "order": _order, "multiple": _multiple,
}


def generate_examples(n: int, seed: int = 0, tasks: tuple[str, ...] | None = None) -> list[dict]:
    """``n`` examples drawn uniformly over ``tasks`` (default: all) with a seeded generator; each example's
    ``response`` is one valid answer chosen uniformly, so an SFT model learns the whole answer distribution."""
    names = tuple(tasks or TASKS)
    unknown = set(names) - set(TASKS)
    if unknown:
        raise ValueError(f"unknown instruction task(s) {sorted(unknown)}; choose from {sorted(TASKS)}")
    rng = random.Random(seed)
    examples = []
    for _ in range(n):
        name = rng.choice(names)
        ex = TASKS[name](rng)
        ex.update(task=name, context="", response=rng.choice(ex["references"]))
        examples.append(ex)
    return examples


def check_answer(example: dict, answer: str) -> bool:
    """True iff ``answer`` (stripped) is a valid answer to ``example`` — decided by the rule, not by lookup."""
    task, p, a = example["task"], example["params"], answer.strip()
    if task == "even":
        m = _INT.match(a)
        return bool(m) and p["lo"] <= int(m.group(1)) <= p["hi"] and int(m.group(1)) % 2 == 0
    if task == "starts_with":
        return a in WORDS and a.startswith(p["letter"])
    if task == "sum_to":
        m = _SUM.match(a)
        return bool(m) and int(m.group(1)) + int(m.group(2)) == p["n"]
    if task == "order":
        return len(a) == 3 and "".join(sorted(a)) == p["letters"]
    if task == "multiple":
        m = _INT.match(a)
        return bool(m) and 0 < int(m.group(1)) < p["m"] and int(m.group(1)) % p["k"] == 0
    raise ValueError(f"unknown task {task!r}")
