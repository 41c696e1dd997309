"""benchmarks/fit_record.py: GNU ``time -v`` parsing (hand-written report) and the record of a command that logs
TensorBoard scalars and a callback's JSON, read back from its new log directory."""

import json
import sys

import pytest

from benchmarks import fit_record

TIME_V = """\tCommand being timed: "litpapers fit --config c.yaml"
\tUser time (seconds): 512.25
\tSystem time (seconds): 7.50
\tPercent of CPU this job got: 98%
\tElapsed (wall clock) time (h:mm:ss or m:ss): 1:02:03.50
\tMaximum resident set size (kbytes): 2048000
\tExit status: 0
"""


def test_time_v_report_is_parsed():
    assert fit_record.parse_time_v(TIME_V) == {"user_s": 512.25, "sys_s": 7.5, "wall_s": 3600 + 2 * 60 + 3.5,
                                               "max_rss_kb": 2048000.0, "exit_status": 0.0}
    assert fit_record.clock_seconds("9:12.34") == pytest.approx(9 * 60 + 12.34)


WRITER = """
import json, pathlib
from torch.utils.tensorboard import SummaryWriter
d = pathlib.Path("logs/run/version_3"); w = SummaryWriter(str(d))
for step, loss in enumerate([0.7, 0.5, 0.25]):
    w.add_scalar("train/loss", loss, step)
w.add_scalar("val/quant_final/flip_rate", 0.125, 2); w.close()
(d / "quantization_eval.json").write_text(json.dumps([{"stage": "val/fp", "flip_rate": 0.0}]))
"""


def test_a_command_is_recorded_from_what_it_logged(tmp_path):
    (tmp_path / "logs/run/version_1").mkdir(parents=True)  # an older run: not this command's
    out = tmp_path / "record.json"
    fit_record.main(["--out", str(out), "--log-root", "logs/run", "--", sys.executable, "-c", WRITER])
    record = json.loads(out.read_text())
    assert record["returncode"] == 0 and record["log_dir"] == "logs/run/version_3"
    assert record["scalars"]["train/loss"] == {"step": 2, "value": 0.25}
    assert record["scalars"]["val/quant_final/flip_rate"] == {"step": 2, "value": 0.125}
    assert record["results"] == {"quantization_eval.json": [{"stage": "val/fp", "flip_rate": 0.0}]}
    assert record["time_v"]["exit_status"] == 0 and record["time_v"]["wall_s"] > 0
    with pytest.raises(SystemExit):
        fit_record.main(["--out", str(out), "--log-root", "logs/run"])
