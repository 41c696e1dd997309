"""``benchmarks.reproduce``: verdict rule, failure isolation, resume after SIGKILL, results.json schema, README table.

Claim modules are replaced by tiny fake modules written into the test's directory (no training)."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from benchmarks import reproduce
from benchmarks.reproduce import verdict

ROOT = Path(__file__).resolve().parents[1]

FAKE_OK = """
import pathlib
def run(mode, seeds, out_dir, progress):
    with open(pathlib.Path(out_dir).parents[1] / "calls.txt", "a") as f:
        f.write("{name}\\n")
    progress("working", 0.5)
    (out_dir / "fig.png").write_bytes(b"png")
    return {{"claims": [{{"claim": "{name} beats base", "metric": "acc", "ours": {ours}, "baseline": 0.5,
                         "baseline_name": "base", "higher_is_better": True, "spread": 0.01}}],
            "figures": ["fig.png"], "settings": {{"mode": mode, "seeds": seeds}}}}
"""
FAKE_RAISE = """
def run(mode, seeds, out_dir, progress):
    raise RuntimeError("boom in the experiment")
"""
FAKE_EXIT = """
def run(mode, seeds, out_dir, progress):
    raise SystemExit(2)  # what LightningCLI does on a config error
"""
FAKE_SIGTERM = """
from lightning.pytorch.utilities.exceptions import SIGTERMException
def run(mode, seeds, out_dir, progress):
    raise SIGTERMException(1)  # what Lightning raises inside fit when the process gets SIGTERM
"""
FAKE_SLOW = """
import pathlib, time
def run(mode, seeds, out_dir, progress):
    root = pathlib.Path(out_dir).parents[1]
    with open(root / "calls.txt", "a") as f:
        f.write("slow\\n")
    while not (root / "allow_finish").exists():
        time.sleep(0.1)
    return {"claims": [{"claim": "slow claim", "metric": "err", "ours": 1.0, "baseline": 2.0,
                        "baseline_name": "DT", "higher_is_better": False, "spread": None}],
            "figures": [], "settings": {}}
