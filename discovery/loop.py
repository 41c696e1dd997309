"""DiscoPOP's discovery loop (Lu et al., 2024, §3; docs/papers.md §6 "Discovery loop"; issue 15).

Each generation: the chat is built from the archive (seeded with DPO, hinge, IPO, KTO and their fitness), the
proposer answers JSON ``{thought, name, code}``, the code is checked and validated in the sandbox; an invalid
candidate's error is fed back and the proposer asked again (up to ``max_attempts``); a valid one is trained and
scored (``Fitness``, in the sandbox worker too) and "Fitness: X. Please generate the next one." is fed back.
Every reply is appended to ``<run_dir>/archive.jsonl`` (one JSON record per line, fsync'ed) with the chat that
was sent, the raw reply, the parsed candidate, the status, the error fed back and the fitness, so an interrupted
run resumes where it stopped (the chat is rebuilt from the archive alone) and a run can be audited and replayed.
A failed scoring is marked ``failure: candidate`` (final) or ``failure: infrastructure`` (not the candidate's fault:
not fed back, scored again on resume; a run in which every scoring failed so exits non-zero). Paths are resolved
against the caller's working directory before any worker starts (workers run in their own temporary folders).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import platform
import shlex
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

from discovery.fitness import SIGNATURE, DPOFitness, Fitness, fitness_config
from discovery.proposers import Proposer, ProposerExhausted, parse_reply
from discovery.sandbox import MAX_TEXT_CHARS, SandboxLimits, cap_text, run_in_worker

log = logging.getLogger(__name__)

#: Longest proposer reply archived and parsed (a candidate's code is at most 20,000 characters), and name.
MAX_REPLY_CHARS = 64_000
MAX_NAME_CHARS = 200
_ARGS = "(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta)"
_MARGIN = "(policy_chosen_logps - policy_rejected_logps) - (ref_chosen_logps - ref_rejected_logps)"
#: Baselines as the proposer sees them (docs/papers.md §6 formulas); IPO on per-token mean log-probs, as TRL.
BASELINES: dict[str, dict] = {
    "dpo": {"thought": "DPO (Rafailov et al., 2023): logistic loss on the scaled log-ratio margin.",
            "code": f"def dpo{_ARGS}:\n"
                    f"    logits = {_MARGIN}\n    return -F.logsigmoid(beta * logits)\n"},
    "hinge": {"thought": "SLiC (Zhao et al., 2023): hinge loss on the scaled log-ratio margin.",
              "code": f"def hinge(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, "
                      f"beta):\n    logits = {_MARGIN}\n    return torch.relu(1 - beta * logits)\n"},
    "ipo": {"thought": "IPO (Azar et al., 2023): squared distance of the log-ratio margin to 1/(2 beta); "
                       "per-token mean log-probs.",
            "code": f"def ipo{_ARGS}:\n"
                    f"    logits = {_MARGIN}\n    return (logits - 1 / (2 * beta)) ** 2\n",
            "length_normalize": True},
    "kto": {"thought": "KTO on pairs (Ethayarajh et al., 2024): sigmoid of each reward against the other side's "
                       "batch-mean KL estimate.",
            "code": "def kto(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta):\n"
                    "    chosen = policy_chosen_logps - ref_chosen_logps\n"
                    "    rejected = policy_rejected_logps - ref_rejected_logps\n"
                    "    kl_chosen = chosen.mean().clamp(min=0)\n    kl_rejected = rejected.mean().clamp(min=0)\n"
                    "    return 0.5 * ((1 - torch.sigmoid(beta * (chosen - kl_rejected)))\n"
                    "                  + (1 - torch.sigmoid(beta * (kl_chosen - rejected))))\n"},
    "lrml": {"thought": "DiscoPOP / LRML (Lu et al., 2024, Eq. 5): logistic and exponential losses blended by "
                        "sigmoid(beta * margin / 0.05).",
             "code": "def lrml(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, "
                     f"beta):\n    logits = beta * ({_MARGIN})\n    weight = torch.sigmoid(logits / 0.05)\n"
                     "    return (1 - weight) * -F.logsigmoid(logits) + weight * torch.exp(-logits)\n"},
}

SYSTEM_PROMPT = f"""You are a machine-learning researcher designing new loss functions for offline preference \
optimisation of language models (like DPO). A loss receives, for a batch of B preference pairs, four tensors of \
shape (B,): the summed log-probabilities of the chosen and rejected responses under the policy and under the \
frozen reference model, and the float beta. It returns B losses (shape (B,)); training minimises their mean.

