"""The built-in checkpoints on the module floor: a module given a built-in default path that holds no finished
export raises one clear error naming the step that makes it, and trains nothing (training them is the training
floor's explicit step: tests/training/test_builtin_checkpoints.py); exports are written atomically."""

from pathlib import Path

import pytest
import torch

from lit_modules import QDPO, MiniLLM
from lit_modules.builtin_checkpoints import is_finished_export
from lm.hf import load_causal_lm, save_pretrained_with_tokenizer
from lm.tokenizers import byte_tokenizer
from tiny_models import TINY


def test_minillm_with_missing_default_paths_names_the_step_and_trains_nothing():
    with pytest.raises(FileNotFoundError, match=r"checkpoints/minillm_student_sft .*`litpapers fit --config "
                                                r"configs/minillm/sft.yaml` \(or `make minillm`\)"):
        MiniLLM(student="checkpoints/minillm_student_sft", teacher="checkpoints/minillm_teacher")
    with pytest.raises(FileNotFoundError, match="litpapers fit --config configs/minillm/teacher_sft.yaml"):
        MiniLLM(student=TINY, teacher="checkpoints/minillm_teacher", objective="kd")
    assert not Path("checkpoints").exists()  # nothing was trained or started


def test_an_unfinished_export_is_missing_too():
    partial = Path("checkpoints/minillm_teacher")
    partial.mkdir(parents=True)
    (partial / "config.json").write_text("{}")  # an interrupted save: config but no weights
    assert not is_finished_export(partial)
    with pytest.raises(FileNotFoundError, match="litpapers fit --config configs/minillm/teacher_sft.yaml"):
        MiniLLM(student=TINY, teacher="checkpoints/minillm_teacher", objective="kd")


def test_qdpo_with_the_missing_default_fp_model_names_the_step_before_reading_its_tokenizer():
    with pytest.raises(FileNotFoundError, match="litpapers fit --config configs/minillm/teacher_sft.yaml"):
        QDPO(model="checkpoints/minillm_teacher", group_size=16)
    assert not Path("checkpoints").exists()


def test_a_finished_default_export_is_loaded_as_it_is():
    save_pretrained_with_tokenizer(load_causal_lm(TINY, vocab_size=259, seed=0), byte_tokenizer(),
                                   "checkpoints/minillm_teacher")
    module = MiniLLM(student=TINY, teacher="checkpoints/minillm_teacher", objective="kd")
    module.configure_model()
    module.configure_model()
    for k, v in load_causal_lm("checkpoints/minillm_teacher").state_dict().items():
        assert torch.equal(module.teacher.state_dict()[k], v)


def test_export_is_atomic_and_replaces_an_older_one(tmp_path):
    target = tmp_path / "model"
    save_pretrained_with_tokenizer(load_causal_lm(TINY, vocab_size=259, seed=0), byte_tokenizer(), target)
    newer = load_causal_lm(TINY, vocab_size=259, seed=1)
    save_pretrained_with_tokenizer(newer, byte_tokenizer(), target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no .partial / .old left behind
    for k, v in newer.state_dict().items():
        assert torch.equal(load_causal_lm(str(target)).state_dict()[k], v)
