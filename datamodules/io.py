"""Reading the data formats users bring: text files, directories, JSON/JSONL, HF datasets saved to disk.

Every reader raises one clear error naming the file (and line) it could not use.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lm.extras import require

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")
RECORD_SUFFIXES = (".jsonl", ".json")


def is_saved_hf_dataset(path: Path) -> bool:
    """True for a directory written by ``datasets.Dataset(Dict).save_to_disk``."""
    return path.is_dir() and ((path / "dataset_info.json").exists() or (path / "state.json").exists()
                              or (path / "dataset_dict.json").exists())


def load_saved_hf_dataset(path: Path, split: str = "train") -> list[dict[str, Any]]:
    """Rows of a dataset saved with ``save_to_disk`` (a ``DatasetDict`` uses ``split``)."""
    datasets = require("datasets", "data")
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise ValueError(f"{path}: saved DatasetDict has splits {list(ds)}, not {split!r}")
        ds = ds[split]
    return [dict(row) for row in ds]


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Rows from a ``.jsonl`` file (one JSON object per line), a ``.json`` list of objects, or a saved HF dataset."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist")
    if is_saved_hf_dataset(path):
        return load_saved_hf_dataset(path)
    text = _read_text(path)
    if path.suffix == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
        if isinstance(rows, dict) and "data" in rows:
            rows = rows["data"]
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise ValueError(f"{path}: expected a JSON list of objects")
        return rows
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
        row["_line"] = lineno
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no records")
    return rows


def iter_text_documents(path: str | Path, text_field: str = "text") -> Iterator[tuple[str, str]]:
    """Yield ``(source, text)`` documents from a text file, a JSONL/JSON file (``text_field`` of each row),
    a saved HF dataset, or a directory of those (recursively, sorted for reproducibility)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"text data path {str(path)!r} does not exist")
    if is_saved_hf_dataset(path) or (path.is_file() and path.suffix in RECORD_SUFFIXES):
        for i, row in enumerate(read_records(path)):
            if text_field not in row:
                where = f"{path}:{row.get('_line', i + 1)}"
                raise KeyError(f"{where}: record has no {text_field!r} field (fields: {sorted(row)})")
            yield f"{path}:{row.get('_line', i + 1)}", str(row[text_field])
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES + RECORD_SUFFIXES)
        if not files:
            raise ValueError(f"directory {path} has no {TEXT_SUFFIXES + RECORD_SUFFIXES} files")
        for f in files:
            yield from iter_text_documents(f, text_field)
    else:
        yield str(path), _read_text(path)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
