"""DiscoPOP's discovery loop (issue 15): the sandbox rejects each hostile candidate with a clear reason while the
run continues, the runtime layers hold on their own, a replay run with good, broken and hostile candidates
completes and resumes after being killed, a tiny random local HF model and an OpenAI-compatible stub server work
as proposers, and the shipped configs parse."""

import http.server
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from discovery import (BASELINES, Archive, CandidateRejected, DiscoveryLoop, DPOFitness, HFProposer,
                                   OpenAIProposer, ReplayProposer, SandboxLimits, check_code, main, parse_reply,
                                   run_in_worker, validate_loss, write_summary)
from discovery.loop import build_parser
from discovery.sandbox import scrub_secrets
from tiny_models import TINY

ROOT = Path(__file__).resolve().parents[2]
HEAD = "def f(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta):\n"
MARGIN = "(policy_chosen_logps - policy_rejected_logps) - (ref_chosen_logps - ref_rejected_logps)"
GOOD = HEAD + f"    return -F.logsigmoid(beta * ({MARGIN}))\n"
FAST = SandboxLimits(validate_timeout_s=3, train_timeout_s=120, memory_mb=256)


def body(*lines):
    return HEAD + "".join(f"    {line}\n" for line in lines)


HOSTILE_STATIC = {
    "import os": ("import os\n" + GOOD, "import of os is not allowed"),
    "import subprocess": (body("import subprocess", "return policy_chosen_logps"), "import of subprocess"),
    "import socket": (body("import socket", "return policy_chosen_logps"), "import of socket"),
    "from os import system": ("from os import system\n" + GOOD, "'from os import ...' is not allowed"),
    "ctypes": (body("import ctypes", "return policy_chosen_logps"), "import of ctypes"),
    "importlib": (body("import importlib", "return policy_chosen_logps"), "import of importlib"),
    "numpy import": (body("import numpy", "return policy_chosen_logps"), "import of numpy"),
    "write a file": (body("open('/tmp/x', 'w').write('1')", "return policy_chosen_logps"), "name 'open'"),
    "exit": (body("exit(0)"), "name 'exit'"),
    "SystemExit": (body("raise SystemExit(0)"), "name 'SystemExit'"),
    "mro subclasses": (body("s = ().__class__.__mro__[1].__subclasses__()", "return policy_chosen_logps"),
                       "attribute '__class__' is not allowed"),
    "__builtins__": (body("o = __builtins__['open']", "return policy_chosen_logps"), "name '__builtins__'"),
    "__globals__": (body("g = f.__globals__", "return policy_chosen_logps"), "attribute '__globals__'"),
    "__import__": (body("m = __import__('os')", "return policy_chosen_logps"), "name '__import__'"),
    "torch.load": (body("t = torch.load('/etc/passwd')", "return policy_chosen_logps"), "attribute 'load'"),
    "torch.save": (body("torch.save(policy_chosen_logps, 'x.pt')", "return policy_chosen_logps"),
                   "attribute 'save'"),
    "numpy tofile": (body("policy_chosen_logps.detach().numpy().tofile('x')", "return policy_chosen_logps"),
                     "attribute 'numpy'"),
    "from_file": (body("s = torch.UntypedStorage.from_file('/etc/passwd')", "return policy_chosen_logps"),
                  "attribute 'from_file'"),
    "cpp_extension": (body("torch.utils.cpp_extension.load_inline('x', '')", "return policy_chosen_logps"),
                      "attribute 'utils'"),
    "torch.os": (body("torch.os.system('id')", "return policy_chosen_logps"), "attribute 'os'"),
    "eval": (body("return eval('policy_chosen_logps')"), "name 'eval'"),
    "exec": (body("exec('x = 1')", "return policy_chosen_logps"), "name 'exec'"),
    "compile": (body("c = compile('1', 'x', 'eval')", "return policy_chosen_logps"), "name 'compile'"),
    "getattr": (body("return getattr(torch, 'lo' + 'ad')('x')"), "name 'getattr'"),
    "str.format leak": (body("s = '{0.__class__}'.format(beta)", "return policy_chosen_logps"),
                        "attribute 'format'"),
    "generator frame": (body("g = (x for x in ())", "return g.gi_frame.f_back.f_globals"), "attribute 'gi_frame'"),
    "match class attrs": (body("match beta:", "    case float(real=r):", "        pass", "return policy_chosen_logps"),
                          "match statements are not allowed"),
    "class": ("class A:\n    pass\n" + GOOD, "line 1: only imports"),
    "try/except": (body("try:", "    pass", "except Exception:", "    pass", "return policy_chosen_logps"),
                   "try/except are not allowed"),
    "two functions": (GOOD + GOOD.replace("def f", "def g"), "exactly one top-level function"),
    "syntax error": (body("return (("), "does not parse"),
    "decorator": ("@torch.no_grad()\n" + GOOD, "decorators are not allowed"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_STATIC))
