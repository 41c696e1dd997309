"""Tokenizers, and the prompt format that travels with a model: the datamodule ↔ module contract.

A model answers well only in the prompt format it was trained with, so that format is part of the model. It is
kept where Hugging Face keeps it, in the tokenizer's ``chat_template`` (``save_pretrained`` writes it to
``chat_template.jinja`` and ``from_pretrained`` reads it back), and every consumer of prompts (the instruction
data, QDPO's pair generator, ``callbacks.QuantizationEval``, the benchmarks) asks :func:`resolve_prompt_template`
which format to fill. Inside this package a prompt format is a Python format string (``"Q: {instruction}\\nA: "``;
fields in :data:`PROMPT_FIELDS`, filled by :func:`datamodules.instruction_tasks.format_prompt`):

- :func:`set_prompt_template` stores a format string on a tokenizer as an equivalent Jinja chat template (so
  ``tokenizer.apply_chat_template`` works on our exports too) that also records the format string itself;
  :class:`datamodules.InstructionDataModule` does this for the model it trains, so the export carries it.
- :func:`model_prompt_template` reads it back: exactly for our own templates; for any other chat template (a hub
  instruct model's) by rendering a one-user-message conversation, so ``{user}`` stands where the template puts
  the user's message — the model is prompted exactly as its chat template would.
- :func:`resolve_prompt_template` picks the format: the model's own unless one is configured; a configured one
  that differs from the model's own is used, with one warning.

Tokenizers load from a name, a local directory or the byte-level default (:func:`load_tokenizer`).
"""

from __future__ import annotations

import json
import os
import string
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_warn
from transformers import AutoTokenizer, ByT5Tokenizer

#: Opening of the Jinja comment in which :func:`chat_template_for` records the format string.
_MARK = "{#- litpapers prompt template: "
#: Stands in for the user's message when a foreign chat template is rendered to find the format around it.
_SENTINEL = "LITPAPERS-USER-MESSAGE-5b1d"

#: Default prompt template (Dolly/Alpaca style, kept short for byte-level tiny models), for a model that carries
#: no prompt format of its own. ``{context}`` lines are dropped when the context is empty. The response follows
#: the template directly and ends with EOS.
PROMPT_TEMPLATE = "### Instruction:\n{instruction}\n{context_block}### Response:\n"
#: The fields a prompt template may use (see :func:`datamodules.instruction_tasks.format_prompt`).
PROMPT_FIELDS = ("instruction", "context", "context_block", "user")


def byte_tokenizer() -> ByT5Tokenizer:
    """The default tokenizer: UTF-8 bytes (ids 3..258) plus pad=0, eos=1, unk=2. Needs no files."""
    return ByT5Tokenizer(extra_ids=0)


def load_tokenizer(tokenizer: str | None = None, model: object = None):
    """Tokenizer from ``tokenizer`` (name/path), else from ``model`` when it is a path/name with tokenizer
    files, else the byte-level default. A pad token is always set (eos when the tokenizer has none)."""
    from lm.model_aliases import resolve_model_alias

    tokenizer = resolve_model_alias(tokenizer) if isinstance(tokenizer, str) else tokenizer
    model = resolve_model_alias(model) if isinstance(model, str) else model
    source = tokenizer
    if source is None and isinstance(model, str) and has_tokenizer_files(model):
        source = model
    if source is None or source == "byte":
        tok = byte_tokenizer()
    else:
        tok = AutoTokenizer.from_pretrained(source, local_files_only=is_local(source) or offline())
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def is_local(name: str) -> bool:
    """Whether a model/tokenizer name is a local path (an existing directory or one spelled as a path)."""
    return os.path.isdir(name) or name.startswith((".", "/", "~"))


