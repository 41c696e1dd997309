"""Command-line arguments every CPU/GPU benchmark shares."""

from __future__ import annotations

import argparse

import torch


def benchmark_parser(doc: str | None, quick_help: str) -> argparse.ArgumentParser:
    """A parser with ``--device cpu|cuda``, ``--threads N`` and ``--quick`` (described by ``quick_help``)."""
    parser = argparse.ArgumentParser(description=(doc or "").split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (use 1 on a shared machine: idle-spinning threads slow down ~10x)")
    parser.add_argument("--quick", action="store_true", help=quick_help)
    return parser


def apply_threads(args: argparse.Namespace) -> None:
    """Set torch's CPU thread count when ``--threads`` was given."""
    if args.threads:
        torch.set_num_threads(args.threads)
