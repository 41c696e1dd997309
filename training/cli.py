"""The training floor's LightningCLI: ``litpapers fit|validate|test`` (``cli.py`` hands these to :func:`main`;
``python -m training`` runs it without the top-level tools), one LightningCLI for every module, datamodule,
callback and optimizer in this package.

    litpapers fit --config configs/ademamix/quick.yaml
    litpapers fit --config configs/ademamix/quick_adamw.yaml --model.optimizer AdEMAMix --model.optimizer.lr 1e-3
    litpapers validate --config configs/probes/probe_local_model.yaml --model.model /path/to/hf_model

Models and datamodules are chosen in subclass mode (``model.class_path: lit_modules.CausalLM`` or just
``CausalLM``). Defaults: TensorBoard logger under ``logs/<run name>/version_N`` (claimed atomically: two runs never
share one, ``callbacks/loggers.py``) (the run name is the last ``--config``
file's stem unless the config names it), a progress bar in steps (``callbacks/progress.py``),
``seed_everything: 0``, and what keeps a run
from losing work (``callbacks/lifecycle.py``): ``last.ckpt`` every ``DEFAULT_CHECKPOINT_EVERY`` steps, at the end
and on Ctrl-C, random states in the checkpoint (exact resume), and a stop on a non-finite loss
(``--stop_on_nonfinite_loss false`` turns it off).

Errors raised by this package's own checks (a bad argument, a missing file) end the output as one line
``error: ...``; set ``LITPAPERS_DEBUG=1`` to see the traceback instead. A bad flag or value prints one hint line and
one ``error:`` line naming the flag, the expected type and the value (:class:`LitPapersParser`); flags are never
abbreviated (``--trainer.max_step`` is an error, not ``--trainer.max_steps``). A ``--ckpt_path`` that is not a
readable checkpoint is named as such before anything is unpickled.
The optimizer is the model's own argument (``--model.optimizer AdEMAMix --model.optimizer.alpha 8``, see
``lit_modules/base.py``): built once, on the module's parameter groups (no weight decay on biases/norms, frozen
teachers excluded), with the module's warm-up/decay schedule unless ``--model.lr_scheduler`` is set. The top-level
``--optimizer``/``--lr_scheduler`` (and ``optimizer:``/``lr_scheduler:`` config keys) still work: they are moved
into the model's arguments (replacing the model's own) before it is built.
A built-in checkpoint that the model's arguments name and that is missing (``checkpoints/minillm_teacher`` on a fresh
clone) is trained first, with a line saying so (:mod:`training.builtin_checkpoints`); the modules only load it.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
import traceback
from pathlib import Path

from training.console import quiet_console

quiet_console()  # before the imports below: transformers imports torchao, which logs at import

from jsonargparse import Namespace  # noqa: E402
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI  # noqa: E402

# Imported so their classes resolve by short name (``--optimizer AdEMAMix``, ``CausalLM``, callbacks).
import callbacks  # noqa: E402,F401
import datamodules  # noqa: E402,F401
import lit_modules  # noqa: E402,F401
import optimizers  # noqa: E402,F401
from callbacks.checkpoint_io import check_checkpoint_file  # noqa: E402
from callbacks.lifecycle import LastCheckpoint  # noqa: E402
from callbacks.loggers import VERSIONED_LOGGERS  # noqa: E402
from callbacks.oversquashing import probe_summary  # noqa: E402
from training.builtin_checkpoints import ensure_built_in  # noqa: E402

DEFAULT_CHECKPOINT_EVERY = 200
#: The logger's run name without a ``--config`` file; with one, the last file's stem (:func:`run_name`).
DEFAULT_RUN_NAME = "litpapers"
ROOT = Path(__file__).resolve().parents[1]
#: Where this package's own code lives: an error raised there is a message for the user, not a bug report.
PACKAGE_DIRS = tuple(str(ROOT / d) + os.sep for d in ("lm", "lit_modules", "datamodules", "callbacks", "optimizers",
                                                        "training"))
#: Exception types our own validation raises (an AttributeError and the like stay a traceback: a bug).
USER_ERROR_TYPES = (ValueError, TypeError, KeyError, OSError, RuntimeError, ImportError)
EXIT_INTERRUPTED = 130



def _type_name(text: str) -> str:
    """``<class 'int'>`` -> ``int``, ``<class 'lightning.pytorch.core.module.LightningModule'>`` ->
    ``LightningModule``; other type texts unchanged."""
    return re.sub(r"<class '(?:[\w.]*\.)?(\w+)'>", r"\1", text)


def _flag(key: str, given: list[str]) -> str:
    """The command-line flag a dotted parser key came from (``model.init_args.warmup_steps`` ->
    ``--model.init_args.warmup_steps`` or ``--model.warmup_steps``), else the key itself (it came from a config
    file)."""
    names = [arg.split("=", 1)[0] for arg in given if arg.startswith("--")]
    last = key.rsplit(".", 1)[-1]
    return next((n for n in names if n[2:] == key), None) or next(
        (n for n in names if n[2:].endswith("." + last) and n[2:].split(".", 1)[0] == key.split(".", 1)[0]), key)


def one_line_error(message: str, given: list[str], options: list[str]) -> str:
    """Rewrite a jsonargparse error (several lines, the value last and the reason above it, often nested inside
    "Does not validate against any of the Union subtypes") as one line naming the key, the expected type and the
    value: ``--trainer.max_steps expects int, got 'lots'``. ``given`` is the command line (to name the flag of a
    key), ``options`` the accepted flags (for "did you mean")."""
    unknown = re.match(r"unrecognized arguments: (.*)", message)
    if unknown:
        flags = [a.split("=", 1)[0] for a in unknown.group(1).split() if a.startswith("--")]
        close = difflib.get_close_matches(flags[0], options, n=1) if flags else []
        hint = f" (did you mean {close[0]}?)" if close else ""
        return f"unrecognized argument{'s' if len(flags) > 1 else ''} {unknown.group(1)}{hint}"
    keys = re.findall(r'Parser key "([^"]+)":', message)
    if not keys:
        return "; ".join(line.strip() for line in message.splitlines() if line.strip())
    flag = _flag(".init_args.".join(keys), given)
    typed = re.findall(r"Expected an? (.+?)\. Got value: (.*)", message)
    if typed:
        expected, value = typed[-1]
        return f"{flag} expects {_type_name(expected)}, got {value.strip()!r}"
    option = re.search(r"Problem with given class_path '([\w.]+)':\s*Option '(\w+)' is not accepted", message)
    if option:
        cls, name = option.group(1).rsplit(".", 1)[-1], option.group(2)
        return f"{_flag('.init_args.'.join([*keys, name]), given)}: {cls} has no argument {name!r}"
    value = re.search(r"Given value: (.*)", message)
    value = value.group(1).strip() if value else None
    subtypes = re.search(r"Subtypes: \[(.*?)\]", message)
    if "Expected a dot import path string" in message and subtypes:
        kinds = [t for t in (_type_name(x.strip()) for x in subtypes.group(1).split(",")) if t != "NoneType"]
        return f"{flag} expects a {' or '.join(kinds)} class (a name or an import path), got {value!r}: no such class"
    inner = message.rsplit(f'Parser key "{keys[-1]}":', 1)[-1]
    first = next((line.strip(" -") for line in inner.splitlines() if line.strip(" -")), "invalid value")
    return f"{flag}: {first}" + (f" (got {value!r})" if value is not None and value not in first else "")


class LitPapersParser(LightningArgumentParser):
    """The ``litpapers`` parser: no abbreviated options (``--trainer.max_step`` is an error, not ``max_steps``),
    and a bad argument prints one hint line and one ``error: ...`` line (:func:`one_line_error`) instead of the
    full usage and a multi-line reason."""

    given_args: list[str] = []

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error or os.environ.get("JSONARGPARSE_DEBUG"):
            return super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        options = [o for o in getattr(parser, "_option_string_actions", {}) if o.startswith("--")]
        command = " ".join(["litpapers", *parser.prog.replace(" [options]", "").split()[1:]])
        sys.stderr.write(f"(see `{command} --help` for the accepted options)\n")
        sys.stderr.write(f"error: {one_line_error(message, self.given_args, options)}\n")
        self.exit(2)


class LitPapersCLI(LightningCLI):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("seed_everything_default", 0)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("parser_class", LitPapersParser)
        super().__init__(*args, **kwargs)

    def init_parser(self, **kwargs):
        """Every parser (the main one and each subcommand's) without abbreviated options."""
        kwargs.setdefault("allow_abbrev", False)
        return super().init_parser(**kwargs)

    def parse_arguments(self, parser, args) -> None:
        """Remember the command line, so an error about a nested key names the flag that set it."""
        given = sys.argv[1:] if args is None else args
        LitPapersParser.given_args = [str(a) for a in given] if isinstance(given, (list, tuple)) else []
        super().parse_arguments(parser, args)

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--stop_on_nonfinite_loss", type=bool, default=True,
                            help="stop fit with an error naming the step when the training loss is NaN/inf")
        parser.set_defaults({"trainer.logger": {"class_path": "callbacks.loggers.VersionedTensorBoardLogger",
                                                "init_args": {"save_dir": "logs", "name": DEFAULT_RUN_NAME}}})

    def before_instantiate_classes(self) -> None:
        """Add the default callbacks a config did not list itself (a config's own ``callbacks`` list extends
        these rather than silently dropping them): a rich progress bar, per-step LR logging, figures of the curves the
        module declares (:class:`~callbacks.MetricFigures`, e.g. DPO's rewards), a checkpoint
        every ``DEFAULT_CHECKPOINT_EVERY`` steps plus a ``last.ckpt`` that is kept current at the end, on Ctrl-C and
        on errors (:class:`~callbacks.LastCheckpoint`) with the random states in it
        (:class:`~callbacks.ExactResume`), so a run resumes exactly with
        ``--ckpt_path logs/<name>/version_N/checkpoints/last.ckpt``, and :class:`~callbacks.NonFiniteLossGuard`.
        Each is skipped when the matching switch is off."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        self._move_optimizer_into_model(config)
        self._name_run_after_config(config)
        self._claim_log_versions(config)
        trainer = config.trainer
        listed = [str(c.get("class_path", "")) for c in (trainer.get("callbacks") or [])]
        defaults = []
        if trainer.get("enable_progress_bar") is not False and not any(c.endswith("ProgressBar") for c in listed):
            defaults.append({"class_path": "callbacks.progress.StepProgressBar", "init_args": {}})
        if trainer.get("logger") not in (False, None) and not any(c.endswith("LearningRateMonitor") for c in listed):
            defaults.append({"class_path": "lightning.pytorch.callbacks.LearningRateMonitor",
                             "init_args": {"logging_interval": "step"}})
        if trainer.get("logger") not in (False, None) and not any(c.endswith("MetricFigures") for c in listed):
            defaults.append({"class_path": "callbacks.MetricFigures", "init_args": {}})
        if trainer.get("enable_checkpointing") is not False and not any(c.endswith("ModelCheckpoint") for c in listed):
            defaults.append({"class_path": "callbacks.LastCheckpoint",
                             "init_args": {"every_n_train_steps": DEFAULT_CHECKPOINT_EVERY}})
        if trainer.get("enable_checkpointing") is not False and not any(c.endswith("ExactResume")
                                                                       for c in listed):
            defaults.append({"class_path": "callbacks.ExactResume", "init_args": {}})
        if config.get("stop_on_nonfinite_loss", True) and not any(c.endswith("NonFiniteLossGuard") for c in listed):
            defaults.append({"class_path": "callbacks.NonFiniteLossGuard", "init_args": {}})
        if defaults:
            trainer.callbacks = list(trainer.get("callbacks") or []) + [
                Namespace(class_path=d["class_path"], init_args=Namespace(**d["init_args"])) for d in defaults]

    def _print_probe_summary(self) -> None:
        """Print the table of the probes' last results (:func:`~callbacks.oversquashing.probe_summary`) on rank 0,
        so a probe run ends with its numbers on the console, not only in the logs."""
        trainer = getattr(self, "trainer", None)
        table = probe_summary(trainer.callbacks) if trainer is not None and trainer.is_global_zero else ""
        if table:
            print(table, flush=True)

    def after_fit(self) -> None:
        """LightningCLI's hook after ``fit``: the probe summary."""
        self._print_probe_summary()

    def after_validate(self) -> None:
        """LightningCLI's hook after ``validate``: the probe summary."""
        self._print_probe_summary()

    def after_test(self) -> None:
        """LightningCLI's hook after ``test``: the probe summary."""
        self._print_probe_summary()

    def _parse_ckpt_path(self) -> None:
        """Before LightningCLI reads the hyperparameters of ``--ckpt_path``, check that the file is a readable
        checkpoint (:func:`~callbacks.checkpoint_io.check_checkpoint_file`): a truncated or foreign file is one
        clear error, not torch's advice to unpickle it unsafely."""
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path and Path(ckpt_path).is_file():
            check_checkpoint_file(ckpt_path)
        super()._parse_ckpt_path()

    @staticmethod
    def _name_run_after_config(config: Namespace) -> None:
        """A logger left at the default run name (:data:`DEFAULT_RUN_NAME`) is named after the last ``--config``
        file instead: :func:`run_name`. A name a config or the command line gives is kept."""
        logger = config.trainer.get("logger")
        args = logger.get("init_args") if isinstance(logger, Namespace) else None
        files = [f for f in config.get("config") or [] if f is not None]  # None: an inline YAML string
        if args is not None and args.get("name") == DEFAULT_RUN_NAME and files:
            args["name"] = run_name(files)

    @staticmethod
    def _claim_log_versions(config: Namespace) -> None:
        """Swap Lightning's ``TensorBoardLogger``/``CSVLogger`` for the subclasses that claim their ``version_N``
        folder atomically (:mod:`callbacks.loggers`), so two runs started together never share a folder."""
        logger = config.trainer.get("logger")
        for one in logger if isinstance(logger, list) else [logger]:
            if isinstance(one, Namespace) and str(one.get("class_path")) in VERSIONED_LOGGERS:
                one["class_path"] = VERSIONED_LOGGERS[str(one["class_path"])]

    def instantiate_classes(self) -> None:
        """Train the missing built-in checkpoints the model needs (:meth:`_train_missing_built_ins`), then build
        the classes: the explicit step happens when a run is about to use them, never when a config is only
        parsed."""
        self._train_missing_built_ins(self.config[self.subcommand] if self.subcommand else self.config)
        super().instantiate_classes()

    @staticmethod
    def _train_missing_built_ins(config: Namespace) -> None:
        """Train each built-in checkpoint (``checkpoints/minillm_teacher``, ...) that one of the model's arguments
        names and that is not there yet (:func:`~training.builtin_checkpoints.ensure_built_in`), in argument order,
        before the model is built: the modules only load them. ``export_dir`` is the run's output, not an input,
        and a MiniLLM ``teacher`` is not read under ``objective: sft``."""
        model_args = config.model.get("init_args") if isinstance(config.get("model"), Namespace) else None
        unused = {"export_dir"} | ({"teacher"} if (model_args or {}).get("objective") == "sft" else set())
        for key, value in vars(model_args or Namespace()).items():
            if key not in unused and isinstance(value, str):
                ensure_built_in(value)

    @staticmethod
    def _move_optimizer_into_model(config: Namespace) -> None:
        """Hand a top-level ``optimizer``/``lr_scheduler`` to a model that takes one (a
        :class:`~lit_modules.PaperModule`), replacing the model's own, so it is built once, by the model, on its
        parameter groups; LightningCLI then overrides nothing."""
        model_args = config.model.get("init_args") if isinstance(config.get("model"), Namespace) else None
        for key in ("optimizer", "lr_scheduler"):
            if config.get(key) is not None and model_args is not None and key in model_args:
                model_args[key], config[key] = config[key], None


