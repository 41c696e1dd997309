"""``litpapers reproduce``: run each paper's headline-claim experiment and write a computed report.

    python -m benchmarks.reproduce [--quick | --full] [--only minillm,radt] [--seeds N] [--out reports/quick-DATE]

For every paper key (``ademamix``, ``minillm``, ``discopop``, ``qdpo``, ``radt``, ``oversquashing``) the runner
imports its claim module (:data:`CLAIM_MODULES`) and calls ``run(mode, seeds, out_dir, progress)``, which trains and
evaluates through the same modules and configs a user runs and returns
``{"claims": [{"claim", "metric", "ours", "baseline", "baseline_name", "higher_is_better", "spread"}],
"figures": [PNG paths relative to out_dir], "settings": {...}}``. The runner then

- computes every claim's verdict with :func:`verdict` (one rule, stated in the report);
- isolates failures: a paper whose module is missing or raises is recorded as ``failed`` with its error, the other
  papers still run, and the exit code is 1 at the end;
- saves each finished paper atomically to ``<out>/papers/<key>.json``; rerunning with the same ``--out`` (and the
  same mode, ``--seeds`` and claim-module source, :func:`module_digest`) skips those papers, so an interrupted run
  resumes and loses nothing finished, and a changed experiment is run again;
- rewrites ``<out>/results.json`` and ``<out>/report.md`` after every paper (and at the end);
- in ``--full`` mode adds each paper's real-model claim rows from ``benchmarks.claim_real.claims(paper_key, mode,
  out_dir, seeds)`` when that module exists (:func:`real_claims_hook`), also to a reused paper result (the
  real-model experiments keep records of their own: :func:`add_real_claims`);
- runs torch on one thread per process (:func:`single_thread`; ``OMP_NUM_THREADS`` overrides it).

``--quick`` and ``--full`` settings are each claim module's ``SETTINGS``/``MODES`` table (documented in its
docstring and recorded in the report): ``--quick`` is sized to finish within 15 minutes on 2 CPU cores from a fresh
clone, built-in checkpoints included; ``--full`` to about 15 minutes per paper on this 2-core machine (one core's
worth of CPU time), with 3 seeds; ``--seeds N`` (and the ``--steps`` of ``python -m benchmarks.claim_ademamix`` /
``claim_oversquashing``) make them larger.

``spread`` is the sample standard deviation over training seeds of the paired difference ``ours − baseline``
(``benchmarks.claim_common.paired_spread``), ``None`` with one seed. A within-run error (e.g. the
binomial error of a rate over the evaluation prompts) is not used in its place: it leaves out the training-seed noise,
which dominates on these small runs, and would turn noise into verdicts.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
import traceback
import urllib.parse
from collections.abc import Callable, Sequence
from pathlib import Path

from lightning.pytorch.utilities.exceptions import SIGTERMException

PAPERS = ("ademamix", "minillm", "discopop", "qdpo", "radt", "oversquashing")
# The one place that maps a paper key to its claim module (the only names to change when the package moves).
CLAIM_MODULES = {key: f"benchmarks.claim_{key}" for key in PAPERS}
# Optional: real-model claim rows added to every paper in --full mode (see real_claims_hook)
REAL_CLAIMS_MODULE = "benchmarks.claim_real"
CLAIM_FIELDS = ("claim", "metric", "ours", "baseline", "baseline_name", "higher_is_better", "spread")
VERDICT_RULE = (
    "d = ours − baseline (baseline − ours when lower is better); spread s = the sample standard deviation over "
    "training seeds of the paired difference. **reproduced** if d > 2s, **not reproduced** if d < −2s, otherwise "
    "**inconclusive**; with one seed (s = null: no estimate of the seed-to-seed noise, and an evaluation-only error "
    "would leave that noise out) always **inconclusive**.")
Progress = Callable[[str, float | None], None]


def verdict(ours: float, baseline: float, higher_is_better: bool, spread: float | None) -> str:
    """The claim's verdict (rule: :data:`VERDICT_RULE`).

    With d = (ours − baseline)·(+1 if higher is better else −1) and s = ``spread``: ``"reproduced"`` if d > 2s,
    ``"not reproduced"`` if d < −2s, else ``"inconclusive"``; ``"inconclusive"`` whenever s is None or a number
    is not finite (no evidence either way).
    """
    if spread is None or not all(math.isfinite(x) for x in (ours, baseline, spread)):
        return "inconclusive"
    if spread < 0:
        raise ValueError(f"spread must be >= 0, got {spread}")
    d = (ours - baseline) if higher_is_better else (baseline - ours)
    if d > 2 * spread:
        return "reproduced"
    if d < -2 * spread:
        return "not reproduced"
    return "inconclusive"


# ----------------------------------------------------------------------------------------------- environment
def machine_info() -> dict:
    """CPU model, cores, OS (and the GPU when there is one)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "os": platform.platform(), "gpu": None}
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name()
    except ImportError:
        pass
    return info


