"""Proposers: whatever writes the next candidate loss (issue 15). Each maps a chat (a list of
``{"role": "system" | "user" | "assistant", "content": str}``) to the raw reply text; the loop parses the reply
with :func:`parse_reply` and keeps the raw text in the archive either way. Chosen in YAML by class path::

    proposer: {class_path: discovery.ReplayProposer, init_args: {path: candidates.jsonl}}
    proposer: {class_path: discovery.HFProposer, init_args: {model: /path/or/hub-name}}
    proposer: {class_path: discovery.OpenAIProposer, init_args: {model: gpt-4o, base_url: ...}}
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import urllib.error
import urllib.request

from datamodules.io import read_records

log = logging.getLogger(__name__)


class ProposerExhausted(Exception):
    """The proposer has no more candidates (a replay file ran out): the loop stops cleanly."""


class Proposer:
    """Base class: :meth:`propose` returns the raw reply to ``messages``."""

    def propose(self, messages: list[dict[str, str]]) -> str:
        raise NotImplementedError

    def skip(self, n: int) -> None:
        """Called once on resume with the number of replies already recorded in the archive."""

    def describe(self) -> str:
        return type(self).__name__


def parse_reply(reply: str) -> dict[str, str]:
    """The first JSON object in ``reply`` (fenced in ```json or bare) with string fields ``name`` and ``code``
    (``thought`` optional). Raises ``ValueError`` with what is wrong (fed back to the proposer)."""
    if not isinstance(reply, str) or not reply.strip():
        raise ValueError("the reply is empty; answer with one JSON object {\"thought\", \"name\", \"code\"}")
    decoder = json.JSONDecoder()
    fenced = re.findall(r"```(?:json)?\s*(\{.*?\})\s*```", reply, flags=re.S)
    for start in [reply.find(block) for block in fenced] + [m.start() for m in re.finditer(r"\{", reply)]:
        try:
            obj, _ = decoder.raw_decode(reply, start)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict) and {"name", "code"} <= obj.keys():
            bad = [k for k in ("thought", "name", "code") if k in obj and not isinstance(obj[k], str)]
            if bad:
                raise ValueError(f"fields {bad} of the reply's JSON must be strings")
            return {"thought": obj.get("thought", ""), "name": obj["name"], "code": obj["code"]}
    raise ValueError("no JSON object with string fields \"name\" and \"code\" found in the reply; answer with one "
                     "JSON object {\"thought\": ..., \"name\": ..., \"code\": ...}")


class ReplayProposer(Proposer):
    """Replies read from a JSONL file, in order: each line is ``{"reply": "raw text"}`` or a candidate object
    ``{"thought", "name", "code"}`` (sent on as its JSON text). For tests and for replaying an archived run
    (an archive's ``raw_reply`` fields, one per line as ``{"reply": ...}``, reproduce it)."""

    def __init__(self, path: str):
        self.path = path
        self.replies: list[str] = []
        for row in read_records(path):  # one JSON object per line; bad lines are errors naming file:line
            line = row.pop("_line")
            if isinstance(row.get("reply"), str):
                self.replies.append(row["reply"])
            elif {"name", "code"} <= row.keys():
                self.replies.append(json.dumps(row))
            else:
                raise ValueError(f"{path}:{line}: expected {{\"reply\": str}} or {{\"thought\", \"name\", \"code\"}}")
        self.position = 0

    def skip(self, n: int) -> None:
        self.position = n

    def propose(self, messages: list[dict[str, str]]) -> str:
        if self.position >= len(self.replies):
            raise ProposerExhausted(f"{self.path}: all {len(self.replies)} replies used")
        self.position += 1
        return self.replies[self.position - 1]

    def describe(self) -> str:
        return f"ReplayProposer({self.path})"


class HFProposer(Proposer):
    """A local Hugging Face causal LM (any ``from_pretrained`` name or directory; a hub name needs its files in
    the local cache when offline), prompted through its tokenizer's chat template and sampled.

    Args:
        model: name or ``save_pretrained`` directory.
        max_new_tokens, temperature, top_p: sampling settings (``temperature`` 0 = greedy).
        device: ``cpu``, ``cuda``...; dtype: ``bf16``/``fp16``/``fp32`` or ``None`` (checkpoint's).
        chat_template: a Jinja template for tokenizers without one (else the tokenizer's own is used; without
            any, the chat is rendered as ``role: content`` lines, with a warning).
        seed: sampling seed; call k (counting calls recorded before a resume) samples with seed + k.
    """

    def __init__(self, model: str, max_new_tokens: int = 1024, temperature: float = 0.7, top_p: float = 0.95,
                 device: str = "cpu", dtype: str | None = None, chat_template: str | None = None, seed: int = 0):
        self.model_name, self.max_new_tokens, self.temperature, self.top_p = model, max_new_tokens, temperature, top_p
        self.device, self.dtype, self.chat_template, self.seed = device, dtype, chat_template, seed
        self._model = self._tokenizer = None
        self.calls = 0

    def skip(self, n: int) -> None:
        self.calls = n

    def _load(self) -> None:
        from lm.hf import load_causal_lm
        from lm.tokenizers import load_tokenizer

        self._tokenizer = load_tokenizer(None, self.model_name)
        if self.chat_template:
            self._tokenizer.chat_template = self.chat_template
        self._model = load_causal_lm(self.model_name, dtype=self.dtype).to(self.device).eval()

    def render(self, messages: list[dict[str, str]]) -> str:
        if self._tokenizer is None:
            self._load()
        if getattr(self._tokenizer, "chat_template", None):
            return self._tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        log.warning("HFProposer: %s has no chat template; rendering the chat as 'role: content' lines",
                    self.model_name)
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "

    def propose(self, messages: list[dict[str, str]]) -> str:
        import torch

        text = self.render(messages)
        ids = self._tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"].to(self.device)
        torch.manual_seed(self.seed + self.calls)
        self.calls += 1
        sample = self.temperature > 0
        with torch.no_grad():
            out = self._model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                       max_new_tokens=self.max_new_tokens, do_sample=sample,
                                       temperature=self.temperature if sample else None,
                                       top_p=self.top_p if sample else None,
                                       pad_token_id=self._tokenizer.pad_token_id,
                                       eos_token_id=self._tokenizer.eos_token_id)
        return self._tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    def describe(self) -> str:
        return f"HFProposer({self.model_name})"


class OpenAIProposer(Proposer):
    """Any OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, llama.cpp server, Ollama, ...): POST
    ``{base_url}/chat/completions`` with ``{"model", "messages", "temperature", "max_tokens"}``.

    Args:
        model: model name sent to the endpoint.
        base_url: e.g. ``http://127.0.0.1:8000/v1``; ``None`` = ``$OPENAI_BASE_URL`` (required one way or the other).
        api_key_env: environment variable holding the API key (sent as ``Authorization: Bearer``; optional for
            local servers). The key itself never goes into configs or the archive.
        temperature, max_tokens: sampling settings; timeout_s: per request; retries: on network/5xx errors,
            with exponential back-off.
    """

    def __init__(self, model: str, base_url: str | None = None, api_key_env: str = "OPENAI_API_KEY",
                 temperature: float = 1.0, max_tokens: int = 2048, timeout_s: float = 120.0, retries: int = 3):
        self.base_url = (base_url or os.environ.get("OPENAI_BASE_URL") or "").rstrip("/")
        if not self.base_url:
            raise ValueError("OpenAIProposer: set base_url (or $OPENAI_BASE_URL), e.g. http://127.0.0.1:8000/v1")
        self.model, self.api_key_env, self.temperature, self.max_tokens = model, api_key_env, temperature, max_tokens
        self.timeout_s, self.retries = timeout_s, retries

    def propose(self, messages: list[dict[str, str]]) -> str:
        body = json.dumps({"model": self.model, "messages": messages, "temperature": self.temperature,
                           "max_tokens": self.max_tokens}).encode()
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        url = f"{self.base_url}/chat/completions"
        attempt = 0
        while True:
            try:
                request = urllib.request.Request(url, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    payload = json.loads(response.read())
                return payload["choices"][0]["message"]["content"]
            except urllib.error.HTTPError as e:
                if e.code < 500 or attempt == self.retries:
                    raise RuntimeError(f"OpenAIProposer: {url} answered HTTP {e.code}: {e.read()[:500]!r}") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                if attempt == self.retries:
                    raise RuntimeError(f"OpenAIProposer: cannot reach {url}: {e}") from None
            except (KeyError, IndexError, TypeError, json.JSONDecodeError) as e:
                raise RuntimeError(f"OpenAIProposer: unexpected response from {url}: {e!r}") from None
            time.sleep(2**attempt)
            attempt += 1

    def describe(self) -> str:
        return f"OpenAIProposer({self.model} @ {self.base_url})"
