"""A quiet console for every ``litpapers`` command: :func:`quiet_console` drops the start-up noise of third-party
libraries that is not about the run. Light on purpose (no torch/Lightning import): ``cli.main`` installs it first."""

from __future__ import annotations

import logging
import os
import re
import warnings

# Drop the start-up noise of third-party libraries that is not about the run; each filter matches one known
# message, so every other warning still shows:
# - ``transformers`` imports ``torchao`` whenever it is installed (to register its quantizer, also when no model
#   is quantized), and torchao then logs ``Failed to load <kernel>.so`` for its optional CUDA/other-ABI kernels and
#   torch logs that torchao's ``register_constant`` on Enum classes is deprecated. This package itself imports
#   torchao only inside the QDPO functions that quantize (``lm/quantization.py``, ``lit_modules/qdpo.py``).
# - Lightning 2.6 calls ``isinstance(treespec, LeafSpec)``, which torch 2.13 deprecates (a ``FutureWarning``).
# - Lightning's "Tip: ... try installing litlogger/litmodels" advertisements.
# - Lightning's "Found N module(s) in eval mode at the start of training" (a ``PossibleUserWarning``): this package's
#   modules keep their frozen networks (DPO's reference, MiniLLM's teacher, QDPO's full-precision yardstick) in eval
#   mode on purpose.
# - Lightning's start/stop chatter that says nothing about the run on a CPU/GPU machine: "GPU available: …",
#   "TPU available: …", "Seed set to N" (the config shows the seed), "`Trainer.fit` stopped: `max_steps=N` reached."
#   (the bar shows it), "Loading `train_dataloader` to estimate number of stepping batches." Other messages of the
#   same loggers (e.g. "`Trainer.fit` stopped: No training batches.") still show.
# - transformers' "Loading weights" / "Writing model shards" bars for local files (``HF_HUB_DISABLE_PROGRESS_BARS``,
#   set unless the user set it; nothing is downloaded at run time).

#: logger name -> pattern of the messages dropped from it.
DROPPED_LOG_MESSAGES = {
    "torchao": r"Failed to load .*\.so",
    "torch.utils._pytree": r".* is an Enum subclass and is now natively supported by torch\.compile",
    "lightning.pytorch.utilities.rank_zero": (r"💡 Tip: |GPU available: |TPU available: |`Trainer\.fit` stopped: "
                                              r"`max_(steps|epochs)=\d+` reached\.|Loading `train_dataloader` to "
                                              r"estimate number of stepping batches"),
    "lightning.fabric.utilities.seed": r"Seed set to \d+",
}
#: warning message patterns ignored (``warnings.filterwarnings``), with their category.
IGNORED_WARNINGS = ((r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning),
                    (r"Found \d+ module\(s\) in eval mode at the start of training", UserWarning))


class _DropMatching(logging.Filter):
    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return self.pattern.match(record.getMessage()) is None


def quiet_console() -> None:
    """Install the filters above (idempotent). Call before importing ``transformers``."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # no fork warning from HF tokenizers
    for name, pattern in DROPPED_LOG_MESSAGES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMatching) and f.pattern.pattern == pattern for f in logger.filters):
            logger.addFilter(_DropMatching(pattern))
    for message, category in IGNORED_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
