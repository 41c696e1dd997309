"""Running untrusted, LLM-written loss code: a static check, a restricted namespace, and a separate worker process
with resource limits (issue 15; docs/discopop.md "Discovery loop" says what this does and does not guarantee).

Layers, outermost first:

1. :func:`check_code` (parent process, no execution): the source is parsed with :mod:`ast` and rejected unless it
   is exactly one top-level ``def`` (plus optional ``import torch`` / ``import torch.nn.functional as F`` /
   ``import math`` and constant assignments) that uses only its own names, ``torch``, ``F``, ``math`` and a short
   list of harmless builtins; no attribute or name starting with ``_`` (so no ``__class__``, ``__globals__``,
   ``__builtins__``, ``__subclasses__``); no attribute that reaches files, processes or native code
   (``load``, ``save``, ``from_file``, ``numpy``, ``utils``, ``ops``, ``hub``, ``jit``, ``os`` ...); no
   ``class``, ``global``, ``try``, ``with``, ``yield``, decorators, ``eval``/``exec``/``compile``/``open``/
   ``getattr``/``exit``...
2. :func:`run_in_worker`: the code runs in a process forked from a forkserver that only imported torch and
   this package (so it starts in ~0.1 s and shares nothing with the parent's state), in a fresh temporary
   working directory, with ``RLIMIT_AS`` (memory), ``RLIMIT_CPU``, ``RLIMIT_FSIZE`` and ``RLIMIT_CORE`` set,
   one torch thread, and a wall-clock budget per phase (validation, training) enforced by the parent, which
   kills the worker when it is exceeded.
3. Inside the worker, the code is executed with restricted builtins (no ``open``, ``__import__`` only for torch /
   torch.nn.functional / math) and after :func:`install_audit_hook`: a :func:`sys.addaudithook` hook (which
   cannot be removed) that refuses sockets, subprocesses, ``os.system``/``exec``/``fork``/``kill``, ``ctypes``,
   and any file creation, write, rename or removal outside the worker's temporary directory.
"""

from __future__ import annotations

import ast
import math
import multiprocessing
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import asdict, dataclass
from typing import Any

from discovery.fitness import SIGNATURE, InfrastructureError

MAX_CODE_CHARS = 20_000
#: Longest text a candidate can put into a result (error message, repr, worker log, traceback): longer text keeps
#: its head and tail around a marker naming how much was cut (issue 24.2).
MAX_TEXT_CHARS = 4_000
MAX_AST_NODES = 5_000
#: Modules the candidate may import (and the names it sees without importing).
ALLOWED_IMPORTS = ("torch", "torch.nn.functional", "math")
#: torch submodules reachable by attribute (``torch.linalg.norm``...); every other module attribute is refused.
ALLOWED_SUBMODULES = frozenset({"torch", "torch.nn", "torch.nn.functional", "torch.functional", "torch.linalg",
                                "torch.special", "torch.fft", "torch.autograd", "torch.autograd.functional",
                                "math"})
#: Attribute prefixes of frames, code objects, generators, coroutines and tracebacks (``gen.gi_frame.f_back
#: .f_globals`` would reach the worker's own globals).
DENIED_ATTRIBUTE_PREFIXES = ("_", "gi_", "ag_", "cr_", "f_", "tb_", "co_", "register")
SAFE_BUILTIN_NAMES = ("abs", "all", "any", "bool", "dict", "divmod", "enumerate", "filter", "float", "int",
                      "isinstance", "iter", "len", "list", "map", "max", "min", "next", "pow", "range", "reversed",
                      "round", "set", "slice", "sorted", "str", "sum", "tuple", "zip", "ArithmeticError",
                      "Exception", "RuntimeError", "TypeError", "ValueError", "ZeroDivisionError")
#: Names refused with an explicit reason (the rest of the unknown names are "not defined").
DENIED_NAMES = frozenset({
    "eval", "exec", "compile", "open", "__import__", "globals", "locals", "vars", "getattr", "setattr", "delattr",
    "hasattr", "dir", "breakpoint", "input", "exit", "quit", "help", "memoryview", "type", "object", "super",
    "classmethod", "staticmethod", "property", "id", "print", "format", "SystemExit", "KeyboardInterrupt",
    "BaseException", "os", "sys", "subprocess", "socket", "ctypes", "importlib", "builtins", "numpy", "np",
    "shutil", "pathlib", "pickle", "io", "signal", "threading", "multiprocessing", "inspect"})