"""


def write_fakes(folder: Path) -> None:
    (folder / "fake_ok_a.py").write_text(FAKE_OK.format(name="a", ours=0.9))
    (folder / "fake_ok_b.py").write_text(FAKE_OK.format(name="b", ours=0.505))
    (folder / "fake_raise.py").write_text(FAKE_RAISE)
    (folder / "fake_exit.py").write_text(FAKE_EXIT)
    (folder / "fake_slow.py").write_text(FAKE_SLOW)
    (folder / "fake_sigterm.py").write_text(FAKE_SIGTERM)


@pytest.fixture
def fakes(tmp_path, monkeypatch):
    write_fakes(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m.startswith("fake_")]:  # imported from an earlier test's folder
        monkeypatch.delitem(sys.modules, name)
    return tmp_path


# ------------------------------------------------------------------------------------------------- verdict rule
@pytest.mark.parametrize("ours, baseline, higher, spread, expected", [
    (0.80, 0.70, True, 0.04, "reproduced"),        # d = 0.10 > 2·0.04
    (0.75, 0.50, True, 0.125, "inconclusive"),     # d = 0.25 = 2·0.125 (exact in binary): not more than 2s
    (0.70, 0.80, True, 0.04, "not reproduced"),    # d = −0.10 < −0.08
    (0.70, 0.80, False, 0.04, "reproduced"),       # lower is better: d = 0.80 − 0.70
    (133.0, 182.0, False, 30.0, "inconclusive"),   # d = 49 < 60
    (0.80, 0.70, True, None, "inconclusive"),      # no noise estimate: never a verdict either way
    (0.10, 0.90, True, None, "inconclusive"),
    (0.044, 0.5, False, 0.0, "reproduced"),        # identical paired differences over seeds
    (0.5, 0.5, True, 0.0, "inconclusive"),
    (float("nan"), 0.5, True, 0.1, "inconclusive"),
])
def test_verdict_rule(ours, baseline, higher, spread, expected):
    assert verdict(ours, baseline, higher, spread) == expected


def test_verdict_rejects_negative_spread():
    with pytest.raises(ValueError, match="spread"):
        verdict(1.0, 0.0, True, -0.1)


# ------------------------------------------------------------------------------------- failure isolation, schema
def test_failure_isolation_and_schema(fakes, monkeypatch, capsys):
    monkeypatch.setattr(reproduce, "CLAIM_MODULES", {"ademamix": "fake_ok_a", "minillm": "fake_raise",
                                                     "discopop": "fake_ok_b", "qdpo": "no_such_claim_module",
                                                     "radt": "fake_exit", "oversquashing": "fake_ok_a"})
    out = fakes / "out"
    assert reproduce.main(["--quick", "--only", "ademamix,minillm,discopop,qdpo,radt", "--out", str(out)]) == 1
    res = json.loads((out / "results.json").read_text())
    assert set(res) >= {"mode", "created", "machine", "versions", "papers"}
    assert res["mode"] == "quick" and res["created"].endswith("+00:00")
    assert set(res["versions"]) >= {"python", "torch", "lightning", "transformers"}
    assert set(res["machine"]) >= {"cpu", "cores", "os"}
    assert list(res["papers"]) == ["ademamix", "minillm", "discopop", "qdpo", "radt"]
    for key, paper in res["papers"].items():
        assert paper["status"] in ("ok", "failed") and isinstance(paper["seconds"], float)
        assert isinstance(paper["cpu_seconds"], float) and paper["cpu_seconds"] >= 0
        for c in paper["claims"]:
            assert set(c) == {"claim", "metric", "ours", "baseline", "baseline_name", "higher_is_better",
                              "spread", "verdict"}
            assert isinstance(c["ours"], float) and isinstance(c["baseline"], float)
    papers = res["papers"]
    assert papers["minillm"]["status"] == "failed" and papers["minillm"]["claims"] == []
    assert papers["minillm"]["error"] == "RuntimeError: boom in the experiment"
    assert papers["qdpo"]["status"] == "failed" and "no_such_claim_module" in papers["qdpo"]["error"]
    assert papers["radt"]["status"] == "failed" and papers["radt"]["error"] == "SystemExit: 2"
    # the papers after the failing one still ran, verdicts computed from the numbers
    assert papers["ademamix"]["status"] == "ok" and papers["ademamix"]["error"] is None
    assert papers["ademamix"]["claims"][0]["verdict"] == "reproduced"  # 0.9 vs 0.5 ± 0.01
    assert papers["discopop"]["claims"][0]["verdict"] == "inconclusive"  # 0.505 vs 0.5 ± 0.01
    assert papers["discopop"]["figures"] == ["discopop/fig.png"] and (out / "discopop" / "fig.png").exists()
    report = (out / "report.md").read_text()
    assert "boom in the experiment" in report and "![fig](discopop/fig.png)" in report
    assert "| a beats base | acc (higher is better) | 0.9 ± 0.01 | 0.5 (base) | +40.0 | reproduced |" in report
    assert "| [ademamix](#ademamix) | a beats base | 0.9 | 0.5 (base) | +40.0 | reproduced |" in report
    assert "FAILED: minillm, qdpo, radt" in capsys.readouterr().err


def test_bad_claim_fields_fail_the_paper(fakes, monkeypatch):
    (fakes / "fake_bad.py").write_text("def run(mode, seeds, out_dir, progress):\n"
                                       "    return {'claims': [{'claim': 'x', 'ours': 1.0}]}\n")
    monkeypatch.setattr(reproduce, "CLAIM_MODULES", dict(reproduce.CLAIM_MODULES, radt="fake_bad"))
    assert reproduce.main(["--only", "radt", "--out", str(fakes / "o")]) == 1
    error = json.loads((fakes / "o" / "results.json").read_text())["papers"]["radt"]["error"]
    assert "lacks fields" in error and "baseline_name" in error


def test_sigterm_stops_the_run_and_records_no_result(fakes, monkeypatch):
    """A stopped run is not a failed paper: nothing is saved for it, the papers after it do not start, and the
    rerun runs it (a saved 'failed' record would also be rerun, but it would sit in the report meanwhile)."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    out = fakes / "o"
    monkeypatch.setattr(reproduce, "CLAIM_MODULES",
                        dict(reproduce.CLAIM_MODULES, minillm="fake_sigterm", radt="fake_ok_a"))
    with pytest.raises(SIGTERMException):
        reproduce.main(["--only", "minillm,radt", "--out", str(out)])
    assert not (out / "papers" / "minillm.json").exists() and not (fakes / "calls.txt").exists()
    monkeypatch.setattr(reproduce, "CLAIM_MODULES", dict(reproduce.CLAIM_MODULES, minillm="fake_ok_b",
                                                         radt="fake_ok_a"))
    assert reproduce.main(["--only", "minillm,radt", "--out", str(out)]) == 0
    assert (fakes / "calls.txt").read_text().split() == ["b", "a"]