def test_static_check_rejects_hostile_code_with_a_clear_reason(case):
    code, reason = HOSTILE_STATIC[case]
    with pytest.raises(CandidateRejected, match=reason.replace("(", r"\(")):
        check_code(code)


def test_baselines_and_allowed_imports_pass_the_static_check():
    for base in BASELINES.values():
        check_code(base["code"])
    assert check_code("import torch\nimport torch.nn.functional as F\nimport math\nK = 2.0\n" + GOOD) == "f"
    assert check_code("from torch.nn import functional as G\n" + GOOD.replace("F.", "G.")) == "f"


def test_validate_loss_enforces_the_discopop_checks():
    """Shape (10,), finite output, finite non-zero gradient w.r.t. the policy log-probs."""
    validate_loss(lambda pc, pr, rc, rr, beta: -torch.nn.functional.logsigmoid(beta * (pc - pr - rc + rr)))
    bad = {"shape": lambda pc, pr, rc, rr, beta: (pc - pr).mean(),
           "non-finite values": lambda pc, pr, rc, rr, beta: torch.log(pc - pr),  # log of negatives: NaN
           "no gradient with respect to the policy": lambda pc, pr, rc, rr, beta: (rc - rr) * 1.0,
           "non-finite gradients": lambda pc, pr, rc, rr, beta: torch.sqrt((pc - pc.detach()).abs()) + 1,
           "must return a torch.Tensor": lambda pc, pr, rc, rr, beta: [0.0] * 10,
           "calling the loss": lambda pc, pr, rc, rr: pc}
    for reason, fn in bad.items():
        with pytest.raises(ValueError, match=reason):
            validate_loss(fn)


def test_runtime_limits_kill_loops_and_allocations_and_the_caller_goes_on():
    spin = run_in_worker(body("while True:", "    pass"), FAST)
    assert spin["status"] == "invalid" and spin["stage"] == "validate"
    assert "time limit exceeded: more than 3 s" in spin["error"]
    grow = run_in_worker(body("x = []", "while True:", "    x.append(torch.ones(1000000))"), FAST)
    assert grow["status"] == "invalid" and "memory limit exceeded" in grow["error"]
    assert "line 4" in grow["error"]  # the candidate's own line is named
    assert run_in_worker(GOOD, FAST)["status"] == "ok"


def test_runtime_layers_hold_without_the_static_check(tmp_path):
    """With the AST check switched off, the restricted builtins and the audit hook still refuse the classic
    escapes: no marker file appears and each reason is reported."""
    marker = tmp_path / "pwned"
    escape = ("for c in ().__class__.__mro__[1].__subclasses__():",
              "    if c.__name__ == '_wrap_close':",
              "        g = c.__init__.__globals__")
    cases = {
        "os.system": body(*escape, f"        g['system']('touch {marker}')", "return policy_chosen_logps"),
        "writing": body(*escape, f"        g['sys'].modules['builtins'].open('{marker}', 'w')",
                        "return policy_chosen_logps"),
        "os.system' is not allowed": body(  # a running generator's frame → the caller's module globals
            "g = (g.gi_frame.f_back.f_back.f_globals for _ in [1])",
            f"[*g][0]['importlib'].import_module('os').system('touch {marker}')", "return policy_chosen_logps"),
        "NameError: name 'open'": body(f"open('{marker}', 'w')", "return policy_chosen_logps"),
        "import of 'os' is not allowed": body("os = __import__('os')", "return policy_chosen_logps"),
        "'socket.__new__' is not allowed": body(
            "s = [c for c in ().__class__.__mro__[1].__subclasses__() if c.__name__ == 'socket'][0]", "s()",
            "return policy_chosen_logps"),
    }
    for reason, code in cases.items():
        out = run_in_worker(code, FAST, static_check=False)
        assert out["status"] == "invalid" and reason in out["error"], (reason, out)
    assert not marker.exists()


