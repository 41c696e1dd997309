"""GenerationEval: the valid-answer rate is the fraction of answers the task's checker accepts, over every
validation batch (not the mean of per-batch rates); no teacher, no exposure bias; bad arguments are clear errors."""

import lightning as L
import pytest
import torch

from callbacks import GenerationEval
from datamodules import InstructionDataModule


class _Answers(L.LightningModule):
    """Answers the i-th validation example (over all batches) with its reference when ``right(i)``, else ``"?"``."""

    def __init__(self, right):
        super().__init__()
        self.right, self.seen, self.teacher = right, 0, None
        self.w = torch.nn.Parameter(torch.zeros(1))

    def validation_step(self, batch, batch_idx):
        texts = []
        for ex in batch["examples"]:
            texts.append(ex["response"] if self.right(self.seen) else "?")
            self.seen += 1
        return {"texts": texts, "rollout": None, "temperature": 1.0, "max_new_tokens": 4}


def test_valid_rate_is_the_checked_fraction_over_all_batches():
    # 10 examples in batches of 4, 4, 2; right answers at i = 0, 1, 2 and 8: 4/10 (per-batch means would give
    # (3/4 + 0 + 1/2)/3 = 5/12)
    data = InstructionDataModule(num_examples=40, num_val=10, batch_size=4, max_response_length=64)
    module = _Answers(lambda i: i in (0, 1, 2, 8))
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[GenerationEval()])
    out = trainer.validate(module, data, verbose=False)[0]
    assert out["val/valid_rate"] == pytest.approx(0.4)
    assert "val/ex_acc_err" not in out  # no teacher


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="exposure_bias_batches"):
        GenerationEval(exposure_bias_batches=0)
    with pytest.raises(ValueError, match="exposure_bias_length"):
        GenerationEval(exposure_bias_length=0)