def test_cli_arguments(fakes, monkeypatch):
    with pytest.raises(SystemExit):
        reproduce.parse_args(["--only", "minillm,bogus"])
    with pytest.raises(SystemExit):
        reproduce.parse_args(["--quick", "--full"])
    args = reproduce.parse_args(["--full", "--only", "radt,minillm"])
    assert args.mode == "full" and args.keys == ["minillm", "radt"]
    assert args.out.parent == Path("reports") and args.out.name.startswith("full-")


# ------------------------------------------------------------------------------------------- command recorded
def test_program_name_names_how_the_run_was_started():
    assert reproduce.program_name(["/x/.venv/bin/litpapers", "reproduce", "--quick"]) == "litpapers reproduce"
    assert reproduce.program_name(["/x/cli.py", "reproduce"]) == "litpapers reproduce"  # python -m cli
    for argv in (["/x/benchmarks/reproduce.py", "--quick"], ["/x/bin/pytest", "reproduce"], []):
        assert reproduce.program_name(argv) == "python -m benchmarks.reproduce"


def test_report_records_the_command_as_the_user_ran_it(fakes, monkeypatch):
    import cli

    monkeypatch.setattr(reproduce, "CLAIM_MODULES", dict(reproduce.CLAIM_MODULES, radt="fake_ok_a"))
    out = fakes / "o"
    argv = ["--quick", "--only", "radt", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", ["/venv/bin/litpapers", "reproduce", *argv])  # the console script's argv
    assert cli.run_tool("reproduce", argv) == 0
    assert json.loads((out / "results.json").read_text())["command"] == "litpapers reproduce " + " ".join(argv)
    assert f"with `litpapers reproduce {' '.join(argv)}`" in (out / "report.md").read_text()
    monkeypatch.setattr(sys, "argv", ["/x/benchmarks/reproduce.py", *argv])  # python -m benchmarks.reproduce
    assert reproduce.main(argv) == 0
    assert json.loads((out / "results.json").read_text())["command"] == (
        "python -m benchmarks.reproduce " + " ".join(argv))


# ------------------------------------------------------------------------------------------ real-model hook
FAKE_REAL = """
import json, pathlib
def claims(paper_key, mode, out_dir, seeds):
    if paper_key == "minillm":
        raise RuntimeError("no real model here")
    (pathlib.Path(out_dir) / "called.json").write_text(json.dumps([paper_key, mode, seeds]))
    return [{"claim": "real " + paper_key, "metric": "m", "ours": 2.0, "baseline": 1.0, "baseline_name": "b",
             "higher_is_better": True, "spread": 0.1}]
"""


def test_full_mode_adds_the_real_model_claims(fakes, monkeypatch):
    (fakes / "fake_real.py").write_text(FAKE_REAL)
    monkeypatch.setattr(reproduce, "REAL_CLAIMS_MODULE", "fake_real")
    monkeypatch.setattr(reproduce, "CLAIM_MODULES", dict(reproduce.CLAIM_MODULES, radt="fake_ok_a",
                                                         minillm="fake_ok_b"))
    out = fakes / "full"
    assert reproduce.main(["--full", "--only", "radt,minillm", "--seeds", "2", "--out", str(out)]) == 1
    papers = json.loads((out / "results.json").read_text())["papers"]
    assert [c["claim"] for c in papers["radt"]["claims"]] == ["a beats base", "real radt"]
    assert papers["radt"]["claims"][1]["verdict"] == "reproduced"  # 2 − 1 > 2 · 0.1: the runner's rule applies
    assert json.loads((out / "radt" / "real" / "called.json").read_text()) == ["radt", "full", 2]
    assert papers["minillm"]["status"] == "failed"  # a raising hook fails its paper, keeping the tiny rows
    assert papers["minillm"]["error"] == "RuntimeError: no real model here"
    assert [c["claim"] for c in papers["minillm"]["claims"]] == ["b beats base"]
    quick = fakes / "quick"  # --quick never calls it
    assert reproduce.main(["--quick", "--only", "radt", "--out", str(quick)]) == 0
    assert len(json.loads((quick / "results.json").read_text())["papers"]["radt"]["claims"]) == 1
    assert not (quick / "radt" / "real").exists()
    assert reproduce.main(["--full", "--only", "radt", "--out", str(fakes / "full1")]) == 0  # no --seeds: None
    assert json.loads((fakes / "full1" / "radt" / "real" / "called.json").read_text()) == ["radt", "full", None]
    monkeypatch.setattr(reproduce, "REAL_CLAIMS_MODULE", "no_such_real_module")  # absent: the full run is unchanged
    assert reproduce.main(["--full", "--only", "radt", "--out", str(fakes / "full2")]) == 0
    assert len(json.loads((fakes / "full2" / "results.json").read_text())["papers"]["radt"]["claims"]) == 1


def test_a_reused_paper_result_gets_the_current_real_model_rows(fakes, monkeypatch):
    """A finished paper is not run again, but its real-model rows are refreshed from the hook (whose experiments
    keep their own records), replacing the earlier ones instead of piling up."""
    (fakes / "fake_real.py").write_text(FAKE_REAL)
    monkeypatch.setattr(reproduce, "REAL_CLAIMS_MODULE", "fake_real")
    monkeypatch.setattr(reproduce, "CLAIM_MODULES", dict(reproduce.CLAIM_MODULES, radt="fake_ok_a"))
    out = fakes / "full"
    assert reproduce.main(["--full", "--only", "radt", "--out", str(out)]) == 0
    runs = (fakes / "calls.txt").read_text()
    (fakes / "fake_real.py").write_text(FAKE_REAL.replace('"real " + paper_key', '"new real " + paper_key')
                                        .replace('"ours": 2.0', '"ours": 0.5'))
    monkeypatch.delitem(sys.modules, "fake_real")
    assert reproduce.main(["--full", "--only", "radt", "--out", str(out)]) == 0
    assert (fakes / "calls.txt").read_text() == runs == "a\n"  # the paper's own experiment did not run again
    for saved in (json.loads((out / "results.json").read_text())["papers"]["radt"],
                  json.loads((out / "papers" / "radt.json").read_text())):
        assert [c["claim"] for c in saved["claims"]] == ["a beats base", "new real radt"]
        assert saved["claims"][1]["verdict"] == "not reproduced"  # 0.5 − 1 < −2 · 0.1
    assert json.loads((out / "papers" / "radt.json").read_text())["real_claims"] == 1


# ---------------------------------------------------------------------------------------------------- resume
def test_resume_after_sigkill(tmp_path):
    write_fakes(tmp_path)
    out = tmp_path / "out"
    script = textwrap.dedent(f"""
        import sys
        sys.path[:0] = [{str(ROOT)!r}, {str(tmp_path)!r}]
        from benchmarks import reproduce
        reproduce.CLAIM_MODULES.update(ademamix="fake_ok_a", minillm="fake_slow", discopop="fake_ok_b")
        sys.exit(reproduce.main(["--quick", "--only", "ademamix,minillm,discopop", "--out", {str(out)!r}]))
    """)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=tmp_path, env=env, stderr=subprocess.PIPE)
    calls = tmp_path / "calls.txt"
    deadline = time.time() + 60
    while not (calls.exists() and "slow" in calls.read_text()):
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read().decode()
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # mid-run: ademamix finished, minillm running, discopop not started
    proc.wait(timeout=30)
    assert (out / "papers" / "ademamix.json").exists() and not (out / "papers" / "minillm.json").exists()
    (tmp_path / "allow_finish").touch()
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "ademamix (1/3) 100%: already finished" in done.stderr
    assert calls.read_text().split() == ["a", "slow", "slow", "b"]  # ademamix was not rerun
    res = json.loads((out / "results.json").read_text())
    assert [(k, p["status"]) for k, p in res["papers"].items()] == [
        ("ademamix", "ok"), ("minillm", "ok"), ("discopop", "ok")]
    assert res["papers"]["minillm"]["claims"][0]["verdict"] == "inconclusive"  # spread None
    report = (out / "report.md").read_text()
    assert all(f"## {k}" in report for k in ("ademamix", "minillm", "discopop"))