def versions() -> dict:
    """Versions of python and the libraries the results depend on (None when not installed)."""
    out = {"python": platform.python_version()}
    for name in ("torch", "lightning", "transformers", "torchao", "gymnasium"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file and a rename (readers never see a half-written file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------- runner
#: Seconds between two progress lines on the console; every line also goes to the paper's ``console.log``.
PROGRESS_INTERVAL = 30.0


class Console:
    """Where the runner talks to the user while each paper's own output goes to a file.

    ``stream`` is a duplicate of the terminal's stderr taken before any redirection (:func:`paper_output_to`), so
    progress lines reach the user while everything else the experiment prints — library logs and warnings,
    progress bars, child processes (built-in checkpoint training), MuJoCo's C-level messages — lands in
    ``<out>/<key>/console.log``. Without a real stderr (e.g. pytest's capture) nothing is redirected."""

    def __init__(self) -> None:
        try:
            self.fd: int | None = sys.stderr.fileno()
        except (AttributeError, OSError, ValueError):
            self.fd = None
        self.stream = os.fdopen(os.dup(self.fd), "w", buffering=1) if self.fd is not None else sys.stderr

    def print(self, line: str) -> None:
        print(line, file=self.stream, flush=True)

    def close(self) -> None:
        """Close the duplicated terminal stream (not a borrowed ``sys.stderr``)."""
        if self.stream is not sys.stderr:
            self.stream.close()


@contextlib.contextmanager
def paper_output_to(path: Path, console: Console):
    """While the block runs, file descriptors 1 and 2 (and so ``print``, logging, warnings, tqdm bars and child
    processes) write to ``path`` (appended); restored afterwards. A no-op when ``console`` has no real stderr."""
    if console.fd is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = (os.dup(1), os.dup(2))
    with open(path, "ab") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def eta_seconds(elapsed: float, fraction: float | None) -> float | None:
    """Measured time left: elapsed·(1 − f)/f for a fraction f of the work done in (0, 1), else None."""
    if fraction is None or not 0 < fraction < 1:
        return None
    return elapsed * (1 - fraction) / fraction


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60:02d}:{seconds % 60:02d}"


def _console_progress(key: str, index: int, total: int, start: float, console: Console | None = None,
                      interval: float = PROGRESS_INTERVAL) -> Progress:
    """A progress callback: ``[reproduce mm:ss] key (i/n) pct% (ETA mm:ss): message``. Every line goes to stderr
    (the paper's ``console.log`` while it runs); the console gets the first and last line of a paper, failures, and
    otherwise at most one line per ``interval`` seconds. The ETA is measured from the paper's own progress."""
    console = console or Console()
    paper_start = time.time()
    last_shown = [-math.inf]

    def progress(message: str, fraction: float | None = None) -> None:
        now = time.time()
        pct = "" if fraction is None else f" {100 * fraction:3.0f}%"
        eta = eta_seconds(now - paper_start, fraction)
        pct += "" if eta is None else f" (ETA {_clock(eta)})"
        line = f"[reproduce {_clock(now - start)}] {key} ({index}/{total}){pct}: {message}"
        if console.stream is not sys.stderr:
            print(line, file=sys.stderr, flush=True)
        if fraction in (0.0, 1.0) or message.startswith("FAILED") or now - last_shown[0] >= interval:
            console.print(line)
            last_shown[0] = now

    return progress


def _checked_claims(result: dict, key: str, source: str | None = None) -> list[dict]:
    """The claims of ``result`` (from ``source``, default the paper's claim module) with their verdicts; a missing
    field or a non-number is one clear error naming the module."""
    source = source or CLAIM_MODULES[key]
    if not isinstance(result, dict) or not isinstance(result.get("claims"), list) or not result["claims"]:
        raise ValueError(f"claim module {source} returned no 'claims' list")
    claims = []
    for i, claim in enumerate(result["claims"]):
        missing = [f for f in CLAIM_FIELDS if f not in claim]
        if missing:
            raise ValueError(f"{source}: claim {i} lacks fields {missing}")
        c = {f: claim[f] for f in CLAIM_FIELDS}
        c["ours"], c["baseline"] = float(c["ours"]), float(c["baseline"])
        c["spread"] = None if c["spread"] is None else float(c["spread"])
        c["higher_is_better"] = bool(c["higher_is_better"])
        c["verdict"] = verdict(c["ours"], c["baseline"], c["higher_is_better"], c["spread"])
        claims.append(c)
    return claims


def real_claims_hook() -> Callable[[str, str, Path, int | None], list[dict]] | None:
    """``claims`` of :data:`REAL_CLAIMS_MODULE` when that module exists and defines it, else None.

    Signature: ``claims(paper_key, mode, out_dir, seeds) -> list[dict]``, each dict a claim row with the fields of
    :data:`CLAIM_FIELDS` (the runner computes the verdict); an empty list when it has nothing for that paper. The
    runner calls it in ``--full`` mode after the paper's own claim module, with ``out_dir = <out>/<key>/real`` and
    ``seeds`` = ``--seeds`` (None: the experiment's own default, as for the claim modules).
    """
    if importlib.util.find_spec(REAL_CLAIMS_MODULE) is None:
        return None
    return getattr(importlib.import_module(REAL_CLAIMS_MODULE), "claims", None)


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished child processes (built-in checkpoint training)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def single_thread() -> None:
    """Run torch on one thread (here and, through ``OMP_NUM_THREADS``, in the built-in checkpoint trainings it
    starts) unless ``OMP_NUM_THREADS`` says otherwise. The experiments' models are tiny: a second thread only adds
    synchronisation (on the 2-core machine an AdEMAMix claim step took 0.033 CPU s on one thread, 0.72 on two)."""
    import torch

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(max(1, int(os.environ["OMP_NUM_THREADS"])))


def run_paper(key: str, mode: str, seeds: int | None, out: Path, progress: Progress) -> dict:
    """Run one paper's claim module; never raises: a failure is returned as ``status: failed`` with its error."""
    start, cpu_start = time.perf_counter(), cpu_seconds()
    paper_dir = out / key
    record = {"status": "failed", "seconds": 0.0, "error": None, "claims": [], "figures": [], "settings": {},
              "tensorboard": [], "mode": mode, "seeds": seeds, "code": module_digest(key)}
    try:
        try:
            module = importlib.import_module(CLAIM_MODULES[key])
        except ModuleNotFoundError as e:
            if e.name != CLAIM_MODULES[key]:
                raise  # the module exists but needs something missing: that error names it
            raise RuntimeError(f"claim module {CLAIM_MODULES[key]} is not available ({e})") from e
        paper_dir.mkdir(parents=True, exist_ok=True)
        result = module.run(mode, seeds, paper_dir, progress)
        record["claims"] = _checked_claims(result, key)
        record["figures"] = [f"{key}/{Path(f).as_posix()}" for f in result.get("figures", [])]
        record["settings"] = result.get("settings", {})
        add_real_claims(record, key, mode, seeds, paper_dir, progress)
        record["status"] = "ok"
    except SIGTERMException:  # the run was stopped (kill, a scheduler's preemption): not a result of this paper
        raise
    except (Exception, SystemExit) as e:  # noqa: BLE001 - failure isolation: record it, run the other papers
        # SystemExit too: LightningCLI/argparse exit on a bad config; only Ctrl-C or SIGTERM stop the whole run
        record["error"] = f"{type(e).__name__}: {e}"
        record["traceback"] = traceback.format_exc()
        progress(f"FAILED: {record['error']}", None)
    record["seconds"] = round(time.perf_counter() - start, 1)
    record["cpu_seconds"] = round(cpu_seconds() - cpu_start, 1)
    record["tensorboard"] = sorted({p.parent.relative_to(out).as_posix()
                                    for p in paper_dir.rglob("events.out.tfevents*")}) if paper_dir.exists() else []
    return record


def add_real_claims(record: dict, key: str, mode: str, seeds: int | None, paper_dir: Path, progress: Progress) -> None:
    """In ``--full`` mode, (re)place the last ``record["real_claims"]`` claims of ``record`` by the real-model
    hook's rows for ``key`` (:func:`real_claims_hook`, run in ``paper_dir/real``) and count them there. So a paper
    result reused from an earlier run gets the real-model rows of the experiments' current records, which the hook
    reuses when finished and runs when missing. An error from the hook propagates."""
    real = real_claims_hook() if mode == "full" else None
    if real is None:
        return
    own = record["claims"][:len(record["claims"]) - record.get("real_claims", 0)]
    progress(f"real-model claims ({REAL_CLAIMS_MODULE}.claims)", None)
    real_dir = paper_dir / "real"
    real_dir.mkdir(parents=True, exist_ok=True)
    rows = real(key, mode, real_dir, seeds)
    record["claims"] = own + (_checked_claims({"claims": rows}, key, REAL_CLAIMS_MODULE) if rows else [])
    record["real_claims"] = len(record["claims"]) - len(own)


def module_digest(key: str) -> str | None:
    """sha1 (12 hex digits) of the source of ``key``'s claim module (None when it is missing): a saved result is
    reused only by the code (and the settings tables in it) that made it."""
    try:
        spec = importlib.util.find_spec(CLAIM_MODULES[key])
    except ModuleNotFoundError:
        return None
    if spec is None or spec.origin is None or not Path(spec.origin).is_file():
        return None
    return hashlib.sha1(Path(spec.origin).read_bytes()).hexdigest()[:12]


def _saved(out: Path, key: str, mode: str, seeds: int | None, failed_too: bool = False) -> dict | None:
    """The finished result of ``key`` saved by an earlier run with the same mode, seeds and claim-module source,
    else None; a failed one only with ``failed_too`` (what a child process just recorded)."""
    path = out / "papers" / f"{key}.json"
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    if ((failed_too or record.get("status") == "ok") and record.get("mode") == mode and record.get("seeds") == seeds
            and record.get("code") == module_digest(key)):
        return record
    return None


def results_document(mode: str, papers: dict[str, dict], command: str, config: dict) -> dict:
    """The ``results.json`` object (schema: issue 14), plus the command, config and the verdict rule."""
    keep = ("status", "seconds", "cpu_seconds", "error", "claims", "figures", "settings", "tensorboard")
    return {"mode": mode, "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine_info(), "versions": versions(), "command": command, "config": config,
            "verdict_rule": VERDICT_RULE,
            "papers": {k: {f: p.get(f) for f in keep} for k, p in papers.items()}}


def _number(x: float | None) -> str:
    return "–" if x is None else f"{x:.4g}"


def _cell(text: str) -> str:
    """``text`` safe inside a markdown table cell (pipes escaped, one line)."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def margin(claim: dict) -> float | None:
    """d / s of a claim (the verdict rule's d and s): how many spreads ours is ahead of the baseline; the verdict
    changes at ±2. ±inf when s = 0 and d ≠ 0 (identical differences at every seed); None without a spread."""
    s = claim["spread"]
    if s is None or not all(math.isfinite(x) for x in (claim["ours"], claim["baseline"], s)):
        return None
    d = claim["ours"] - claim["baseline"]
    d = d if claim["higher_is_better"] else -d
    if s == 0:
        return None if d == 0 else math.copysign(math.inf, d)
    return d / s


def _margin_cell(claim: dict) -> str:
    """d/s with a "close" mark when it lies within one spread of the ±2 thresholds (1 ≤ |d/s| ≤ 3): one more
    seed could change such a verdict; "s = 0" when every seed gave the same difference."""
    m = margin(claim)
    if m is None:
        return "–"
    if math.isinf(m):
        return f"{'+' if m > 0 else '-'}∞ (s = 0)"
    return f"{m:+.1f}" + (" (close)" if 1 <= abs(m) <= 3 else "")


def _claim_rows(key: str | None, claims: list[dict], with_margin: bool = False) -> list[str]:
    rows = []
    for c in claims:
        c = {**c, **{f: _cell(c[f]) for f in ("claim", "metric", "baseline_name")}}
        spread = "" if c["spread"] is None else f" ± {_number(c['spread'])}"
        better = "higher" if c["higher_is_better"] else "lower"
        first = f"{key} | " if key else ""
        extra = f"{_margin_cell(c)} | " if with_margin else ""
        rows.append(f"| {first}{c['claim']} | {c['metric']} ({better} is better) | {_number(c['ours'])}{spread} | "
                    f"{_number(c['baseline'])} ({c['baseline_name']}) | {extra}{c['verdict']} |")
    return rows


def no_signal(claim: dict) -> bool:
    """A claim whose ours, baseline and spread are all 0 (e.g. an accuracy that is 0 for both at every seed): it
    carries no evidence either way and is listed apart in the report rather than as a claim."""
    return claim["ours"] == 0 and claim["baseline"] == 0 and not claim["spread"]


def _verdict_counts(claims: list[dict]) -> str:
    """``'5: 2 reproduced, 1 not reproduced, 2 inconclusive'`` (verdicts in a fixed order, absent ones left out;
    claims without signal, :func:`no_signal`, not counted)."""
    claims = [c for c in claims if not no_signal(c)]
    if not claims:
        return "0"
    counts = [(v, sum(c["verdict"] == v for c in claims)) for v in ("reproduced", "not reproduced", "inconclusive")]
    return f"{len(claims)}: " + ", ".join(f"{n} {v}" for v, n in counts if n)


def render_results_table(results: dict) -> str:
    """The README's "results at a glance" table: per paper of ``results`` (results.json) its headline claim (the
    first) and the verdicts of all its claims; every claim is in the report next to it."""
    m = results["machine"]
    lines = [f"From `reproduce --{results['mode']}`, {results['created'][:10]}, {m['cpu']} ({m['cores']} cores)"
             + (f", {m['gpu']}" if m.get("gpu") else "")
             + ". ± = spread of the difference ours − baseline (see the verdict rule).",
             "",
             "| paper | headline claim | metric | ours ± spread | baseline | verdict | all claims |",
             "|---|---|---|---|---|---|---|"]
    for key, paper in results["papers"].items():
        if paper["status"] != "ok":
            lines.append(f"| {key} | failed: {_cell(paper['error'])} | | | | | {_verdict_counts(paper['claims'])} |")
        elif paper["claims"]:
            lines.append(_claim_rows(key, paper["claims"][:1])[0] + f" {_verdict_counts(paper['claims'])} |")
    return "\n".join(lines) + "\n"


#: Settings a claim module fills to explain its numbers (a warning about its own design's premise, why a number that
#: looks like a bug is not one): printed as notes above the paper's claims, not in its settings table.
NOTE_SETTINGS = ("warning", "margin_warning", "lrml_below_chance", "notes")
SETTING_CELL_LIMIT = 120  # longer settings (per-seed values, grids) go in a folded block under the table


def _settings_block(settings: dict) -> list[str]:
    """A paper's settings as a two-column table (short values) and a folded JSON block (long ones)."""
    short, long = [], {}
    for key in sorted(settings):
        if key == "design" or key in NOTE_SETTINGS:
            continue
        text = json.dumps(settings[key], default=str)
        if len(text) <= SETTING_CELL_LIMIT:
            short.append(f"| {_cell(key)} | `{_cell(text)}` |")
        else:
            long[key] = settings[key]
    lines = ["", "| setting | value |", "|---|---|", *short] if short else []
    if long:
        lines += ["", f"<details><summary>per-seed values and other long settings ({', '.join(sorted(long))})"
                  "</summary>", "", "```json", json.dumps(long, indent=1, sort_keys=True, default=str), "```", "",
                  "</details>"]
    return lines


def _link(path: str) -> str:
    """A markdown link to a relative ``path`` that renders whatever the folder name holds (spaces, parentheses:
    the target is percent-encoded)."""
    return f"[{path}]({urllib.parse.quote(path)})"


def _summary_table(results: dict) -> list[str]:
    """One row per paper: its headline (first) claim, the verdict, the margin and the time."""
    lines = ["| paper | headline claim | ours | baseline | d/s | verdict | time |", "|---|---|---|---|---|---|---|"]
    for key, paper in results["papers"].items():
        minutes = f"{paper['seconds'] / 60:.0f} min"
        if paper["status"] != "ok" or not paper["claims"]:
            what = f"failed: {_cell(paper['error'])}" if paper["status"] != "ok" else "no claims"
            lines.append(f"| [{key}](#{key}) | {what} | | | | | {minutes} |")
            continue
        c = paper["claims"][0]
        lines.append(f"| [{key}](#{key}) | {_cell(c['claim'])} | {_number(c['ours'])} | {_number(c['baseline'])} "
                     f"({_cell(c['baseline_name'])}) | {_margin_cell(c)} | {c['verdict']} | {minutes} |")
    return lines


def render_report(results: dict) -> str:
    """``report.md``: a summary table, then per paper its design, claims (with d/s), settings, figures and logs."""
    m, v = results["machine"], results["versions"]
    lines = [f"# litpapers reproduce --{results['mode']}", "",
             f"Created {results['created']} with `{results['command']}`.", "",
             f"- machine: {m['cpu']}, {m['cores']} cores, {m['os']}" + (f", GPU {m['gpu']}" if m.get("gpu") else ""),
             "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val is not None),
             f"- verdict rule: {results['verdict_rule']}",
             "- columns: ours ± s, where s is the sample standard deviation over training seeds of the paired "
             "difference ours − baseline; d/s = that difference (signed so that positive favours ours) in units of "
             "s: the verdict flips at ±2, and (close) marks 1 ≤ |d/s| ≤ 3",
             f"- config: `{json.dumps(results['config'])}`", "", "## Summary", "", *_summary_table(results), ""]
    for key, paper in results["papers"].items():
        settings = paper.get("settings") or {}
        lines += [f"## {key}", "", f"Status: **{paper['status']}**, {paper['seconds']:.0f} s wall-clock, "
                  f"{paper.get('cpu_seconds') or 0:.0f} s CPU time (on a shared machine the CPU time is the better "
                  "guide to the time on an idle one)."]
        if settings.get("design"):
            lines += ["", f"Design: {settings['design']}."]
        lines += [line for key in NOTE_SETTINGS if settings.get(key) for line in ("", f"Note: {settings[key]}")]
        if paper["error"]:
            lines += ["", f"Error: `{paper['error']}` (traceback in `papers/{key}.json`)"]
        shown = [c for c in paper["claims"] if not no_signal(c)]
        if shown:
            lines += ["", "| claim | metric | ours ± s | baseline | d/s | verdict |", "|---|---|---|---|---|---|",
                      *_claim_rows(None, shown, with_margin=True)]
        empty = [c for c in paper["claims"] if no_signal(c)]
        if empty:
            lines += ["", "No signal (ours, baseline and spread all 0, so not counted as claims): " + "; ".join(
                f"{_cell(c['claim'])} — {_cell(c['metric'])}" for c in empty) + "."]
        if settings:
            lines += _settings_block(settings)
        if paper.get("tensorboard"):
            lines += ["", "TensorBoard logs: " + ", ".join(_link(d) for d in paper["tensorboard"])]
        lines += [""] + [f"![{Path(f).stem}]({f})" for f in paper.get("figures") or []] + [""]
    return "\n".join(lines)


def write_outputs(out: Path, mode: str, papers: dict[str, dict], command: str, config: dict) -> dict:
    results = results_document(mode, papers, command, config)
    atomic_write(out / "results.json", json.dumps(results, indent=1, default=str) + "\n")
    atomic_write(out / "report.md", render_report(results))
    return results


def program_name(process_argv: Sequence[str]) -> str:
    """How the user started this run, from the process's ``sys.argv``: ``litpapers reproduce`` through the
    ``litpapers`` console script (or ``python -m cli reproduce``), else ``python -m benchmarks.reproduce``."""
    head = Path(process_argv[0]) if process_argv else Path()
    via_cli = head.name in ("litpapers", "cli.py")
    return "litpapers reproduce" if via_cli and list(process_argv[1:2]) == ["reproduce"] else (
        "python -m benchmarks.reproduce")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog=program_name(sys.argv), description=__doc__.split("\n")[0])
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help="the small settings (default; ≤ 15 min on 2 CPU cores)")
    group.add_argument("--full", action="store_true", help="the documented larger settings (hours)")
    ap.add_argument("--only", default=None, help=f"comma-separated paper keys out of {','.join(PAPERS)}")
    ap.add_argument("--seeds", type=int, default=None, help="training seeds per experiment (default: the mode's)")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default reports/<mode>-<date>)")
    ap.add_argument("--jobs", type=int, default=1,
                    help="papers run at once, each in its own process (e.g. the CPU cores: `make demo` uses them "
                         "all); 1 (default) runs them one after another in this process")
    ap.add_argument("--update-readme", type=Path, default=None, metavar="RESULTS_JSON",
                    help="only rewrite README.md's results block from a committed results.json, then exit")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)  # "i/n/start": one paper for a parent run
    args = ap.parse_args(argv)
    args.mode = "full" if args.full else "quick"
    keys = args.only.split(",") if args.only else list(PAPERS)
    unknown = [k for k in keys if k not in PAPERS]
    if unknown:
        ap.error(f"--only: unknown paper keys {unknown}; choose from {','.join(PAPERS)}")
    args.keys = [k for k in PAPERS if k in keys]
    if args.seeds is not None and args.seeds < 1:
        ap.error(f"--seeds must be >= 1, got {args.seeds}")
    if args.jobs is not None and args.jobs < 1:
        ap.error(f"--jobs must be >= 1, got {args.jobs}")
    args.out = args.out or Path("reports") / f"{args.mode}-{dt.date.today().isoformat()}"
    return args