def test_worker_environment_loses_secrets():
    env = {"OPENAI_API_KEY": "k", "HF_TOKEN": "t", "db_password": "p", "PATH": "/bin", "HOME": "/h"}
    scrub_secrets(env)
    assert env == {"PATH": "/bin", "HOME": "/h"}


def test_parse_reply_fenced_bare_and_garbage():
    cand = {"thought": "t", "name": "n", "code": GOOD}
    assert parse_reply("Sure!\n```json\n" + json.dumps(cand) + "\n```") == cand
    assert parse_reply("x " + json.dumps({"name": "n", "code": "c"}) + " y")["thought"] == ""
    for reply, reason in (("", "empty"), ("no json {here", "no JSON object"),
                          (json.dumps({"name": "n", "code": 3}), "must be strings")):
        with pytest.raises(ValueError, match=reason):
            parse_reply(reply)


def test_archive_drops_a_torn_last_line(tmp_path):
    archive = Archive(tmp_path / "a.jsonl")
    archive.append({"kind": "run", "i": 1})
    with open(archive.path, "a") as f:
        f.write('{"kind": "proposal", "i"')  # killed mid-write
    assert archive.load() == [{"kind": "run", "i": 1}]
    archive.append({"kind": "run", "i": 2})
    assert [r["i"] for r in archive.load()] == [1, 2]


def tiny_fitness(**kwargs):
    return DPOFitness(model=TINY, steps=3, num_pairs=48, batch_size=8, val_fraction=0.25, warmup_steps=1, **kwargs)


REPLAY = [
    {"thought": "logistic + exponential", "name": "cell", "code": HEAD.replace("def f", "def cell")
     + f"    z = beta * ({MARGIN})\n    return 0.5 * torch.exp(-z) - 0.5 * F.logsigmoid(z)\n"},
    {"reply": "I think a good loss would be the hinge loss."},                       # broken: no JSON
    {"thought": "escape", "name": "shell", "code": "import subprocess\n" + GOOD},   # hostile: import
    {"thought": "nan", "name": "nan_loss", "code": body("return torch.log(policy_chosen_logps)")},  # broken: NaN
    {"thought": "spin", "name": "spin", "code": body("while True:", "    pass")},   # hostile: never returns
    {"thought": "introspect", "name": "mro", "code": body("return ().__class__.__mro__[1].__subclasses__()")},
    {"thought": "sigmoid margin", "name": "smooth", "code": HEAD.replace("def f", "def smooth")
     + f"    z = beta * ({MARGIN})\n    return -0.9 * F.logsigmoid(z) - 0.1 * F.logsigmoid(-z)\n"},
]


def write_config(tmp_path):
    replay = tmp_path / "replay.jsonl"
    replay.write_text("".join(json.dumps(r) + "\n" for r in REPLAY))
    config = {"run_dir": str(tmp_path / "run"), "generations": 3, "max_attempts": 4, "seeds": ["dpo"],
              "references": [], "workers": 1,
              "proposer": {"class_path": "discovery.ReplayProposer", "init_args": {"path": str(replay)}},
              "fitness": {"class_path": "discovery.DPOFitness",
                          "init_args": tiny_fitness().init_args},
              "limits": {"validate_timeout_s": 3, "train_timeout_s": 120, "memory_mb": 512}}
    path = tmp_path / "discover.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