Answer with one JSON object and nothing else: {{"thought": "<your reasoning>", "name": "<short_snake_case_name>", \
"code": "<python source>"}}. The code defines exactly one function {SIGNATURE}. torch, \
torch.nn.functional as F and math are available; nothing else may be imported, no files, no introspection \
(attributes starting with '_'), no eval/exec/open. Put hyper-parameters inside the function as constants.

Here is an example of the format:
{json.dumps({"thought": BASELINES["dpo"]["thought"], "name": "dpo", "code": BASELINES["dpo"]["code"]})}

You know the binary-classification and preference-optimisation literature; be creative and build on the best \
results so far."""


class Archive:
    """Append-only JSONL file of records; every append is flushed and fsync'ed, and a torn last line (a kill
    during a write) is dropped when the file is opened again."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def load(self) -> list[dict]:
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            keep = data.rfind(b"\n") + 1
            log.warning("archive %s: dropping a torn last line (%d bytes)", self.path, len(data) - keep)
            with open(self.path, "r+b") as f:
                f.truncate(keep)
            data = data[:keep]
        records = []
        for i, line in enumerate(data.decode().splitlines(), start=1):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{self.path}:{i}: corrupt archive record ({e})") from None
        return records

    def append(self, record: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())


def _identity(record: dict) -> tuple | None:
    """What a scored record is a result of: a baseline by name, a proposal by (generation, attempt)."""
    if record["kind"] in ("seed", "reference"):
        return record["kind"], record["name"]
    if record["kind"] == "proposal":
        return "proposal", record["generation"], record["attempt"]
    return None


def current_records(records: list[dict]) -> list[dict]:
    """The archive as it stands now: a record scored again (after an infrastructure failure) takes the place of
    the earlier one; the file keeps both."""
    out: list[dict] = []
    position: dict[tuple, int] = {}
    for record in records:
        key = _identity(record)
        if key is not None and key in position:
            out[position[key]] = record
            continue
        if key is not None:
            position[key] = len(out)
        out.append(record)
    return out


