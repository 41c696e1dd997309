"""Run one ``litpapers`` command under ``/usr/bin/time -v`` and record what it logged: a JSON file whose every number
comes from the run (wall-clock and peak memory from ``time -v``, the last value of every TensorBoard scalar of the
run's log directory, and the callbacks' own JSON results found there, e.g. ``quantization_eval.json``).

    python -m benchmarks.fit_record --out docs/results/real_fit_qdpo.json --log-root logs/qdpo_smollm2 \\
        -- litpapers fit --config configs/qdpo/smollm2.yaml

The run's log directory is the newest ``version_*`` folder under ``--log-root`` created after the command started
(the TensorBoard logger's ``save_dir/name``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import re
import subprocess
import sys
import time

#: ``/usr/bin/time -v`` lines read into the record (label -> key)
TIME_FIELDS = {"Elapsed (wall clock) time (h:mm:ss or m:ss)": "wall_s", "User time (seconds)": "user_s",
               "System time (seconds)": "sys_s", "Maximum resident set size (kbytes)": "max_rss_kb",
               "Exit status": "exit_status"}


def clock_seconds(text: str) -> float:
    """``"h:mm:ss.ss"`` or ``"m:ss.ss"`` (GNU time's elapsed format) in seconds: Σ field_i · 60^(n−1−i)."""
    seconds = 0.0
    for part in text.strip().split(":"):
        seconds = seconds * 60 + float(part)
    return seconds


def parse_time_v(text: str) -> dict[str, float]:
    """The :data:`TIME_FIELDS` of GNU ``time -v``'s report (``<label>: <value>`` lines), as numbers."""
    out = {}
    for line in text.splitlines():
        label, sep, value = line.strip().rpartition(": ")
        if sep and label in TIME_FIELDS:
            key = TIME_FIELDS[label]
            out[key] = clock_seconds(value) if key == "wall_s" else float(value)
    return out


def last_scalars(log_dir: pathlib.Path) -> dict[str, dict[str, float]]:
    """Per TensorBoard scalar tag of the event files in ``log_dir``: its last ``step`` and ``value``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0}).Reload()
    return {tag: {"step": acc.Scalars(tag)[-1].step, "value": acc.Scalars(tag)[-1].value}
            for tag in sorted(acc.Tags()["scalars"])}


def new_log_dir(log_root: pathlib.Path, since: float) -> pathlib.Path | None:
    """The newest ``version_*`` folder of ``log_root`` modified at or after ``since`` (epoch seconds), if any."""
    found = [p for p in log_root.glob("version_*") if p.is_dir() and p.stat().st_mtime >= since]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, required=True, help="the JSON record to write")
    parser.add_argument("--log-root", type=pathlib.Path, required=True,
                        help="the TensorBoard logger's save_dir/name folder of the command")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- the command to run")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --")
    start = time.time()
    proc = subprocess.run(["/usr/bin/time", "-v", *command], stderr=subprocess.PIPE, text=True)
    sys.stderr.write(proc.stderr[-4000:])
    timing = parse_time_v(proc.stderr)
    log_dir = new_log_dir(args.log_root, start)
    record = {
        "command": " ".join(command), "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "LITPAPERS_CACHE")},
        "returncode": proc.returncode, "time_v": timing,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"description": "2-core CPU shared with other jobs", "platform": platform.platform(),
                    "cpus": os.cpu_count()},
        "log_dir": None if log_dir is None else log_dir.as_posix(),
        "scalars": {} if log_dir is None else last_scalars(log_dir),
        "results": {} if log_dir is None else {p.name: json.loads(p.read_text()) for p in sorted(log_dir.glob("*.json"))},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps({k: record[k] for k in ("command", "returncode", "time_v", "log_dir")}))
    return record


if __name__ == "__main__":
    main()
