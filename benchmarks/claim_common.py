"""Shared pieces of the claim experiments (``benchmarks/claim_*.py``) that ``litpapers reproduce`` runs.

Each experiment module exposes ``run(mode, seeds, out_dir, progress) -> dict`` returning
``{"claims": [...], "figures": [...], "settings": {...}}``; each claim is built by :func:`claim`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import torch


def paired_spread(ours: Sequence[float], baseline: Sequence[float]) -> float | None:
    """Sample standard deviation over seeds of the paired difference: stdev(ours_i − baseline_i).

    None with fewer than two seeds (no estimate of the seed-to-seed noise).
    """
    if len(ours) != len(baseline):
        raise ValueError(f"paired_spread: {len(ours)} values for ours but {len(baseline)} for the baseline")
    if len(ours) < 2:
        return None
    return statistics.stdev(o - b for o, b in zip(ours, baseline))


def claim(text: str, metric: str, ours: list[float], baseline: list[float], baseline_name: str,
          higher_is_better: bool) -> dict:
    """One claim row from per-seed values of ours and of the baseline (paired by seed).

    ``ours``/``baseline`` are the means over seeds; ``spread`` is the sample standard deviation over seeds of the
    paired difference ours − baseline (``None`` with a single seed), the scale on which the runner's verdict rule
    compares the gap.
    """
    if not ours or len(ours) != len(baseline):
        raise ValueError(f"claim {text!r}: need one baseline value per seed, got {len(ours)} and {len(baseline)}")
    return {"claim": text, "metric": metric, "ours": statistics.fmean(ours), "baseline": statistics.fmean(baseline),
            "baseline_name": baseline_name, "higher_is_better": higher_is_better,
            "spread": paired_spread(ours, baseline)}


def log_scalars(save_dir: pathlib.Path, name: str, version: str, series: dict[str, float | Sequence[float]]) -> None:
    """Write ``series`` as the TensorBoard run ``save_dir/name/version`` (what the report links): each key's values
    at steps 0, 1, 2, ... (a single number at step 0). For experiments whose training loop logs nothing itself."""
    from lightning.pytorch.loggers import TensorBoardLogger

    logger = TensorBoardLogger(save_dir, name=name, version=version, default_hp_metric=False)
    for key, values in series.items():
        for step, value in enumerate([values] if isinstance(values, (int, float)) else values):
            logger.log_metrics({key: float(value)}, step=step)
    logger.finalize("success")


def mode_settings(modes: dict[str, dict], mode: str, seeds: int | None, overrides: dict | None) -> dict:
    """The settings of a run: ``modes[mode]`` updated by ``overrides``, with ``seeds`` when given.

    ``mode`` must be ``quick`` or ``full`` and ``seeds`` ``None`` or ≥ 1 (``ValueError`` naming the argument).
    """
    if mode not in ("quick", "full"):
        raise ValueError(f"mode must be 'quick' or 'full', got {mode!r}")
    if seeds is not None and seeds < 1:
        raise ValueError(f"seeds must be >= 1 or None, got {seeds}")
    settings = {**modes[mode], **(overrides or {})}
    if seeds is not None:
        settings["seeds"] = seeds
    return settings


def write_record(result: dict, path: pathlib.Path, module: str, args: list[str]) -> None:
    """``result`` plus the command line, UTC date and machine description, as indented JSON at ``path``."""
    record = dict(result, command=" ".join(["python -m", module, *args]),
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  machine={"description": "2-core CPU shared with other jobs", "platform": platform.platform(),
                           "cpus": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads()})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1, default=str) + "\n")


def claim_parser(doc: str, name: str) -> argparse.ArgumentParser:
    """The command line every claim experiment shares: ``--full``, ``--seeds``, ``--out`` (default
    ``reports/<name>``) and ``--json``; the module adds its own overrides. ``doc``'s first line describes it."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--full", action="store_true")
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("reports") / name)
    parser.add_argument("--json", type=pathlib.Path, default=None,
                        help="also write the result (with command, date and machine) to this file")
    return parser


def run_and_record(run: Callable[..., dict], args: argparse.Namespace, overrides: dict | None, name: str,
                   argv: list[str] | None) -> dict:
    """``run(mode, seeds, out, progress, overrides)`` as the parsed :func:`claim_parser` ``args`` ask, with its
    wall-clock ``seconds`` added; written by :func:`write_record` (module ``benchmarks.<name>``) when ``--json``
    is given, printed as JSON and returned."""
    start = time.perf_counter()
    result = run("full" if args.full else "quick", args.seeds, args.out, lambda msg: print(msg, flush=True),
                 overrides)
    result["seconds"] = time.perf_counter() - start
    if args.json:
        write_record(result, args.json, f"benchmarks.{name}", sys.argv[1:] if argv is None else argv)
    print(json.dumps(result, default=str))
    return result


def fill_block(doc: pathlib.Path, begin: str, end: str, text: str) -> None:
    """Replace what lies between the markers ``begin`` and ``end`` in ``doc`` by ``text``."""
    content = doc.read_text()
    if begin not in content or end not in content:
        raise ValueError(f"{doc}: no block between {begin!r} and {end!r} to fill")
    head, rest = content.split(begin, 1)
    doc.write_text(f"{head}{begin}\n{text}\n{end}{rest.split(end, 1)[1]}")