def infrastructure_failures(records: list[dict]) -> tuple[list[dict], list[dict]]:
    """(scored, failed for an infrastructure reason) among the baselines and proposals of ``records``."""
    scored = [r for r in records if _identity(r) is not None and (r["status"] == "evaluated" or r.get("failure"))]
    return scored, [r for r in scored if r.get("failure") == "infrastructure"]


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class DiscoveryLoop:
    """Propose → validate → train → score → feed back, ``generations`` times (see the module docstring).

    Args:
        run_dir: holds ``archive.jsonl`` (resumed if present), ``summary.md``, ``summary.json``, ``fitness.png``
            and the fitness's own files (e.g. the SFT export).
        proposer: who writes candidates (:mod:`discovery.proposers`).
        fitness: how a valid candidate is scored (default :class:`DPOFitness`: held-out reward accuracy after a
            short DPO run at β = 0.05 on the built-in preference pairs).
        generations: number of generations (each ends with one scored candidate or ``max_attempts`` failures).
        max_attempts: replies per generation before giving up on it.
        seeds: baselines shown to the proposer with their fitness (names of :data:`BASELINES`).
        references: baselines scored the same way and kept in the archive, but not shown to the proposer.
        limits: the sandbox's per-candidate limits.
        workers: worker processes scoring in parallel (the baselines; the replies of one round).
        population: replies asked per round of a generation (to the same chat), scored in parallel; the
            generation ends after the first round with a scored candidate or after ``max_attempts`` replies.
        history: previous (reply, feedback) exchanges kept in the chat after the archive summary.
        top_k: best scored candidates listed in the prompt (plus the seeds).
    """

    def __init__(self, run_dir: str = "logs/discovery", proposer: Proposer | None = None,
                 fitness: Fitness | None = None, generations: int = 10, max_attempts: int = 3,
                 seeds: list[str] | None = None, references: list[str] | None = None,
                 limits: SandboxLimits | None = None, workers: int = 1, population: int = 1, history: int = 4,
                 top_k: int = 10):
        if proposer is None:
            raise ValueError("discovery: a proposer is required (proposer.class_path: ReplayProposer, HFProposer "
                             "or OpenAIProposer)")
        seeds = ["dpo", "hinge", "ipo", "kto"] if seeds is None else seeds
        references = ["lrml"] if references is None else references
        unknown = sorted(set(seeds + references) - set(BASELINES))
        if unknown:
            raise ValueError(f"discovery: unknown seeds/references {unknown}; choose from {sorted(BASELINES)}")
        if generations < 0 or max_attempts < 1 or workers < 1 or population < 1:
            raise ValueError("discovery: need generations >= 0, max_attempts >= 1, workers >= 1, population >= 1")
        self.run_dir, self.proposer = Path(run_dir).absolute(), proposer  # workers run in their own folders
        self.fitness = DPOFitness() if fitness is None else fitness
        self.generations, self.max_attempts, self.seeds, self.references = generations, max_attempts, seeds, references
        self.limits = SandboxLimits() if limits is None else limits
        self.workers, self.population, self.history, self.top_k = workers, population, history, top_k
        self.archive = Archive(self.run_dir / "archive.jsonl")

    # ------------------------------------------------------------------ scoring
    def score(self, code: str, length_normalize: bool = False) -> dict:
        """Sandboxed validation + fitness of ``code``: status ``evaluated`` (with ``fitness``), ``invalid`` or
        ``failed``, plus ``stage``, ``error``, ``failure`` (``candidate`` or ``infrastructure``: whose fault; an
        infrastructure failure is scored again when the run resumes), ``metrics``, ``seconds``."""
        t0 = time.monotonic()
        try:
            out = run_in_worker(code, self.limits, fitness_config(self.fitness), length_normalize=length_normalize)
        except Exception as e:  # noqa: BLE001 - e.g. the worker cannot be started: not the candidate's fault
            out = {"status": "failed", "stage": "startup", "error": cap_text(f"{type(e).__name__}: {e}"),
                   "failure": "infrastructure", "seconds": time.monotonic() - t0}
        if out["status"] != "ok":
            return {"status": out["status"], "stage": out["stage"], "error": out["error"],
                    "failure": out.get("failure", "candidate"), "fitness": None, "metrics": {},
                    "seconds": out["seconds"]}
        return {"status": "evaluated", "stage": "done", "error": None, "failure": None,
                "fitness": out["metrics"][self.fitness.metric], "metrics": out["metrics"], "seconds": out["seconds"]}

    def _score_baselines(self, records: list[dict]) -> None:
        done = {r["name"] for r in records
                if r["kind"] in ("seed", "reference") and r.get("failure") != "infrastructure"}
        todo = [(kind, name) for kind, names in (("seed", self.seeds), ("reference", self.references))
                for name in names if name not in done]
        if not todo:
            return

        def one(item):
            kind, name = item
            base = BASELINES[name]
            result = self.score(base["code"], base.get("length_normalize", False))
            return {"kind": kind, "name": name, "thought": base["thought"], "code": base["code"],
                    "length_normalize": base.get("length_normalize", False), **result, "time": _now()}

        with ThreadPoolExecutor(self.workers) as pool:
            for record in pool.map(one, todo):
                self._add(records, record)
                log.info("discovery: baseline %s: %s %s", record["name"], record["status"],
                         record["fitness"] if record["status"] == "evaluated" else record["error"])

    def _add(self, records: list[dict], record: dict) -> None:
        """Archive ``record`` and put it into ``records`` (in place of the one it scores again, if any)."""
        self.archive.append(record)
        records.append(record)
        records[:] = current_records(records)
        if _identity(record) is not None:
            self._scored_now.append(record)

    def _retry_infrastructure_failures(self, records: list[dict]) -> None:
        """Score again the proposals whose scoring failed for an infrastructure reason (not their fault)."""
        todo = [r for r in records if r["kind"] == "proposal" and r.get("failure") == "infrastructure"]
        if not todo:
            return
        log.info("discovery: scoring %d proposals again (their scoring failed for an infrastructure reason)",
                 len(todo))

        def again(record: dict) -> dict:
            retry = {k: v for k, v in record.items() if k not in ("status", "stage", "error", "failure", "feedback")}
            retry |= {"time": _now(), "t0": time.monotonic(), "retry": record.get("retry", 0) + 1}
            return self._score_reply(retry)

        with ThreadPoolExecutor(self.workers) as pool:
            for record in pool.map(again, todo):
                self._add(records, record)

    def _nothing_can_be_scored(self) -> bool:
        """Whether every scoring of this run so far failed for an infrastructure reason (then asking the
        proposer for more is pointless)."""
        scored, infrastructure = infrastructure_failures(self._scored_now)
        return bool(scored) and len(infrastructure) == len(scored)

    # ------------------------------------------------------------------ prompt
    def build_messages(self, records: list[dict]) -> list[dict[str, str]]:
        """The chat sent to the proposer, rebuilt from the archive alone (so a resumed run asks the same)."""
        scored = [r for r in records if r["status"] == "evaluated"]
        seeds = [r for r in scored if r["kind"] == "seed"]
        found = sorted((r for r in scored if r["kind"] == "proposal"), key=lambda r: -r["fitness"])[: self.top_k]
        lines = ["Here are the loss functions evaluated so far, with their fitness (higher is better):"]
        for r in seeds + found:
            lines.append(f"\nname: {r['name']}\ncode:\n{r['code']}Fitness: {r['fitness']:.4f}")
        lines.append("\nPlease generate the next one.")
        messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": "\n".join(lines)}]
        exchanges = [r for r in records if r["kind"] == "proposal" and r.get("raw_reply") is not None
                     and r.get("feedback") is not None]
        for r in exchanges[-self.history:] if self.history else []:
            messages += [{"role": "assistant", "content": r["raw_reply"]}, {"role": "user", "content": r["feedback"]}]
        return messages

    # ------------------------------------------------------------------ loop
    def run(self) -> list[dict]:
        """Run (or resume) the loop; returns the archive's current records (see :func:`current_records`) and
        writes the summary files. On resume, baselines and proposals whose scoring failed for an infrastructure
        reason (``failure: infrastructure``) are scored again; candidate failures are final. The loop stops
        asking the proposer once every scoring of this run has failed for an infrastructure reason."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        records = current_records(self.archive.load())
        self._scored_now: list[dict] = []
        resumed = bool(records)
        run_record = {"kind": "run", "status": "resumed" if resumed else "started", "time": _now(),
                      "proposer": self.proposer.describe(), "fitness": fitness_config(self.fitness),
                      "limits": asdict(self.limits), "generations": self.generations,
                      "max_attempts": self.max_attempts, "population": self.population, "seeds": self.seeds,
                      "references": self.references}
        self.archive.append(run_record)
        records.append(run_record)
        self.fitness.prepare(self.run_dir)
        self._score_baselines(records)
        if not self._nothing_can_be_scored():
            self._retry_infrastructure_failures(records)
        proposals = [r for r in records if r["kind"] == "proposal"]
        self.proposer.skip(len(proposals))
        exhausted = False
        for generation in range(self.generations):
            if self._nothing_can_be_scored():
                log.error("discovery: stopping: every scoring of this run failed for an infrastructure reason")
                break
            tried = [r for r in proposals if r["generation"] == generation]
            attempt = len(tried)
            if any(r["status"] == "evaluated" for r in tried):
                continue
            while attempt < self.max_attempts and not exhausted:
                messages = self.build_messages(records)
                asked, scored = [], []
                for i in range(min(self.population, self.max_attempts - attempt)):
                    try:
                        asked.append(self._ask(messages, generation, attempt + i))
                    except ProposerExhausted as e:
                        log.info("discovery: proposer exhausted (%s); stopping", e)
                        exhausted = True
                        break
                # scored in parallel, archived in the order asked (so a resumed replay continues correctly)
                with ThreadPoolExecutor(self.workers) as pool:
                    for record in pool.map(self._score_reply, asked):
                        scored.append(record)
                        self._add(records, record)
                        proposals.append(record)
                        log.info("discovery: generation %d attempt %d %s: %s %s", generation, record["attempt"],
                                 record["name"], record["status"],
                                 record["fitness"] if record["status"] == "evaluated" else record["error"])
                attempt += len(asked)
                if any(r["status"] == "evaluated" for r in scored) or self._nothing_can_be_scored():
                    break
            if exhausted:
                break
        write_summary(records, self.run_dir)
        return records

    def _ask(self, messages: list[dict[str, str]], generation: int, attempt: int) -> dict:
        """One reply to ``messages``, parsed (a proposer error is recorded, :class:`ProposerExhausted` raised)."""
        record = {"kind": "proposal", "generation": generation, "attempt": attempt,
                  "proposer": self.proposer.describe(), "prompt": messages, "raw_reply": None, "thought": None,
                  "name": None, "code": None, "time": _now(), "t0": time.monotonic()}
        try:
            reply = self.proposer.propose(messages)
        except ProposerExhausted:
            raise
        except Exception as e:  # noqa: BLE001 - a proposer failure is recorded, the run goes on
            return record | {"status": "proposer_error", "stage": "propose", "error": f"{type(e).__name__}: {e}"}
        if isinstance(reply, str) and len(reply) > MAX_REPLY_CHARS:
            record["raw_reply"] = cap_text(reply, MAX_REPLY_CHARS)
            return record | {"status": "invalid", "stage": "parse", "failure": "candidate",
                             "error": f"the reply is {len(reply)} characters long; at most {MAX_REPLY_CHARS} "
                                      "are allowed"}
        record["raw_reply"] = reply
        try:
            record.update(parse_reply(reply))
        except ValueError as e:
            record.update(status="invalid", stage="parse", error=cap_text(str(e)), failure="candidate")
        else:
            record.update(name=cap_text(record["name"], MAX_NAME_CHARS), thought=cap_text(record["thought"]))
        return record

    def _score_reply(self, record: dict) -> dict:
        """The archive record of an asked reply: scored if it parsed, with the feedback for the proposer."""
        t0 = record.pop("t0")
        if "status" in record:
            result = {"fitness": None, "metrics": {}}
        else:
            result = self.score(record["code"])
        record = record | result | {"seconds": time.monotonic() - t0}
        if record["status"] == "evaluated":
            feedback = f"Fitness: {record['fitness']:.4f}. Please generate the next one."
        elif record.get("failure") == "infrastructure":
            feedback = None  # not the candidate's fault: not fed back; the reply is scored again on resume
        elif record["status"] == "invalid":
            feedback = f"Code not valid: {record['error']}. Please fix it and answer with the corrected JSON."
        elif record["status"] == "failed":
            feedback = f"Training with this loss failed: {record['error']}. Please generate a different one."
        else:
            feedback = None
        return record | {"feedback": feedback}

def write_summary(records: list[dict], out_dir: Path) -> dict:
    """``summary.md`` (one row per baseline and proposal), ``summary.json`` and ``fitness.png`` (fitness per
    generation, best so far, and the baselines as horizontal lines) in ``out_dir``; returns the JSON."""
    rows = [r for r in records if r["kind"] in ("seed", "reference", "proposal")]
    table = ["| kind | generation | attempt | name | status | fitness | error |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        fit = f"{r['fitness']:.4f}" if r.get("fitness") is not None else ""
        status = r["status"] + (" (infrastructure)" if r.get("failure") == "infrastructure" else "")
        table.append(f"| {r['kind']} | {r.get('generation', '')} | {r.get('attempt', '')} "
                     f"| {markdown_cell(r.get('name') or '', 80)} | {status} | {fit} "
                     f"| {markdown_cell(r.get('error') or '', 120)} |")
    scored = [r for r in rows if r["status"] == "evaluated"]
    best = max((r for r in scored if r["kind"] == "proposal"), key=lambda r: r["fitness"], default=None)
    counts: dict[str, int] = {}
    for r in rows:
        if r["kind"] == "proposal":
            counts[r["status"]] = counts.get(r["status"], 0) + 1
    summary = {"baselines": {r["name"]: r["fitness"] for r in rows if r["kind"] != "proposal"},
               "proposals": counts, "infrastructure_failures": len(infrastructure_failures(rows)[1]),
               "best": None if best is None else
               {k: best[k] for k in ("generation", "name", "fitness", "code", "thought")},
               "per_generation": [{"generation": r["generation"], "name": r["name"], "fitness": r["fitness"]}
                                  for r in scored if r["kind"] == "proposal"]}
    out_dir = Path(out_dir)
    (out_dir / "summary.md").write_text("\n".join(table) + "\n")
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    _plot(summary, out_dir / "fitness.png")
    return summary


def markdown_cell(text: str, limit: int) -> str:
    """``text`` as one cell of a Markdown table: at most ``limit`` characters, line breaks as spaces, ``|`` and
    ``\\`` escaped (a candidate's name or error must not break the table)."""
    text = " ".join(str(text).split())[:limit]
    return text.replace("\\", "\\\\").replace("|", "\\|")


def _plot(summary: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    points = summary["per_generation"]
    if points:
        xs, ys = [p["generation"] for p in points], [p["fitness"] for p in points]
        ax.plot(xs, ys, "o", label="candidate")
        best = [max(ys[: i + 1]) for i in range(len(ys))]
        ax.step(xs, best, where="post", label="best so far")
    for i, (name, value) in enumerate(summary["baselines"].items()):
        if value is not None:
            ax.axhline(value, ls="--", lw=1, color=f"C{i + 2}", label=name)
    ax.set(xlabel="generation", ylabel="fitness", title="discovery: fitness per generation")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def build_parser():
    """The ``litpapers discover`` parser: ``--config`` plus every :class:`DiscoveryLoop` argument."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(prog="litpapers discover", description="DiscoPOP's discovery loop: LLM-proposed "
                            "preference losses, validated in a sandbox and scored by training.")
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_argument("--summarize_only", type=bool, default=False)
    parser.add_class_arguments(DiscoveryLoop)
    return parser


def main(argv: list[str] | None = None) -> int:
    """``litpapers discover --config configs/discopop/discover.yaml [--generations 5 ...]``: run or resume the loop.
    ``--summarize_only true`` only rewrites the summary files of an existing ``run_dir``."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if cfg.summarize_only:
        run_dir = Path(cfg.run_dir)
        records = current_records(Archive(run_dir / "archive.jsonl").load())
        summary = write_summary(records, run_dir)
    else:
        init = parser.instantiate_classes(cfg)
        loop = DiscoveryLoop(**{k: v for k, v in vars(init).items() if k not in ("config", "summarize_only")})
        records = loop.run()
        run_dir = loop.run_dir
        summary = json.loads((run_dir / "summary.json").read_text())
    summary |= {"command": shlex.join(["litpapers", "discover", *argv]), "date": _now(),
                "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}"}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps({k: summary[k] for k in ("baselines", "proposals", "best")}, indent=1))
    error = infrastructure_error(records)
    if error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 1
    return 0


def infrastructure_error(records: list[dict]) -> str | None:
    """The error line of a run in which every scoring failed for an infrastructure reason (nothing was scored,
    and not because of the candidates), else ``None``; a partial failure is only logged."""
    scored, failed = infrastructure_failures(records)
    if failed and len(failed) < len(scored):
        log.warning("discovery: %d of %d scorings failed for an infrastructure reason; rerun the same command to "
                    "score them again", len(failed), len(scored))
    if not failed or len(failed) < len(scored):
        return None
    first = failed[0]
    what = first["name"] if first["kind"] != "proposal" else f"proposal {first.get('name')!r}"
    reason = " ".join(str(first["error"]).split())[:300]
    return (f"discovery: all {len(failed)} scorings failed for an infrastructure reason, not the candidates' "
            f"(first, {what}: {reason}); fix it and rerun the same command to score them again")