def run_name(config_files: list) -> str:
    """The logger's run name for ``--config A --config B ...``: the last file's stem
    (``--config configs/minillm/base.yaml --config configs/minillm/kd.yaml`` -> ``kd``), so the logs of each
    config land in ``logs/<stem>/version_N`` without the name being repeated inside the file."""
    return Path(str(config_files[-1])).stem


def build_cli(args: list[str] | None = None, run: bool = True) -> LitPapersCLI:
    """Parse ``args`` (default: the command line) and, with ``run``, execute the subcommand; tests call this
    in-process and inspect ``.trainer``/``.model``/``.datamodule``. Given ``args`` are the whole command line:
    the process's own arguments (e.g. ``litpapers reproduce ...`` running configs) are hidden meanwhile, so
    LightningCLI does not warn that it got both."""
    argv = sys.argv
    if args is not None:
        sys.argv = sys.argv[:1]
    try:
        return LitPapersCLI(model_class=None, datamodule_class=None, subclass_mode_model=True,
                            subclass_mode_data=True, args=args, run=run)
    finally:
        sys.argv = argv


def user_error(error: BaseException) -> BaseException | None:
    """The error to show a user as one line, or ``None`` to keep the traceback.

    Walks ``error`` and the errors it was raised from (jsonargparse wraps a constructor's ``ValueError`` in its
    own "Does not validate against any of the Union subtypes") and returns the innermost one that this package's
    own code raised (its last frame is in :data:`PACKAGE_DIRS`) with a validation type (:data:`USER_ERROR_TYPES`).
    """
    chain: list[BaseException] = []
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
    for e in reversed(chain):
        frames = traceback.extract_tb(e.__traceback__)
        if isinstance(e, USER_ERROR_TYPES) and frames and frames[-1].filename.startswith(PACKAGE_DIRS):
            return e
    return None