#: Attribute names refused on any object: file/process/native-code access, hooks, and raw memory.
DENIED_ATTRIBUTES = frozenset({
    "load", "save", "hub", "utils", "cpp_extension", "from_file", "fromfile", "tofile", "numpy", "ops", "classes",
    "library", "jit", "package", "multiprocessing", "distributed", "backends", "compile", "serialization", "onnx",
    "export", "profiler", "storage", "untyped_storage", "share_memory_", "set_", "as_strided", "frombuffer",
    "open", "system", "popen", "format", "format_map", "fx", "overrides", "testing", "set_num_threads",
    "set_num_interop_threads", "set_default_device", "pickle", "os", "sys", "subprocess", "ctypes", "importlib",
    "builtins", "socket", "shutil", "pathlib", "io", "inspect", "signal", "threading", "from_dlpack", "to_dlpack",
    # string -> type resolution imports any module (torch._utils._import_dotted_name); global torch state
    "set_default_tensor_type", "set_default_dtype"})
DENIED_NODES = {
    ast.ClassDef: "class definitions", ast.AsyncFunctionDef: "async functions", ast.Global: "'global'",
    ast.Nonlocal: "'nonlocal'", ast.Try: "try/except", ast.With: "'with' blocks", ast.AsyncWith: "'with' blocks",
    ast.Yield: "generators (yield)", ast.YieldFrom: "generators (yield)", ast.Await: "await",
    ast.AsyncFor: "async for", ast.Match: "match statements"}
if hasattr(ast, "TryStar"):
    DENIED_NODES[ast.TryStar] = "try/except"

class CandidateRejected(ValueError):
    """The candidate's source failed the static check; the message is the reason fed back to the proposer."""


