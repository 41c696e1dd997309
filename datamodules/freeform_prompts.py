"""Built-in free-form instructions: open-ended prompts with no single right answer and no checker.

QDPO aligns a quantized chat model with its full-precision self on *any* instruction (docs/papers.md §4), not only
on checkable tasks; these prompts are that case, offline. Each instruction is one of :data:`TEMPLATES` filled with
a topic of its kind (:data:`TOPICS`: things to explain or describe, activities to give tips for), e.g. "Explain
photosynthesis in one sentence." or "Give two tips for learning a language."; all were written for this module.

Held-out separation is by construction: the topics of each kind are split once, by a fixed rule, into a ``"train"``
part and a ``"heldout"`` part (every :data:`HELDOUT_EVERY`-th topic of each list is held out), so an evaluation on
held-out instructions never sees a topic the pairs were built from, whatever the seeds.

:func:`freeform_instructions` draws without replacement from one split (a seeded shuffle of all its instructions,
reshuffled for each further pass when more are asked for than there are), so the first ``min(n, pool)`` are
distinct; :func:`load_prompt_records` is the one place the built-in prompt source is chosen
(:data:`PROMPT_SOURCES`: the checkable ``"tasks"`` or ``"freeform"``) for the QDPO pairs, its evaluation
callback and the benchmark.
"""

from __future__ import annotations

import random
from typing import Any

from datamodules.instruction import load_instruction_records
from datamodules.instruction_tasks import format_prompt
from lm.tokenizers import PROMPT_TEMPLATE

#: instruction templates per topic kind ({topic} is filled with a topic of that kind)
TEMPLATES: dict[str, tuple[str, ...]] = {
    "thing": (
        "Explain {topic} in one sentence.",
        "Describe {topic} to a child.",
        "Write a short sentence about {topic}.",
        "Give two facts about {topic}.",
        "Why does {topic} matter? Answer briefly.",
        "List three words that come to mind for {topic}.",
        "Write a one-line poem about {topic}.",
        "What is the most surprising thing about {topic}?",
    ),
    "activity": (
        "Give two tips for {topic}.",
        "What is a common mistake when {topic}?",
        "Describe the first step of {topic}.",
        "Write one sentence of encouragement about {topic}.",
    ),
}
#: topics per kind (the held-out ones are every :data:`HELDOUT_EVERY`-th, counting from the first)
TOPICS: dict[str, tuple[str, ...]] = {
    "thing": (
        "photosynthesis", "the moon", "rainbows", "volcanoes", "honey bees", "the ocean tides", "gravity",
        "a public library", "bicycles", "coffee", "the internet", "winter", "thunderstorms", "the human heart",
        "maps", "bread", "electricity", "deserts", "music", "clocks", "forests", "recycling", "the alphabet",
        "mountains", "friendship", "money", "trains", "snow", "the sun", "vaccines", "rivers", "penguins",
        "paper", "glaciers", "chess", "salt", "bridges", "earthquakes", "owls", "tea",
    ),
    "activity": (
        "learning a language", "sleeping well", "saving money", "cooking rice", "writing an essay",
        "running a first marathon", "keeping a plant alive", "studying for an exam", "moving to a new city",
        "starting a garden", "giving a speech", "learning to swim", "packing for a trip", "making new friends",
        "reading more books", "drawing a portrait",
    ),
}
#: every HELDOUT_EVERY-th topic of each kind (indices 0, 4, 8, …) is held out
HELDOUT_EVERY = 4
SPLITS = ("train", "heldout")
#: the built-in prompt sources of :func:`load_prompt_records`
PROMPT_SOURCES = ("tasks", "freeform")


def split_pool(split: str) -> list[str]:
    """All instructions of ``split`` (``"train"`` or ``"heldout"``), in a fixed order: template × topic for
    every kind, topics ``i`` with ``i % HELDOUT_EVERY == 0`` held out, the rest for training."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    held = split == "heldout"
    return [template.format(topic=topic) for kind, templates in TEMPLATES.items() for template in templates
            for i, topic in enumerate(TOPICS[kind]) if (i % HELDOUT_EVERY == 0) == held]


def freeform_instructions(n: int, seed: int = 0, split: str = "train") -> list[str]:
    """``n`` instructions of ``split``: a ``random.Random(seed)`` shuffle of :func:`split_pool`, taken in order,
    with a new shuffle for each further pass when ``n`` exceeds the pool (so the first ``min(n, pool)`` differ)."""
    if n < 0:
        raise ValueError(f"number of free-form instructions must be >= 0, got {n}")
    pool, rng, out = split_pool(split), random.Random(seed), []
    while len(out) < n:
        order = pool[:]
        rng.shuffle(order)
        out.extend(order[:n - len(out)])
    return out


def freeform_records(n: int, seed: int = 0, template: str = PROMPT_TEMPLATE,
                     split: str = "train") -> list[dict[str, Any]]:
    """Records like :func:`datamodules.load_instruction_records`' (``instruction``, ``context`` = "", ``prompt``
    = the filled ``template``, empty ``response``/``references``) for :func:`freeform_instructions`; no ``task``,
    so no checker applies."""
    return [{"instruction": text, "context": "", "prompt": format_prompt(text, "", template), "response": "",
             "references": [], "source": f"freeform/{split}"}
            for text in freeform_instructions(n, seed, split)]


def check_prompt_source(prompts: str, path: str | None = None, tasks: list[str] | None = None,
                        where: str = "prompts") -> None:
    """One clear ``ValueError`` naming ``where`` for an unknown source, or for ``"freeform"`` combined with a
    prompt file (``path``) or a subset of the built-in ``tasks`` (both belong to other sources)."""
    if prompts not in PROMPT_SOURCES:
        raise ValueError(f"{where} must be one of {PROMPT_SOURCES}, got {prompts!r}")
    if prompts == "freeform" and (path is not None or tasks):
        raise ValueError(f"{where}='freeform' is a built-in prompt source: it takes no path ({path!r}) and no "
                         f"tasks ({tasks!r})")


def load_prompt_records(prompts: str, path: str | None, n: int, seed: int, template: str,
                        tasks: list[str] | None = None, split: str = "train",
                        where: str = "prompts") -> list[dict[str, Any]]:
    """Prompt records from ``path`` (any :func:`datamodules.load_instruction_records` format) or, with
    ``path=None``, from the built-in source ``prompts``: ``"tasks"`` (``n`` checkable task prompts of generator
    seed ``seed``) or ``"freeform"`` (``n`` of :func:`freeform_records`, from ``split``)."""
    check_prompt_source(prompts, path, tasks, where)
    if prompts == "freeform":
        return freeform_records(n, seed, template, split)
    return load_instruction_records(path, n, seed, template, tasks, require_response=False)