def error_line(error: BaseException) -> str:
    """``error: <message>`` (a ``KeyError``'s message without the quotes ``str`` adds)."""
    message = error.args[0] if isinstance(error, KeyError) and len(error.args) == 1 else str(error)
    return f"error: {message}"


def main() -> None:
    """``litpapers fit|validate|test|predict --config FILE`` (``cli.main`` hands these here).

    Exits 130 after a Ctrl-C that saved a checkpoint; our own errors print one ``error: ...`` line last."""
    try:
        cli = build_cli()
    except Exception as e:
        shown = None if os.environ.get("LITPAPERS_DEBUG", "0") not in ("0", "") else user_error(e)
        if shown is None:
            raise
        print("(set LITPAPERS_DEBUG=1 to see the traceback)", file=sys.stderr)
        print(error_line(shown), file=sys.stderr, flush=True)
        sys.exit(1)
    trainer = getattr(cli, "trainer", None)
    log_dir = trainer.log_dir if trainer is not None else None  # a broadcast under DDP/FSDP: on every rank
    if log_dir is not None and trainer.is_global_zero:
        print(f"Logs, config and checkpoints: {log_dir}", flush=True)
    if trainer is not None and any(isinstance(c, LastCheckpoint) and c.interrupted_at is not None
                                   for c in trainer.callbacks):
        sys.exit(EXIT_INTERRUPTED)