def cap_text(text: str, limit: int = MAX_TEXT_CHARS) -> str:
    """``text`` if it has at most ``limit`` characters, else its head and tail around a marker naming the cut."""
    text = str(text)
    if len(text) <= limit:
        return text
    keep = max(0, limit - len(f" [... {len(text)} of {len(text)} characters cut ...] "))
    marker = f" [... {len(text) - keep} of {len(text)} characters cut ...] "
    return text[: keep - keep // 2] + marker + text[len(text) - keep // 2:]


@dataclass
class SandboxLimits:
    """Per-candidate resource limits of the worker process.

    Args:
        validate_timeout_s: wall-clock seconds for loading and validating the code.
        train_timeout_s: wall-clock seconds for the fitness run (training + scoring).
        startup_timeout_s: wall-clock seconds for the worker to start and build the fitness data/model.
        memory_mb: address space the worker may add on top of what it had after its imports (``RLIMIT_AS``).
        max_file_mb: largest file the worker may write (``RLIMIT_FSIZE``), inside its temporary directory.
    """

    validate_timeout_s: float = 30.0
    train_timeout_s: float = 900.0
    startup_timeout_s: float = 120.0
    memory_mb: int = 4096
    max_file_mb: int = 16

    def __post_init__(self) -> None:
        for name in ("validate_timeout_s", "train_timeout_s", "startup_timeout_s", "memory_mb", "max_file_mb"):
            if getattr(self, name) <= 0:
                raise ValueError(f"sandbox limit {name} must be > 0, got {getattr(self, name)}")


# ---------------------------------------------------------------------------------------------- static check
def _module_attribute_denials() -> frozenset[str]:
    """Names under which torch / torch.nn / F / math expose a module outside :data:`ALLOWED_SUBMODULES`
    (``torch.os``, ``torch.sys``, ``F.torch``...), all refused as attributes."""
    import types

    import torch
    import torch.nn.functional as F

    denied = set()
    for namespace in (torch, torch.nn, F, torch.linalg, torch.special, torch.fft, torch.autograd, math):
        for name in dir(namespace):
            value = getattr(namespace, name, None)
            if isinstance(value, types.ModuleType) and value.__name__ not in ALLOWED_SUBMODULES:
                denied.add(name)
    return frozenset(denied)


_MODULE_DENIALS: frozenset[str] | None = None


def _denied_attribute(name: str) -> str | None:
    global _MODULE_DENIALS
    if name.startswith("_"):
        return f"attribute '{name}' is not allowed (no attribute starting with '_': no introspection)"
    if name in DENIED_ATTRIBUTES or name.startswith(DENIED_ATTRIBUTE_PREFIXES):
        return f"attribute '{name}' is not allowed (it can reach files, processes, native code, frames or hooks)"
    if _MODULE_DENIALS is None:
        _MODULE_DENIALS = _module_attribute_denials()
    if name in _MODULE_DENIALS:
        return f"attribute '{name}' is not allowed (it is a module outside torch/torch.nn.functional/math)"
    return None


def _import_error(node: ast.Import | ast.ImportFrom) -> str | None:
    if isinstance(node, ast.Import):
        bad = [a.name for a in node.names if a.name not in ALLOWED_IMPORTS]
        return f"import of {', '.join(bad)} is not allowed (only torch, torch.nn.functional, math)" if bad else None
    if node.level or node.module not in ("math", "torch.nn.functional", "torch.nn"):
        return f"'from {'.' * node.level}{node.module or ''} import ...' is not allowed (only torch, " \
               "torch.nn.functional, math)"
    if node.module == "torch.nn" and any(a.name != "functional" for a in node.names):
        return "only 'from torch.nn import functional' is allowed from torch.nn"
    for alias in node.names:
        reason = "'*' imports are not allowed" if alias.name == "*" else _denied_attribute(alias.name)
        if reason:
            return reason
    return None


def _bound_names(tree: ast.AST) -> set[str]:
    """Every name the code itself binds: assignments, loop/comprehension targets, parameters, defs, imports."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            names.add(node.id)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, ast.FunctionDef):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return names


def _is_torch_attribute(node: ast.AST) -> bool:
    """``torch.<name>`` (a dtype such as ``torch.float64``): the only argument ``.type(...)`` may take."""
    return isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "torch"


def _dtype_type_calls(nodes: list[ast.AST]) -> set[int]:
    """ids of the ``x.type`` attributes that are called with nothing or only ``torch.<dtype>`` arguments; any other
    ``.type`` (a string, a variable, the method as a value) could resolve a string to a type, importing a module."""
    allowed = set()
    for node in nodes:
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "type":
            values = list(node.args) + [k.value for k in node.keywords]
            if all(_is_torch_attribute(v) for v in values):
                allowed.add(id(node.func))
    return allowed


def _attribute_error(node: ast.Attribute, dtype_casts: set[int]) -> str | None:
    """Why the attribute ``node`` is refused, or ``None``."""
    if not isinstance(node.ctx, ast.Load):
        return f"assigning or deleting attribute '{node.attr}' is not allowed (no changes to torch, F, math or " \
               "tensor attributes)"
    if node.attr == "type" and id(node) not in dtype_casts:
        return "'.type(...)' with anything but a torch dtype (torch.float64...) is not allowed (a string is " \
               "resolved to a type by importing a module; use .to(dtype))"
    return _denied_attribute(node.attr)


def check_code(code: str) -> str:
    """Statically check candidate loss code; return the name of its one function or raise
    :class:`CandidateRejected` with the reason (line numbers refer to the candidate's source)."""
    if not isinstance(code, str) or not code.strip():
        raise CandidateRejected("the code is empty")
    if len(code) > MAX_CODE_CHARS:
        raise CandidateRejected(f"the code is {len(code)} characters long; at most {MAX_CODE_CHARS} are allowed")
    try:
        tree = ast.parse(code, filename="<candidate>")
    except (SyntaxError, ValueError, MemoryError, RecursionError) as e:
        raise CandidateRejected(f"the code does not parse: {type(e).__name__}: {e}") from None
    nodes = list(ast.walk(tree))
    if len(nodes) > MAX_AST_NODES:
        raise CandidateRejected(f"the code has {len(nodes)} syntax nodes; at most {MAX_AST_NODES} are allowed")
    functions = []
    for stmt in tree.body:
        if isinstance(stmt, ast.FunctionDef):
            functions.append(stmt)
        elif not isinstance(stmt, (ast.Import, ast.ImportFrom, ast.Assign, ast.AnnAssign, ast.Expr)) or (
                isinstance(stmt, ast.Expr) and not isinstance(stmt.value, ast.Constant)):
            raise CandidateRejected(f"line {stmt.lineno}: only imports, constants and one function definition "
                                    f"are allowed at the top level, not {type(stmt).__name__}")
    if len(functions) != 1:
        raise CandidateRejected(f"the code must define exactly one top-level function {SIGNATURE}, "
                                f"found {len(functions)}")
    if functions[0].decorator_list:
        raise CandidateRejected(f"line {functions[0].lineno}: decorators are not allowed")
    known = _bound_names(tree) | set(SAFE_BUILTIN_NAMES) | {"torch", "F", "math"}
    dtype_casts = _dtype_type_calls(nodes)
    # report the first offence in reading order (where it ends: `a.__class__` before `a.__class__.__mro__`)
    nodes.sort(key=lambda n: (getattr(n, "end_lineno", 0) or 0, getattr(n, "end_col_offset", 0) or 0))
    for node in nodes:
        where = f"line {getattr(node, 'lineno', '?')}: "
        for kind, what in DENIED_NODES.items():
            if isinstance(node, kind):
                raise CandidateRejected(where + f"{what} are not allowed")
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            reason = _import_error(node)
        elif isinstance(node, ast.Attribute):
            reason = _attribute_error(node, dtype_casts)
        elif isinstance(node, ast.Name):
            if node.id in DENIED_NAMES or node.id.startswith("__"):
                reason = f"name '{node.id}' is not allowed (sandbox: no eval/exec/compile/open/imports/" \
                         "introspection/exit)"
            elif isinstance(node.ctx, ast.Load) and node.id not in known:
                reason = f"name '{node.id}' is not defined (available: torch, F, math and basic builtins)"
            else:
                reason = None
        else:
            reason = None
        if reason:
            raise CandidateRejected(where + reason)
    return functions[0].name


# ---------------------------------------------------------------------------------------------- worker side
def _guarded_import(name, globals=None, locals=None, fromlist=(), level=0):
    if level != 0 or name not in ALLOWED_IMPORTS + ("torch.nn",):
        raise ImportError(f"import of {name!r} is not allowed in the sandbox")
    return __import__(name, globals, locals, fromlist, level)


def safe_namespace() -> dict[str, Any]:
    """Globals for executing candidate code: restricted builtins, ``torch``, ``F``, ``math``."""
    import builtins

    import torch
    import torch.nn.functional as F

    safe = {name: getattr(builtins, name) for name in SAFE_BUILTIN_NAMES}
    safe["__import__"] = _guarded_import
    return {"__builtins__": safe, "__name__": "candidate", "torch": torch, "F": F, "math": math}


def load_candidate(code: str):
    """Compile ``code`` and execute it in :func:`safe_namespace`; return its one top-level function."""
    tree = ast.parse(code, filename="<candidate>")
    names = [s.name for s in tree.body if isinstance(s, ast.FunctionDef)]
    if len(names) != 1:
        raise CandidateRejected(f"the code must define exactly one top-level function, found {len(names)}")
    namespace = safe_namespace()
    exec(compile(tree, "<candidate>", "exec"), namespace)  # noqa: S102 - the point of this module
    return namespace[names[0]]


_SECRET_WORDS = ("KEY", "TOKEN", "SECRET", "PASSWORD", "PASSWD", "CREDENTIAL", "AUTH")
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_PATH_EVENTS = {"os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.truncate",
                "os.symlink", "os.link", "os.utime", "shutil.rmtree", "shutil.copyfile", "shutil.move",
                "os.chdir", "os.chroot"}
_DENIED_EVENTS = ("socket.", "subprocess.", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
                  "os.forkpty", "os.kill", "os.killpg", "ctypes.", "pty.", "webbrowser.",
                  "urllib.", "http.", "ftplib.", "smtplib.", "telnetlib.", "sys.remote_exec", "code.__new__",
                  "sys._current_frames", "builtins.input", "resource.setrlimit", "sys.addaudithook")


def scrub_secrets(environ) -> None:
    """Remove variables whose names contain KEY/TOKEN/SECRET/PASSWORD/PASSWD/CREDENTIAL/AUTH (the proposer's API
    keys are none of the candidate's business)."""
    for name in [k for k in environ if any(w in k.upper() for w in _SECRET_WORDS)]:
        del environ[name]


def install_audit_hook(workdir: str) -> None:
    """Refuse (raise ``PermissionError``) network, process, native-code and out-of-``workdir`` file events for the
    rest of this process's life (audit hooks cannot be removed)."""
    root = os.path.realpath(workdir) + os.sep

    def inside(path: Any) -> bool:
        if isinstance(path, int):
            return True  # an already open descriptor
        try:
            return os.path.realpath(os.fsdecode(path)).startswith(root)
        except (TypeError, ValueError):
            return False

    def hook(event: str, args: tuple) -> None:
        if event.startswith(_DENIED_EVENTS):
            raise PermissionError(f"sandbox: '{event}' is not allowed")
        if event == "open":
            path, mode, flags = (tuple(args) + (None, None))[:3]
            writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & _WRITE_FLAGS)
            if writes and not inside(path):
                raise PermissionError(f"sandbox: writing {path!r} (outside the worker's temporary directory) "
                                      "is not allowed")
        elif event in _PATH_EVENTS:
            paths = [a for a in args[:2] if isinstance(a, (str, bytes, os.PathLike))]
            if not all(inside(p) for p in paths):
                raise PermissionError(f"sandbox: '{event}' on {paths} (outside the worker's temporary directory) "
                                      "is not allowed")

    sys.addaudithook(hook)


def _set_limits(limits: dict) -> None:
    with open("/proc/self/status") as f:
        vm_kb = next(int(line.split()[1]) for line in f if line.startswith("VmSize:"))
    address_space = vm_kb * 1024 + limits["memory_mb"] * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))
    cpu = int(limits["validate_timeout_s"] + limits["train_timeout_s"] + limits["startup_timeout_s"]) + 5
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 5))
    size = limits["max_file_mb"] * 2**20
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def describe_exception(e: BaseException, code: str = "") -> str:
    """``Type: message`` plus the candidate's own frames (``<candidate>`` line numbers), memory errors named."""
    text = f"{type(e).__name__}: {e}".strip()
    if isinstance(e, MemoryError) or "can't allocate memory" in str(e) or "not enough memory" in str(e):
        text = f"memory limit exceeded ({text})"
    lines = code.splitlines()
    frames = [f"line {fr.lineno}: {lines[fr.lineno - 1].strip() if 0 < fr.lineno <= len(lines) else ''}"
              for fr in traceback.extract_tb(e.__traceback__) if fr.filename == "<candidate>"]
    return text + (" [in the candidate at " + "; ".join(frames[-3:]) + "]" if frames else "")