def test_other_mode_or_seeds_is_not_reused(fakes, monkeypatch):
    monkeypatch.setattr(reproduce, "CLAIM_MODULES", dict(reproduce.CLAIM_MODULES, radt="fake_ok_a"))
    out = fakes / "o"
    for argv in (["--quick"], ["--quick"], ["--quick", "--seeds", "2"], ["--full", "--seeds", "2"]):
        assert reproduce.main([*argv, "--only", "radt", "--out", str(out)]) == 0
    assert (fakes / "calls.txt").read_text().split() == ["a", "a", "a"]
    # the experiment's source changed (e.g. its settings table): the saved result is not reused
    (fakes / "fake_ok_a.py").write_text(FAKE_OK.format(name="a", ours=0.8))
    assert reproduce.main(["--full", "--seeds", "2", "--only", "radt", "--out", str(out)]) == 0
    assert (fakes / "calls.txt").read_text().split() == ["a", "a", "a", "a"]


# ------------------------------------------------------------------------------------------------ README table
def test_readme_table_matches_committed_results():
    committed = ROOT / "docs" / "results" / "full" / "results.json"
    readme = (ROOT / "README.md").read_text()
    begin, end = "<!-- results:begin -->\n", "<!-- results:end -->"
    assert begin in readme and end in readme, "README.md lacks the <!-- results:begin/end --> markers"
    block = readme.split(begin, 1)[1].split(end, 1)[0]
    assert block == reproduce.render_results_table(json.loads(committed.read_text())), (
        "README's results block is stale: python -m benchmarks.reproduce --update-readme " + str(committed))