def test_replay_run_with_good_broken_hostile_candidates_resumes_after_kill(tmp_path):
    config = write_config(tmp_path)
    archive_path = tmp_path / "run" / "archive.jsonl"
    proc = subprocess.Popen([sys.executable, "-c", "import sys; from discovery import main; "
                             "sys.exit(main(sys.argv[1:]))", "--config", str(config)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:  # kill the whole run (loop, forkserver, worker) hard once the seed and the first proposal are archived
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if archive_path.exists() and sum(1 for _ in open(archive_path)) >= 3:
                break
            time.sleep(0.1)
        assert proc.poll() is None, "the run finished before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(30)
    killed = Archive(archive_path).load()
    assert [r["kind"] for r in killed][:3] == ["run", "seed", "proposal"]

    assert main(["--config", str(config)]) == 0
    records = Archive(archive_path).load()
    assert records[: len(killed)] == killed  # nothing evaluated before the kill is lost or redone
    assert [r["status"] for r in records if r["kind"] == "run"] == ["started", "resumed"]
    seeds = [r for r in records if r["kind"] == "seed"]
    assert len(seeds) == 1 and seeds[0]["status"] == "evaluated" and 0 <= seeds[0]["fitness"] <= 1
    proposals = [r for r in records if r["kind"] == "proposal"]
    # every replayed reply was asked for exactly once, in order, across the kill
    assert [p["raw_reply"] for p in proposals] == [r.get("reply", json.dumps(r)) for r in REPLAY]
    by_name = {p["name"]: p for p in proposals}
    assert [(p["generation"], p["attempt"], p["status"]) for p in proposals] == [
        (0, 0, "evaluated"), (1, 0, "invalid"), (1, 1, "invalid"), (1, 2, "invalid"), (1, 3, "invalid"),
        (2, 0, "invalid"), (2, 1, "evaluated")]
    assert "no JSON object" in proposals[1]["error"] and proposals[1]["stage"] == "parse"
    assert "import of subprocess" in by_name["shell"]["error"] and by_name["shell"]["stage"] == "static"
    assert "non-finite" in by_name["nan_loss"]["error"] and by_name["nan_loss"]["stage"] == "validate"
    assert "time limit exceeded" in by_name["spin"]["error"]
    assert "'__class__' is not allowed" in by_name["mro"]["error"]
    for p in proposals:
        assert p["prompt"][0]["role"] == "system" and "Fitness: " in p["prompt"][1]["content"]
        assert p["feedback"].startswith("Fitness: " if p["status"] == "evaluated" else "Code not valid: ")
        assert (p["status"] == "evaluated") == (p["fitness"] is not None and 0 <= p["fitness"] <= 1)
    # errors are fed back: the reply after the hostile import sees its reason in the chat
    assert any("import of subprocess" in m["content"] for m in by_name["nan_loss"]["prompt"])
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["proposals"] == {"evaluated": 2, "invalid": 5}
    assert (tmp_path / "run" / "fitness.png").stat().st_size > 0
    assert "| proposal | 1 | 2 | nan_loss | invalid |" in (tmp_path / "run" / "summary.md").read_text()


def test_tiny_random_local_hf_model_as_proposer_runs_offline(tmp_path):
    """Its replies are garbage: every attempt is recorded as invalid with the raw reply, and the run completes."""
    from lm.hf import load_causal_lm
    from lm.tokenizers import byte_tokenizer

    tok = byte_tokenizer()
    tok.chat_template = ("{% for m in messages %}<<{{ m['role'] }}>>{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<<assistant>>{% endif %}")
    load_causal_lm(TINY, vocab_size=len(tok), seed=0).save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    proposer = HFProposer(str(tmp_path / "lm"), max_new_tokens=16, temperature=1.0)
    loop = DiscoveryLoop(run_dir=str(tmp_path / "run"), proposer=proposer, fitness=tiny_fitness(), generations=2,
                         max_attempts=2, seeds=[], references=[], history=1)
    records = loop.run()
    proposals = [r for r in records if r["kind"] == "proposal"]
    assert [(p["generation"], p["status"], p["stage"]) for p in proposals] == [(0, "invalid", "parse")] * 2 + [
        (1, "invalid", "parse")] * 2
    assert all(isinstance(p["raw_reply"], str) for p in proposals)
    rendered = proposer.render(proposals[-1]["prompt"])
    assert rendered.startswith("<<system>>") and rendered.endswith("<<assistant>>")
    assert rendered.count("<<user>>Code not valid: no JSON object") == 1  # history=1 exchange fed back


def test_openai_compatible_endpoint_against_a_stub_server(tmp_path, monkeypatch):
    requests = []
    first = json.dumps({"thought": "t", "name": "sh", "code": "import os\n" + GOOD})
    replies = [first, "still not json"]

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            body_ = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            requests.append((self.path, self.headers.get("Authorization"), body_))
            if len(requests) == 1:  # one transient server error: the proposer retries
                self.send_response(503)
                self.end_headers()
                return
            out = json.dumps({"choices": [{"message": {"role": "assistant", "content": replies.pop(0)}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("STUB_KEY", "secret-token")
        monkeypatch.setattr("discovery.proposers.time.sleep", lambda s: None)
        proposer = OpenAIProposer("stub-model", base_url=f"http://127.0.0.1:{server.server_port}/v1",
                                  api_key_env="STUB_KEY", retries=1)
        loop = DiscoveryLoop(run_dir=str(tmp_path / "run"), proposer=proposer, fitness=tiny_fitness(),
                             generations=1, max_attempts=2, seeds=[], references=[])
        records = loop.run()
    finally:
        server.shutdown()
    assert [r[0] for r in requests] == ["/v1/chat/completions"] * 3
    assert all(r[1] == "Bearer secret-token" for r in requests)
    assert requests[1][2]["model"] == "stub-model" and requests[1][2]["messages"][0]["role"] == "system"
    # the second question carries the first answer and the reason it was rejected
    assert requests[2][2]["messages"][-2] == {"role": "assistant", "content": first}
    assert requests[2][2]["messages"][-1]["content"].startswith("Code not valid: line 1: import of os")
    proposals = [r for r in records if r["kind"] == "proposal"]
    assert [p["stage"] for p in proposals] == ["static", "parse"]
    assert "secret-token" not in (tmp_path / "run" / "archive.jsonl").read_text()
    with pytest.raises(ValueError, match="base_url"):
        monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
        OpenAIProposer("m")


@pytest.mark.parametrize("config", sorted((ROOT / "configs" / "discopop").glob("discover*.yaml")),
                         ids=lambda p: p.name)
def test_shipped_configs_parse_and_build(config, monkeypatch):
    monkeypatch.chdir(ROOT)
    parser = build_parser()
    cfg = parser.parse_args(["--config", str(config)])
    init = parser.instantiate_classes(cfg)
    assert init.fitness.init_args["beta"] == 0.05
    assert set(init.seeds) == {"dpo", "hinge", "ipo", "kto"} and init.references == ["lrml"]
    if isinstance(init.proposer, ReplayProposer):
        assert len(init.proposer.replies) == 5


def test_ipo_baseline_formula_and_length_normalisation():
    """The IPO seed is (ρ − 1/(2β))² on per-token mean log-probs (docs/papers.md §6): at ρ = 0, β = 0.05: 100."""
    assert BASELINES["ipo"]["length_normalize"] is True
    ns = {"torch": torch, "F": torch.nn.functional, "math": math}
    exec(BASELINES["ipo"]["code"], ns)  # trusted, shipped code
    zero = torch.zeros(3)
    assert ns["ipo"](zero, zero, zero, zero, 0.05).tolist() == pytest.approx([100.0] * 3)


def test_population_replies_share_the_chat_and_are_scored_in_parallel(tmp_path):
    replay = tmp_path / "replay.jsonl"
    replay.write_text("".join(json.dumps(REPLAY[i]) + "\n" for i in (0, 6, 0)))
    loop = DiscoveryLoop(run_dir=str(tmp_path / "run"), proposer=ReplayProposer(str(replay)),
                         fitness=tiny_fitness(), generations=3, max_attempts=2, seeds=[], references=[],
                         workers=2, population=2, limits=SandboxLimits(train_timeout_s=120, memory_mb=512))
    proposals = [r for r in loop.run() if r["kind"] == "proposal"]
    # generation 0: both replies of the round scored; generation 1: one reply, then the file is exhausted
    assert [(p["generation"], p["attempt"], p["name"], p["status"]) for p in proposals] == [
        (0, 0, "cell", "evaluated"), (0, 1, "smooth", "evaluated"), (1, 0, "cell", "evaluated")]
    assert proposals[0]["prompt"] == proposals[1]["prompt"] != proposals[2]["prompt"]
    assert proposals[0]["fitness"] == proposals[2]["fitness"]  # same loss, same seed and data: same fitness


# ---------------------------------------------------------------------------------------------- issue 27.1
def tiny_overrides():
    """Command-line overrides that shrink the shipped config's fitness (SFT + DPO) to a few seconds."""
    return ["--generations", "1", "--max_attempts", "1", "--seeds", "[dpo]", "--references", "[]", "--workers", "1",
            "--fitness.init_args.model", json.dumps(TINY), "--fitness.init_args.sft_steps", "2",
            "--fitness.init_args.steps", "2", "--fitness.init_args.num_pairs", "32",
            "--fitness.init_args.batch_size", "8", "--fitness.init_args.val_fraction", "0.25",
            "--fitness.init_args.warmup_steps", "1", "--limits.memory_mb", "1024"]


def test_readme_command_with_relative_paths_scores_from_a_fresh_directory(tmp_path, monkeypatch, capsys):
    """`litpapers discover --config configs/discopop/discover.yaml` as the README writes it: relative run_dir
    (and the SFT export inside it) must reach the workers, which run in their own temporary folders."""
    shutil.copytree(ROOT / "configs" / "discopop", tmp_path / "configs" / "discopop")
    monkeypatch.chdir(tmp_path)
    assert main(["--config", "configs/discopop/discover.yaml", *tiny_overrides()]) == 0
    records = Archive(tmp_path / "logs" / "discovery" / "archive.jsonl").load()
    scored = [r for r in records if r["kind"] in ("seed", "proposal")]
    assert [(r["kind"], r["status"]) for r in scored] == [("seed", "evaluated"), ("proposal", "evaluated")], scored
    assert json.loads((tmp_path / "logs" / "discovery" / "summary.json").read_text())["best"]["name"] == "padll"


def stub_scorer(monkeypatch, outcomes):
    """Replace the sandbox worker by ``outcomes(code) -> dict``; returns the list of codes scored."""
    import discovery.loop as loop_module

    seen = []

    def fake(code, limits, fitness=None, length_normalize=False, static_check=True):
        seen.append(code)
        return {"seconds": 0.0, **outcomes(code)}

    monkeypatch.setattr(loop_module, "run_in_worker", fake)
    return seen


INFRA = {"status": "failed", "stage": "startup", "failure": "infrastructure",
         "error": "FileNotFoundError: model path 'runs/discovery/sft' does not exist"}
CANDIDATE_FAILED = {"status": "failed", "stage": "train", "failure": "candidate", "error": "ValueError: bad loss"}
OK = {"status": "ok", "metrics": {"val_reward_accuracy": 0.75}}


def stub_config(tmp_path, seeds=("dpo", "hinge"), generations=2):
    replay = tmp_path / "replay.jsonl"
    replay.write_text("".join(json.dumps(REPLAY[i]) + "\n" for i in (0, 6)))
    return ["--run_dir", str(tmp_path / "run"), "--generations", str(generations), "--max_attempts", "1",
            "--seeds", json.dumps(list(seeds)), "--references", "[]",
            "--proposer", "discovery.ReplayProposer", "--proposer.path", str(replay),
            "--fitness", "discovery.DPOFitness", "--fitness.model", json.dumps(TINY)]


def test_every_scoring_failing_for_infrastructure_exits_nonzero_with_one_error_line(tmp_path, monkeypatch, capsys):
    seen = stub_scorer(monkeypatch, lambda code: INFRA)
    assert main(stub_config(tmp_path)) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "infrastructure" in err[-1] and "runs/discovery/sft" in err[-1]
    assert len(seen) == 2  # both seeds tried; no proposal asked for while nothing can be scored
    records = Archive(tmp_path / "run" / "archive.jsonl").load()
    assert {r.get("failure") for r in records if r["kind"] == "seed"} == {"infrastructure"}


def test_infrastructure_failures_are_retried_on_resume_candidate_failures_are_not(tmp_path, monkeypatch):
    dpo, cell, smooth = BASELINES["dpo"]["code"], REPLAY[0]["code"], REPLAY[6]["code"]
    first = {dpo: INFRA, cell: INFRA, smooth: CANDIDATE_FAILED}
    stub_scorer(monkeypatch, lambda code: first.get(code, OK))
    assert main(stub_config(tmp_path)) == 0  # hinge was scored: not every scoring failed
    seen = stub_scorer(monkeypatch, lambda code: OK)
    assert main(stub_config(tmp_path)) == 0
    assert seen == [dpo, cell]  # the seed and the proposal that failed for infrastructure, not `smooth`
    records = Archive(tmp_path / "run" / "archive.jsonl").load()
    proposals = [r for r in records if r["kind"] == "proposal"]
    assert [(p["name"], p["status"], p.get("failure")) for p in proposals] == [
        ("cell", "failed", "infrastructure"), ("smooth", "failed", "candidate"), ("cell", "evaluated", None)]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["proposals"] == {"evaluated": 1, "failed": 1} and summary["baselines"]["dpo"] == 0.75


# ---------------------------------------------------------------------------------------------- issue 24.1
def in_place_gamer(edit):
    """A candidate that computes the honest DPO loss, then edits its inputs in place (``edit`` is one line)."""
    return HEAD.replace("def f", "def gamer") + f"    loss = -F.logsigmoid(beta * ({MARGIN}))\n    {edit}\n" \
        "    return loss\n"


EDITS = [f"{arg}{op}" for arg in ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps",
                                    "ref_rejected_logps")
         for op in (".data.add_(1000.0)", ".add_(-1000.0)", ".copy_(torch.full_like(ref_rejected_logps, 9.0))",
                    "[0] = 1000.0")]


def test_in_place_edits_of_the_loss_inputs_do_not_change_the_metrics():
    from datamodules import PreferenceDataModule
    from lit_modules import DPO
    from discovery.sandbox import load_candidate
    from lit_modules.dpo import METRICS

    dm = PreferenceDataModule(num_examples=16, batch_size=8, val_fraction=0.25, seed=0)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    honest = DPO(model=TINY, loss="sigmoid", beta=0.05, init_seed=0)
    honest.configure_model()
    _, want = honest.compute_loss(batch)
    for edit in EDITS:
        for ref_in_batch in (False, True):
            gamer = DPO(model=TINY, loss=load_candidate(in_place_gamer(edit)), beta=0.05, init_seed=0)
            gamer.configure_model()
            b = dict(batch)
            if ref_in_batch:  # precomputed / supplied reference log-probs: the candidate must not edit them either
                b["ref_chosen_logps"], b["ref_rejected_logps"] = honest.reference_logps(batch)
                b = {k: (v.clone() if k.startswith("ref_") else v) for k, v in b.items()}
                kept = (b["ref_chosen_logps"].clone(), b["ref_rejected_logps"].clone())
            loss, got = gamer.compute_loss(b)
            loss.backward()  # the clone the candidate edited still carries the policy's gradient
            for k in METRICS:
                assert torch.allclose(got[k], want[k], atol=1e-6), (edit, ref_in_batch, k, got[k], want[k])
            assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in gamer.policy.parameters()), edit
            if ref_in_batch:
                assert torch.equal(b["ref_chosen_logps"], kept[0]) and torch.equal(b["ref_rejected_logps"], kept[1])


# ---------------------------------------------------------------------------------------------- issue 24.2
def test_huge_error_messages_are_capped_in_the_archive_and_the_feedback(tmp_path):
    from discovery.sandbox import MAX_TEXT_CHARS

    replay = tmp_path / "replay.jsonl"
    replay.write_text(json.dumps({"name": "shout", "code": body("raise ValueError('B' * 50_000_000)")}) + "\n")
    loop = DiscoveryLoop(run_dir=str(tmp_path / "run"), proposer=ReplayProposer(str(replay)),
                         fitness=tiny_fitness(), generations=1, max_attempts=1, seeds=[], references=[],
                         limits=SandboxLimits(validate_timeout_s=60, memory_mb=1024))
    loop.run()
    (record,) = [r for r in Archive(tmp_path / "run" / "archive.jsonl").load() if r["kind"] == "proposal"]
    assert record["status"] == "invalid" and "ValueError: BBBB" in record["error"]
    assert "characters cut" in record["error"] and record["failure"] == "candidate"
    assert len(record["error"]) <= MAX_TEXT_CHARS
    assert len(record["feedback"]) <= MAX_TEXT_CHARS + 200
    assert (tmp_path / "run" / "archive.jsonl").stat().st_size < 10 * MAX_TEXT_CHARS + 20_000


def test_cap_text_keeps_head_and_tail():
    from discovery.sandbox import cap_text

    assert cap_text("short") == "short"
    text = cap_text("H" * 10 + "x" * 100_000 + "T" * 10, limit=1000)
    assert len(text) <= 1000 and text.startswith("H" * 10) and text.endswith("T" * 10) and "100020 characters" in text


# ---------------------------------------------------------------------------------------------- issue 24.3
STRING_TO_TYPE = {
    "set_default_tensor_type": body("torch.set_default_tensor_type('os.system')", "return policy_chosen_logps"),
    "storage type(str)": body("torch.FloatStorage(1).type('os.system')", "return policy_chosen_logps"),
    "tensor type(str)": body("x = policy_chosen_logps.type('torch.DoubleTensor')", "return x"),
    "type(dtype=str)": body("x = policy_chosen_logps.type(dtype='os.system')", "return x"),
    "type(variable)": body("s = 'os.' + 'system'", "x = policy_chosen_logps.type(s)", "return x"),
    "type as a value": body("t = policy_chosen_logps.type", "x = t('os.system')", "return x"),
    "set_default_dtype(str)": body("torch.set_default_dtype('os.system')", "return policy_chosen_logps"),
    "assign torch attribute": body("torch.isfinite = torch.ones_like", "return policy_chosen_logps"),
    "assign F attribute": body("F.logsigmoid = torch.zeros_like", "return policy_chosen_logps"),
    "augmented assign": body("torch.e += 1", "return policy_chosen_logps"),
    "delete torch attribute": body("del torch.isfinite", "return policy_chosen_logps"),
    "top-level assign": "torch.isfinite = torch.ones_like\n" + GOOD,
}


@pytest.mark.parametrize("case", sorted(STRING_TO_TYPE))
def test_static_check_refuses_string_to_type_and_torch_attribute_assignment(case):
    with pytest.raises(CandidateRejected, match="not allowed"):
        check_code(STRING_TO_TYPE[case])


def test_type_with_a_torch_dtype_still_passes():
    assert check_code(body("x = policy_chosen_logps.type(torch.float64)", "return x.float()")) == "f"


# ---------------------------------------------------------------------------------------------- issue 24.4
def test_loss_infinite_only_in_training_is_a_candidate_failure():
    from discovery.sandbox import load_candidate

    code = body(f"loss = -F.logsigmoid(beta * ({MARGIN}))",
                "if policy_chosen_logps.requires_grad and policy_chosen_logps.shape[0] != 10:",
                "    return loss + math.inf", "return loss")
    fn = load_candidate(code)
    validate_loss(fn)  # finite on the validity check's inputs
    with pytest.raises(ValueError, match="training loss is not finite"):
        tiny_fitness().evaluate(fn)


def test_summary_escapes_names_with_pipes_and_newlines(tmp_path):
    records = [{"kind": "proposal", "generation": 0, "attempt": i, "name": name, "status": "invalid",
                "fitness": None, "error": "e | f\ng"} for i, name in enumerate(["a|b", "c\nd | e", "ok"])]
    write_summary(records, tmp_path)
    lines = (tmp_path / "summary.md").read_text().splitlines()
    assert len(lines) == 2 + len(records)
    cells = [len(re.split(r"(?<!\\)\|", line)) for line in lines]
    assert len(set(cells)) == 1, lines
    assert "a\\|b" in lines[2] and "c d \\| e" in lines[3]


def test_fitness_paths_reach_the_worker_absolute(tmp_path, monkeypatch):
    from discovery.fitness import fitness_config

    (tmp_path / "models" / "sft").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    for model, want in (("models/sft", str(tmp_path / "models" / "sft")), ("./gone", str(tmp_path / "gone")),
                        ("runs/discovery/sft", str(tmp_path / "runs" / "discovery" / "sft")),
                        ("HuggingFaceTB/SmolLM2-135M", "HuggingFaceTB/SmolLM2-135M")):
        assert fitness_config(DPOFitness(model=model))["init_args"]["model"] == want
    assert fitness_config(DPOFitness(model=TINY))["init_args"]["metric"] == "val_reward_accuracy"
    assert DiscoveryLoop(run_dir="runs/x", proposer=ReplayProposer.__new__(ReplayProposer)).run_dir == \
        tmp_path / "runs" / "x"