def _worker_main(task: dict, conn) -> None:
    """Entry of the worker process (forked from the forkserver): limits, audit hook, load, validate, train."""
    stage = "startup"
    try:
        os.chdir(task["workdir"])
        log_fd = os.open("worker.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        sys.dont_write_bytecode = True
        import ctypes

        ctypes.CDLL(None).prctl(1, 9)  # PR_SET_PDEATHSIG = SIGKILL: die with the forkserver (which dies with the run)
        import torch

        torch.set_num_threads(1)
        scrub_secrets(os.environ)
        _set_limits(task["limits"])
        from discovery.fitness import build_fitness, validate_loss

        fitness = build_fitness(task["fitness"]) if task.get("fitness") else None
        if fitness is not None:
            fitness.setup()  # before the candidate runs: a failure here is never the candidate's fault
        install_audit_hook(task["workdir"])
        stage = "validate"
        conn.send(("phase", stage))
        if task.get("static_check", True):
            check_code(task["code"])
        fn = load_candidate(task["code"])
        validate_loss(fn)
        if fitness is None:
            conn.send(("result", {"metrics": {}}))
            return
        stage = "train"
        conn.send(("phase", stage))
        metrics = fitness.evaluate(fn, length_normalize=task.get("length_normalize", False))
        conn.send(("result", {"metrics": metrics}))
    except BaseException as e:  # noqa: BLE001 - everything the candidate raises is a reason to report
        try:
            infrastructure = stage == "startup" or isinstance(e, InfrastructureError)
            conn.send(("error", {"stage": stage, "error": cap_text(describe_exception(e, task["code"])),
                                 "failure": "infrastructure" if infrastructure else "candidate"}))
        except BaseException:  # noqa: BLE001 - e.g. out of memory while reporting: the parent sees the exit
            pass
    finally:
        try:
            conn.close()
        finally:
            os._exit(0)


_CTX_LOCK = threading.Lock()
_CTX = None
PRELOAD = ["torch", "lightning", "transformers", "lit_modules.dpo", "datamodules",
           "discovery.fitness", "discovery.sandbox"]


def _context():
    """The forkserver multiprocessing context; its server preloads torch and this package once."""
    global _CTX
    with _CTX_LOCK:
        if _CTX is None:
            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload(PRELOAD)
            _CTX = ctx
    return _CTX


_SIGNALS = {9: "killed (SIGKILL, likely the system's out-of-memory killer)", 24: "CPU time limit exceeded (SIGXCPU)",
            25: "file size limit exceeded (SIGXFSZ)", 11: "crashed (SIGSEGV)", 6: "aborted (SIGABRT)"}


def run_in_worker(code: str, limits: SandboxLimits, fitness: dict | None = None, length_normalize: bool = False,
                  static_check: bool = True) -> dict:
    """Validate (and, with ``fitness`` = a :func:`fitness_config`, train and score) ``code`` in a worker.

    Returns ``{"status": "ok", "metrics": {...}}`` or ``{"status": "invalid" | "failed", "stage": ...,
    "error": reason, "failure": "candidate" | "infrastructure"}`` (``invalid`` = rejected before or during
    validation, ``failed`` = the worker could not start or the fitness run failed; ``failure`` says whose fault:
    the worker's startup and :class:`InfrastructureError` are not the candidate's), always with ``seconds``;
    ``error`` is capped at :data:`MAX_TEXT_CHARS`. ``static_check=False`` skips :func:`check_code` in the parent
    and the worker; it exists only to test the runtime layers on their own.
    """
    t0 = time.monotonic()
    if static_check:
        try:
            check_code(code)
        except CandidateRejected as e:
            return {"status": "invalid", "stage": "static", "error": cap_text(str(e)), "failure": "candidate",
                    "seconds": time.monotonic() - t0}
    workdir = tempfile.mkdtemp(prefix="discopop_candidate_")
    task = {"code": code, "limits": asdict(limits), "fitness": fitness, "length_normalize": length_normalize,
            "workdir": workdir, "static_check": static_check}
    ctx = _context()
    parent_conn, child_conn = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_worker_main, args=(task, child_conn), daemon=True)
    proc.start()
    child_conn.close()
    budgets = {"startup": limits.startup_timeout_s, "validate": limits.validate_timeout_s,
               "train": limits.train_timeout_s}
    stage, deadline, outcome = "startup", time.monotonic() + limits.startup_timeout_s, None
    try:
        while outcome is None:
            if not parent_conn.poll(max(0.0, deadline - time.monotonic())):
                proc.kill()
                outcome = {"stage": stage, "error": f"time limit exceeded: more than {budgets[stage]:g} s "
                                                    f"(wall clock) in the {stage} phase; the worker was killed",
                           "failure": _failure_kind(stage)}
                break
            try:
                kind, payload = parent_conn.recv()
            except (EOFError, OSError):
                proc.join(5)
                code_ = proc.exitcode
                reason = _SIGNALS.get(-code_, f"exit code {code_}") if code_ is not None else "no exit code"
                outcome = {"stage": stage, "error": f"the worker died without a result: {reason}"
                                                    + _log_tail(workdir), "failure": _failure_kind(stage)}
                break
            if kind == "phase":
                stage, deadline = payload, time.monotonic() + budgets[payload]
            elif kind == "result":
                outcome = {"status": "ok", **payload}
            else:
                outcome = payload
    finally:
        parent_conn.close()
        proc.join(5)
        if proc.is_alive():
            proc.kill()
            proc.join(5)
        shutil.rmtree(workdir, ignore_errors=True)
    if "status" not in outcome:
        outcome["status"] = "failed" if outcome["stage"] in ("train", "startup") else "invalid"
        outcome["error"] = cap_text(outcome.get("error", ""))
        outcome["failure"] = outcome.get("failure") or _failure_kind(outcome["stage"])
    outcome["seconds"] = time.monotonic() - t0
    return outcome


def _failure_kind(stage: str) -> str:
    """Whose fault a failure in ``stage`` is: the worker's startup (before the candidate is loaded) is
    ``infrastructure``; validation and training are the ``candidate``'s."""
    return "infrastructure" if stage == "startup" else "candidate"


def _log_tail(workdir: str, chars: int = 600) -> str:
    """The last ``chars`` characters of the worker's stdout/stderr (read from the end: the log may be large)."""
    try:
        with open(os.path.join(workdir, "worker.log"), "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4 * chars))
            tail = f.read().decode(errors="replace")[-chars:].strip()
    except OSError:
        return ""
    return f" (worker log tail: {tail})" if tail else ""