def has_tokenizer_files(name: str) -> bool:
    """A hub name (assumed to have them) or a local directory holding tokenizer files."""
    if not os.path.isdir(name):
        return not name.startswith((".", "/", "~"))
    return any((Path(name) / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json"))


def offline() -> bool:
    """``HF_HUB_OFFLINE`` is set: load only files already on disk."""
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")


# ----------------------------------------------------------------------------------------------- prompt format
def check_prompt_template(template: str, where: str = "template") -> str:
    """Raise ``ValueError`` naming ``where`` unless ``template`` is a format string whose fields are all in
    :data:`PROMPT_FIELDS` and that places the instruction (``{instruction}`` or
    ``{user}``); return it."""
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as e:
        raise ValueError(f"{where}: {template!r} is not a valid format string ({e})") from None
    unknown = fields - set(PROMPT_FIELDS)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {sorted(unknown)} in {template!r}; "
                         f"allowed: {', '.join('{' + f + '}' for f in PROMPT_FIELDS)}")
    if not fields & {"instruction", "user"}:
        raise ValueError(f"{where}: template must contain '{{instruction}}' (or '{{user}}'), got {template!r}")
    return template


def chat_template_for(template: str) -> str:
    """The Jinja chat template equivalent to the format string ``template``.

    A user message renders as ``template`` with ``{instruction}``/``{user}`` = its content and the context
    fields empty; an assistant message as its content followed by ``eos_token`` (how the model was trained:
    prompt, response, EOS). The template's first token is a Jinja comment holding ``template`` as JSON (every
    ``}`` written ``\\u007d`` so the comment cannot end early), which :func:`model_prompt_template` reads back.
    """
    check_prompt_template(template)
    user = []
    for literal, field, _, _ in string.Formatter().parse(template):
        if literal:
            user.append("{{ " + json.dumps(literal, ensure_ascii=False) + " }}")
        if field in ("instruction", "user"):
            user.append("{{ message['content'] }}")
    record = json.dumps(template, ensure_ascii=False).replace("}", "\\u007d")
    return (_MARK + record + " -#}"
            "{%- for message in messages -%}"
            "{%- if message['role'] == 'user' -%}" + "".join(user) +
            "{%- elif message['role'] == 'assistant' -%}{{ message['content'] }}{{ eos_token }}"
            "{%- endif -%}{%- endfor -%}")


def set_prompt_template(tokenizer, template: str) -> None:
    """Make ``template`` the prompt format of ``tokenizer`` (and so of its model's ``save_pretrained`` export).
    A chat template that already encodes ``template`` (a hub model's) is kept as it is."""
    if model_prompt_template(tokenizer) != template:
        tokenizer.chat_template = chat_template_for(template)


def model_prompt_template(tokenizer) -> str | None:
    """The prompt format (a format string) that ``tokenizer``'s chat template encodes; ``None`` without one.

    Our own templates (:func:`chat_template_for`) give back their format string exactly. Any other chat
    template is rendered for one user message with the generation prompt; the text around the message becomes
    the format, the message itself ``{user}`` (= instruction, plus the context after a blank line). A template
    that does not place the message verbatim exactly once is a ``ValueError`` (then configure a template).
    """
    chat = getattr(tokenizer, "chat_template", None)
    if isinstance(chat, dict):  # named templates: the default one
        chat = chat.get("default") or next(iter(chat.values()), None)
    if not chat:
        return None
    if chat.startswith(_MARK):
        return json.loads(chat[len(_MARK):chat.index(" -#}")])
    text = tokenizer.apply_chat_template([{"role": "user", "content": _SENTINEL}], chat_template=chat,
                                         tokenize=False, add_generation_prompt=True)
    if text.count(_SENTINEL) != 1:
        raise ValueError("the tokenizer's chat template does not show a user message verbatim once; "
                         "configure the prompt format with a `template` argument")
    escape = lambda s: s.replace("{", "{{").replace("}", "}}")  # noqa: E731
    before, after = text.split(_SENTINEL)
    return escape(before) + "{user}" + escape(after)


def resolve_prompt_template(tokenizer, template: str | None = None, where: str = "template") -> str:
    """The prompt format to fill: ``template`` when configured, else the model's own
    (:func:`model_prompt_template` of ``tokenizer``), else :data:`PROMPT_TEMPLATE`.

    A configured ``template`` that differs from the model's own gives one warning naming ``where`` (a model
    prompted in a format it was not trained on answers badly), and is used as asked.
    """
    own = model_prompt_template(tokenizer) if tokenizer is not None else None
    if template is None:
        return own if own is not None else PROMPT_TEMPLATE
    check_prompt_template(template, where)
    if own is not None and template != own:
        rank_zero_warn(f"{where}={template!r} differs from the model's own prompt format {own!r} (from its "
                       f"tokenizer's chat template): the model is prompted in a format it was not trained with. "
                       f"Leave {where} unset to use the model's.")
    return template
