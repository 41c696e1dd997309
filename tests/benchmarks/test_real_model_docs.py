"""The README's and docs/real_model.md's real-model tables are generated from the committed records
(docs/results/real_*.json), never typed."""

import json
import pathlib

from benchmarks import claim_real


def test_readme_and_doc_tables_match_the_committed_records(root, monkeypatch):
    monkeypatch.chdir(root)  # the tables name the records by the path the command was given: docs/results
    results = pathlib.Path("docs") / "results"
    readme = (root / "README.md").read_text()
    assert f"{claim_real.README_BEGIN}\n{claim_real.readme_table(results)}\n{claim_real.README_END}" in readme
    doc = (root / "docs" / "real_model.md").read_text()
    assert f"{claim_real.DOC_BEGIN}\n{claim_real.markdown_table(results)}\n{claim_real.DOC_END}" in doc
    # every experiment has its record, and every record a row in the README
    assert {p.stem for p in results.glob("real_*.json")} >= {f"real_{n}" for n in claim_real.RUNNERS}


def test_readme_row_by_hand(tmp_path):
    row = {"claim": "c", "metric": "m", "ours": 0.9, "baseline": 0.5, "baseline_name": "b", "higher_is_better": True,
           "spread": 0.1}  # d = 0.4 > 2s = 0.2: reproduced
    record = {"mode": "full", "seconds": 150.0, "date": "2026-11-27T10:00:00", "machine": {"description": "x"},
              "claims": [row, dict(row, spread=0.3), dict(row, ours=0.1)]}  # inconclusive; not reproduced
    (tmp_path / "real_minillm.json").write_text(json.dumps(record))
    readme = tmp_path / "README.md"
    readme.write_text(f"top\n{claim_real.README_BEGIN}\nold\n{claim_real.README_END}\nend\n")
    claim_real.main(["--update-doc", str(readme), "--out", str(tmp_path)])
    assert readme.read_text() == (
        f"top\n{claim_real.README_BEGIN}\n"
        "| experiment | config | first claim: ours vs baseline | all claims | wall-clock (2 cores) |\n"
        "|---|---|---|---|---|\n"
        "| minillm | `configs/minillm/smollm2.yaml` | c — m: 0.9 vs 0.5 (b): **reproduced** | "
        "3: 1 reproduced, 1 not reproduced, 1 inconclusive | 2 min (full mode, 2026-11-27) |\n"
        f"{claim_real.README_END}\nend\n")


def test_qdpo_quantizer_tables_are_generated_from_the_committed_results(root, monkeypatch, tmp_path):
    """docs/qdpo.md's two grid tables (built-in model, SmolLM2) are what --update-docs writes from the records."""
    from benchmarks import claim_qdpo

    monkeypatch.chdir(root)  # the blocks name their source by the path given: docs/results/...
    doc = tmp_path / "qdpo.md"
    doc.write_text((root / "docs" / "qdpo.md").read_text())
    for source in ("docs/results/full/results.json", "docs/results/real_qdpo.json"):
        claim_qdpo.update_docs(pathlib.Path(source), doc)
    assert doc.read_text() == (root / "docs" / "qdpo.md").read_text()
