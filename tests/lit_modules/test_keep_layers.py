"""A student made of a subset of its teacher's layers (``keep_layers``, MiniLLM ``student_layers``).

Independent reference: in a pre-norm residual stack, a decoder layer whose two output projections (attention
``o_proj``, MLP ``down_proj``) are zero adds nothing to the residual stream, i.e. is the identity. So a model that
keeps layers [0, 2] of four must compute exactly what the four-layer model computes with layers 1 and 3 zeroed —
logits, and greedy generation through the KV cache (which the kept layers address by their new indices).
"""

import copy

import lightning as L
import pytest
import torch

from lit_modules import MiniLLM
from lm.hf import keep_layers, load_causal_lm, save_pretrained_with_tokenizer
from lm.tokenizers import load_tokenizer

FOUR = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4, "num_attention_heads": 2,
        "num_key_value_heads": 2}


def _four_layer_model(seed: int = 0):
    model = load_causal_lm(FOUR, vocab_size=259, seed=seed).eval()
    with torch.no_grad():  # a non-trivial final norm, so a wrong layer order could not hide behind it
        model.model.norm.weight.uniform_(0.5, 1.5)
    return model


def _with_layers_zeroed(model, dropped: list[int]):
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for i in dropped:
            ref.model.layers[i].self_attn.o_proj.weight.zero_()
            ref.model.layers[i].mlp.down_proj.weight.zero_()
    return ref


def test_kept_layers_compute_what_the_full_model_computes_with_the_others_made_identity():
    model = _four_layer_model()
    ref = _with_layers_zeroed(model, [1, 3])
    student = keep_layers(copy.deepcopy(model), [0, 2])
    assert student.config.num_hidden_layers == 2 and len(student.model.layers) == 2
    ids = torch.randint(3, 259, (3, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(student(ids).logits, ref(ids).logits, atol=1e-5, rtol=1e-5)
        # and it is not the full model: the dropped layers did change the output
        assert (model(ids).logits - ref(ids).logits).abs().max() > 1e-3
        # generation with a KV cache: the kept layers write their cache under their new indices 0 and 1
        kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
        assert torch.equal(student.generate(ids, **kw), ref.generate(ids, **kw))


def test_a_kept_layer_subset_round_trips_through_save_pretrained(tmp_path):
    student = keep_layers(_four_layer_model(), [1, 2, 3])
    path = save_pretrained_with_tokenizer(student, load_tokenizer(None, None), tmp_path / "student")
    again = load_causal_lm(str(path)).eval()
    assert again.config.num_hidden_layers == 3
    ids = torch.randint(3, 259, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, student(ids).logits)


@pytest.mark.parametrize("layers", [[], [2, 1], [0, 0], [0, 4], [-1, 2]])
def test_bad_layer_lists_are_one_clear_error(layers):
    with pytest.raises(ValueError, match=r"student_layers: expected a non-empty, strictly increasing list .* "
                                         r"\[0, 3\] \(the model has 4 layers\)"):
        keep_layers(_four_layer_model(), layers, "student_layers")


def test_minillm_student_from_a_subset_of_the_teacher_layers(tmp_path):
    teacher = _four_layer_model(seed=3)
    teacher_dir = str(save_pretrained_with_tokenizer(teacher, load_tokenizer(None, None), tmp_path / "teacher"))
    with pytest.raises(ValueError, match="model.init_args.student_layers: .* got \\[0, 9\\]"):
        MiniLLM(student=teacher_dir, teacher=teacher_dir, objective="kd", student_layers=[0, 9])
    with pytest.raises(ValueError, match="model.init_args.student_layers"):  # checked without a teacher too
        MiniLLM(student=teacher_dir, teacher=None, objective="sft", student_layers=[5])
    module = MiniLLM(student=teacher_dir, teacher=teacher_dir, objective="kd", student_layers=[1, 3], lr=1e-3,
                     export_dir=str(tmp_path / "export"))
    module.configure_model()
    assert len(module.model.model.layers) == 2 and len(module.teacher.model.layers) == 4
    for mine, theirs in zip(module.model.model.layers, [teacher.model.layers[1], teacher.model.layers[3]]):
        for (name, a), b in zip(mine.named_parameters(), theirs.parameters()):
            assert torch.equal(a, b), name
    from datamodules import InstructionDataModule

    data = InstructionDataModule(num_examples=40, num_val=8, batch_size=4, max_response_length=8, seed=0,
                                 template="Q: {instruction}\nA: ")
    L.Trainer(max_steps=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
              enable_checkpointing=False, limit_val_batches=0, num_sanity_val_steps=0).fit(module, data)
    exported = load_causal_lm(str(tmp_path / "export"))
    assert exported.config.num_hidden_layers == 2
    assert torch.equal(exported.model.layers[1].mlp.up_proj.weight, module.model.model.layers[1].mlp.up_proj.weight)