README_BEGIN, README_END = "<!-- results:begin -->\n", "<!-- results:end -->"


def update_readme(readme: Path, results: dict) -> None:
    """Replace what lies between ``README_BEGIN`` and ``README_END`` in ``readme`` by
    :func:`render_results_table` of ``results`` (the README's numbers are never typed)."""
    text = readme.read_text()
    if README_BEGIN not in text or README_END not in text:
        raise ValueError(f"{readme}: no {README_BEGIN.strip()} ... {README_END} block to fill")
    head, rest = text.split(README_BEGIN, 1)
    atomic_write(readme, head + README_BEGIN + render_results_table(results) + README_END + rest.split(README_END, 1)[1])


#: What a child process runs: this module's ``main`` with the parent's claim-module table (``sys.argv[1]``, JSON).
CHILD_SCRIPT = ("import json, sys; from benchmarks import reproduce; "
                "reproduce.CLAIM_MODULES.update(json.loads(sys.argv[1])); sys.exit(reproduce.main(sys.argv[2:]))")


def child_command(key: str, index: int, total: int, start: float, args: argparse.Namespace) -> list[str]:
    """The command line of the process that runs paper ``key`` for a parent run started at ``start`` (epoch s)."""
    return [sys.executable, "-c", CHILD_SCRIPT, json.dumps(CLAIM_MODULES), f"--{args.mode}", "--only", key,
            "--out", str(args.out), "--jobs", "1", "--child", f"{index}/{total}/{start}",
            *(["--seeds", str(args.seeds)] if args.seeds is not None else [])]