def test_update_readme_replaces_only_the_block(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# x\n<!-- results:begin -->\nold typed numbers\n<!-- results:end -->\ntail\n")
    results = {"mode": "quick", "created": "2026-11-27T00:00:00", "machine": {"cpu": "c", "cores": 2},
               "papers": {"radt": {"status": "failed", "error": "boom", "claims": []}}}
    reproduce.update_readme(readme, results)
    text = readme.read_text()
    assert text.startswith("# x\n<!-- results:begin -->\nFrom `reproduce --quick`, 2026-11-27, c (2 cores)")
    assert "| radt | failed: boom |" in text and "old typed numbers" not in text and text.endswith("-->\ntail\n")
    (tmp_path / "bad.md").write_text("no markers")
    with pytest.raises(ValueError, match="bad.md"):
        reproduce.update_readme(tmp_path / "bad.md", results)


def test_render_results_table_by_hand():
    results = {"mode": "quick", "created": "2026-11-27T15:00:00+00:00",
               "machine": {"cpu": "Some CPU", "cores": 2, "os": "Linux"},
               "papers": {"radt": {"status": "ok", "error": None, "claims": [
                   {"claim": "RADT aligns better than DT", "metric": "alignment error", "ours": 133.21,
                    "baseline": 182.0, "baseline_name": "DT", "higher_is_better": False, "spread": 12.5,
                    "verdict": "reproduced"},
                   {"claim": "RADT beats an ablation", "metric": "alignment error", "ours": 133.21,
                    "baseline": 140.0, "baseline_name": "SeqRA only", "higher_is_better": False, "spread": 12.5,
                    "verdict": "inconclusive"}]},
                   "qdpo": {"status": "failed", "error": "ValueError: a|b\nc", "claims": []}}}
    assert reproduce.render_results_table(results).splitlines()[2:] == [
        "| paper | headline claim | metric | ours ± spread | baseline | verdict | all claims |",
        "|---|---|---|---|---|---|---|",
        "| radt | RADT aligns better than DT | alignment error (lower is better) | 133.2 ± 12.5 | 182 (DT) | reproduced "
        "| 2: 1 reproduced, 1 inconclusive |",
        "| qdpo | failed: ValueError: a\\|b c | | | | | 0 |"]  # a pipe or newline must not break the table


def test_margin_and_close_calls_by_hand():
    row = {"ours": 1.9, "baseline": 2.0, "higher_is_better": False, "spread": 0.04}
    assert reproduce.margin(row) == pytest.approx(2.5)  # lower is better: d = 2.0 - 1.9 = 0.1 = 2.5 s
    assert reproduce._margin_cell(row) == "+2.5 (close)"
    assert reproduce._margin_cell({**row, "spread": 0.01}) == "+10.0"
    assert reproduce._margin_cell({**row, "higher_is_better": True}) == "-2.5 (close)"
    assert reproduce._margin_cell({**row, "spread": None}) == "–"
    assert reproduce._margin_cell({**row, "spread": 0.0}) == "+∞ (s = 0)"  # the same difference at every seed
    assert reproduce._margin_cell({**row, "ours": 2.0, "spread": 0.0}) == "–"


def test_report_settings_are_a_table_and_long_values_fold():
    results = {"mode": "quick", "created": "2026-12-07T00:00:00+00:00", "command": "c", "config": {},
               "verdict_rule": "r", "machine": {"cpu": "c", "cores": 2, "os": "L"}, "versions": {"torch": "x"},
               "papers": {"qdpo": {"status": "ok", "seconds": 120.0, "cpu_seconds": 100.0, "error": None,
                                   "claims": [], "figures": [], "tensorboard": [],
                                   "settings": {"design": "pairs on-policy", "steps": 5, "warning": "DPO gain small",
                                                "per_seed": {"a": list(range(60))}}}}}
    report = reproduce.render_report(results)
    assert "Design: pairs on-policy." in report and "| steps | `5` |" in report
    assert "Note: DPO gain small" in report and "| warning |" not in report
    assert "<details><summary>per-seed values and other long settings (per_seed)</summary>" in report
    assert '"per_seed"' not in report.split("<details>")[0]  # the long value is only in the folded block
    assert "| [qdpo](#qdpo) | failed: None |" not in report and "## Summary" in report


FAKE_NOISY = """
import logging, os, subprocess, sys, warnings
def run(mode, seeds, out_dir, progress):
    for i in range(200):
        progress(f"step {i}", i / 200)  # many progress calls in a short time
        print(f"library chatter {i}")
    os.write(2, b"C-level message on fd 2\\n")
    subprocess.run([sys.executable, "-c", "print('child process output')"], check=True)
    logging.getLogger("some.library").warning("a logged warning")
    warnings.warn("a python warning")
    return {"claims": [{"claim": "noisy beats base", "metric": "acc", "ours": 0.9, "baseline": 0.5,
                        "baseline_name": "base", "higher_is_better": True, "spread": 0.01}],
            "figures": [], "settings": {}}
"""


def test_console_shows_progress_and_the_paper_output_goes_to_its_log(tmp_path):
    """A paper that prints, logs, warns, writes to fd 2 and starts a child process: the console gets a few progress
    lines (first, throttled, last) and the final line; everything else is in <out>/<key>/console.log."""
    (tmp_path / "fake_noisy.py").write_text(FAKE_NOISY)
    out = tmp_path / "out"
    script = textwrap.dedent(f"""
        import sys
        sys.path[:0] = [{str(ROOT)!r}, {str(tmp_path)!r}]
        from benchmarks import reproduce
        reproduce.CLAIM_MODULES.update(ademamix="fake_noisy", minillm="fake_noisy")
        sys.exit(reproduce.main(["--quick", "--only", "ademamix,minillm", "--out", {str(out)!r}]))
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr
    console = (done.stdout + done.stderr).splitlines()
    assert len(console) <= 8, console  # per paper: start, one throttled line, end; then the final line
    assert console[-1].startswith("[reproduce ") and "report: " in console[-1]
    assert all(line.startswith("[reproduce ") for line in console)
    log = (out / "ademamix" / "console.log").read_text()
    for text in ("library chatter 199", "C-level message on fd 2", "child process output", "a logged warning",
                 "a python warning", "step 199"):
        assert text in log
    assert "ETA" in log  # measured from the progress fraction


def test_eta_is_measured_from_the_fraction_done():
    assert reproduce.eta_seconds(30.0, 0.25) == pytest.approx(90.0)
    assert reproduce.eta_seconds(30.0, None) is None and reproduce.eta_seconds(30.0, 1.0) is None


FAKE_WAITS_FOR = """
import pathlib, time
def run(mode, seeds, out_dir, progress):
    root = pathlib.Path(out_dir).parents[1]
    (root / "{name}_started").touch()
    deadline = time.time() + 60
    while not (root / "{other}_started").exists():  # only finishes when the other paper runs at the same time
        assert time.time() < deadline, "the other paper never started: papers ran one after another"
        time.sleep(0.05)
    return {{"claims": [{{"claim": "{name} claim", "metric": "m", "ours": 1.0, "baseline": 0.0,
                         "baseline_name": "b", "higher_is_better": True, "spread": 0.1}}], "figures": [],
            "settings": {{}}}}
"""


def test_jobs_run_papers_at_the_same_time_in_child_processes(fakes, monkeypatch, capsys):
    (fakes / "fake_wait_a.py").write_text(FAKE_WAITS_FOR.format(name="a", other="b"))
    (fakes / "fake_wait_b.py").write_text(FAKE_WAITS_FOR.format(name="b", other="a"))
    monkeypatch.setattr(reproduce, "CLAIM_MODULES", dict(reproduce.CLAIM_MODULES, radt="fake_wait_a",
                                                         oversquashing="fake_wait_b", qdpo="fake_raise"))
    out = fakes / "out"
    assert reproduce.main(["--quick", "--only", "radt,oversquashing,qdpo", "--jobs", "2", "--out", str(out)]) == 1
    res = json.loads((out / "results.json").read_text())
    assert [(k, p["status"]) for k, p in res["papers"].items()] == [
        ("qdpo", "failed"), ("radt", "ok"), ("oversquashing", "ok")]
    assert res["papers"]["qdpo"]["error"] == "RuntimeError: boom in the experiment"
    assert res["papers"]["radt"]["claims"][0]["verdict"] == "reproduced"
    assert "FAILED: qdpo" in capsys.readouterr().err
    # a rerun reuses the saved papers and reruns only the failed one, in this process
    assert reproduce.main(["--quick", "--only", "radt,oversquashing", "--jobs", "2", "--out", str(out)]) == 0


def test_tensorboard_links_render_with_spaces_and_parentheses():
    assert reproduce._link("radt/tb/halfcheetah_RADT (SeqRA only)/seed0") == (
        "[radt/tb/halfcheetah_RADT (SeqRA only)/seed0](radt/tb/halfcheetah_RADT%20%28SeqRA%20only%29/seed0)")


def test_claims_without_signal_are_listed_apart_and_not_counted():
    zero = {"claim": "counting fails", "metric": "accuracy", "ours": 0.0, "baseline": 0.0, "baseline_name": "n=4",
            "higher_is_better": False, "spread": 0.0, "verdict": "inconclusive"}
    real = dict(zero, claim="collapse", ours=0.2, baseline=2.0, spread=0.1, verdict="reproduced")
    assert reproduce.no_signal(zero) and not reproduce.no_signal(real)
    assert reproduce._verdict_counts([real, zero]) == "1: 1 reproduced"
    results = {"mode": "full", "created": "2026-12-07T00:00:00+00:00", "command": "c", "config": {},
               "verdict_rule": "r", "machine": {"cpu": "c", "cores": 2, "os": "L"}, "versions": {},
               "papers": {"oversquashing": {"status": "ok", "seconds": 60.0, "cpu_seconds": 60.0, "error": None,
                                            "claims": [real, zero], "figures": [], "tensorboard": [], "settings": {}}}}
    report = reproduce.render_report(results)
    assert "| counting fails |" not in report and "No signal (" in report and "counting fails — accuracy" in report