def run_children(keys: list[str], args: argparse.Namespace, jobs: int, start: float) -> dict[str, int]:
    """Run each paper of ``keys`` in its own process (:func:`child_command`), at most ``jobs`` at once; each saves
    its result to ``<out>/papers/<key>.json`` and prints its own progress lines. Returns each process's exit code."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(  # the children import what the parent imports
        p for p in sys.path if p and Path(p).is_dir()))
    queue = [(args.keys.index(key) + 1, key) for key in keys]
    running: dict[str, subprocess.Popen] = {}
    codes: dict[str, int] = {}
    try:
        while queue or running:
            while queue and len(running) < jobs:
                index, key = queue.pop(0)
                running[key] = subprocess.Popen(child_command(key, index, len(args.keys), start, args), env=env)
            for key, proc in list(running.items()):
                if proc.poll() is not None:
                    codes[key] = proc.returncode
                    del running[key]
            time.sleep(0.2)
    finally:
        for proc in running.values():  # interrupted: the children got the same signal; wait for them to save
            proc.wait()
    return codes


def main(argv: Sequence[str] | None = None) -> int:
    """Run the selected papers (skipping finished ones in ``--out``), ``--jobs`` of them at once in child
    processes; 0 if all are ``ok``, else 1."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.update_readme is not None:
        update_readme(Path(__file__).resolve().parents[1] / "README.md", json.loads(args.update_readme.read_text()))
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    single_thread()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    command = " ".join([program_name(sys.argv), *argv])
    config = {"mode": args.mode, "only": args.keys, "seeds": args.seeds, "out": str(out)}
    start, index, total = time.time(), None, len(args.keys)
    if args.child:  # one paper of a parent run: its place in the parent's list and the parent's clock
        index, total, start = int(args.child.split("/")[0]), int(args.child.split("/")[1]), float(
            args.child.split("/")[2])
    console = Console()
    todo = [k for k in args.keys if _saved(out, k, args.mode, args.seeds) is None]
    jobs = 1 if args.child else min(args.jobs, max(1, len(todo)))
    codes = run_children(todo, args, jobs, start) if jobs > 1 and len(todo) > 1 else {}
    papers: dict[str, dict] = {}
    for i, key in enumerate(args.keys, 1):
        progress = _console_progress(key, index or i, total, start, console)
        saved = _saved(out, key, args.mode, args.seeds, failed_too=key in codes)
        if key in codes:  # ran in a child process, which printed its own progress
            papers[key] = saved or {
                "status": "failed", "seconds": 0.0, "cpu_seconds": 0.0, "claims": [], "figures": [], "settings": {},
                "tensorboard": [], "error": f"its process exited with code {codes[key]} without a result (output: "
                                            f"{out / key / 'console.log'})"}
            if saved is None:  # killed before it could record anything
                progress(f"FAILED: {papers[key]['error']}", None)
            continue
        with paper_output_to(out / key / "console.log", console):
            if saved is not None:
                progress(f"already finished in {out} ({saved['seconds']:.0f} s), skipped", 1.0)
                try:
                    add_real_claims(saved, key, args.mode, args.seeds, out / key, progress)
                except (Exception, SystemExit) as e:  # noqa: BLE001 - as in run_paper; the saved result stays
                    papers[key] = saved | {"status": "failed", "error": f"{type(e).__name__}: {e}"}
                    progress(f"FAILED: {papers[key]['error']}", None)
                else:
                    atomic_write(out / "papers" / f"{key}.json", json.dumps(saved, indent=1, default=str) + "\n")
                    papers[key] = saved
            else:
                progress(f"starting (its output: {out / key / 'console.log'})", 0.0)
                papers[key] = run_paper(key, args.mode, args.seeds, out, progress)
                atomic_write(out / "papers" / f"{key}.json", json.dumps(papers[key], indent=1, default=str) + "\n")
                progress(f"{papers[key]['status']} in {papers[key]['seconds']:.0f} s", 1.0)
        if not args.child:  # a child leaves results.json and report.md to its parent
            write_outputs(out, args.mode, papers, command, config)
    if not args.child:
        write_outputs(out, args.mode, papers, command, config)
    failed = [k for k, p in papers.items() if p["status"] != "ok"]
    if not args.child:
        console.print(f"[reproduce {_clock(time.time() - start)}] done ({jobs} paper(s) at once); report: {out / 'report.md'}; results: {out / 'results.json'}"
                      + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    console.close()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
