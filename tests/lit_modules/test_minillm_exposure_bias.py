"""MiniLLM's exposure-bias measurement (paper §3.3, App. B.5): per-step KL(p ‖ q), ExAccErr, the sampling helper
and its validation log through ``callbacks.GenerationEval``, against independent math."""

import math
from types import SimpleNamespace

import lightning as L
import pytest
import torch

import callbacks.generation_eval as generation_eval
from callbacks.generation_eval import (GenerationEval, excess_accumulated_error, measure_exposure_bias,
                                       per_step_forward_kl)
from datamodules import InstructionDataModule
from lit_modules.minillm import MiniLLM
from lm.hf import load_causal_lm
from lm.sampling import response_logits, sample_mixed
from tiny_models import TINY



def _exacc_by_loops(kl_s, m_s, kl_t, m_t, alive_mean=True):
    """ExAccErr(l) for l = 1..T with Python loops over (list) rows: R(l) = Σ_t mean_i e_it, l·ε(l) likewise."""
    T = max(len(kl_s[0]), len(kl_t[0]))

    def accumulated(kl, m):
        out, run = [], 0.0
        for t in range(T):
            alive = [kl[i][t] for i in range(len(kl)) if t < len(kl[i]) and m[i][t]]
            denom = len(alive) if alive_mean else len(kl)
            run += sum(alive) / denom if alive else 0.0
            out.append(run)
        return out

    return [(r - le) / le * 100 for r, le in zip(accumulated(kl_s, m_s), accumulated(kl_t, m_t))]


# ------------------------------------------------------------------------------------------- per-step error
def test_identical_student_and_teacher_have_zero_error_everywhere():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11) * 3
    assert torch.allclose(per_step_forward_kl(logits, logits.clone()), torch.zeros(3, 5), atol=1e-6)
    lm = load_causal_lm(TINY, vocab_size=12, seed=1).eval()
    prompt = torch.tensor([[0, 4, 5], [6, 7, 8]])
    eb = measure_exposure_bias(lm, lm, prompt, (prompt != 0).long(), 6, eos_id=1, pad_id=0,
                               generator=torch.Generator().manual_seed(0))
    assert eb.kl_student_prefixes.abs().max() < 1e-5 and eb.kl_teacher_prefixes.abs().max() < 1e-5
    assert torch.isnan(eb.curve).all()  # 0/0: ExAccErr is undefined without any error


def test_per_step_error_is_forward_kl_of_teacher_to_student_by_hand():
    # p = (1/4, 3/4), q = (1/2, 1/2) at position 0; p = q = (e/(1+e), 1/(1+e)) at position 1
    teacher = torch.tensor([[[0.0, math.log(3.0)], [1.0, 0.0]]])
    student = torch.tensor([[[0.0, 0.0], [1.0, 0.0]]])
    kl = per_step_forward_kl(teacher, student)
    expected = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    reverse = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert kl.shape == (1, 2)
    assert kl[0, 0].item() == pytest.approx(expected, abs=1e-6) and abs(expected - reverse) > 0.01
    assert kl[0, 1].item() == pytest.approx(0.0, abs=1e-7)
    assert per_step_forward_kl(teacher, student, torch.tensor([[0, 1]])).tolist() == [[0.0, pytest.approx(0.0)]]


# ----------------------------------------------------------------------------------------------- ExAccErr
def test_constant_oracle_error_and_linearly_growing_student_error():
    # teacher prefixes: e_t = ε = 0.5 → l·ε(l) = 0.5·l;  student prefixes: e_t = 0.5·t → R(l) = 0.5·l(l+1)/2
    # ExAccErr(l) = ((l+1)/2 − 1)·100 = 50·(l − 1)
    kl_t = torch.full((3, 4), 0.5)
    kl_s = torch.tensor([[0.5, 1.0, 1.5, 2.0]]).expand(2, 4)
    ones = torch.ones(3, 4)
    curve = excess_accumulated_error(kl_s, ones[:2], kl_t, ones)
    assert curve.tolist() == pytest.approx([0.0, 50.0, 100.0, 150.0])
    assert excess_accumulated_error(kl_t, ones, kl_t, ones).tolist() == pytest.approx([0.0] * 4)


def test_steps_after_eos_are_ignored():
    # student rows: A alive 4 steps (e = 1), B ended after 2 (e = 3, then garbage where its mask is 0)
    kl_s = torch.tensor([[1.0, 1.0, 1.0, 1.0], [3.0, 3.0, 999.0, -999.0]])
    m_s = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    kl_t, m_t = torch.ones(2, 4), torch.ones(2, 4, dtype=torch.long)
    # mean over the rows alive at t: (2, 2, 1, 1) → R = (2, 4, 5, 6); l·ε = (1, 2, 3, 4)
    assert excess_accumulated_error(kl_s, m_s, kl_t, m_t).tolist() == pytest.approx([100, 100, 200 / 3, 50])
    # reference-code convention, ended rows count 0 over all rows: (2, 2, .5, .5) → R = (2, 4, 4.5, 5)
    assert excess_accumulated_error(kl_s, m_s, kl_t, m_t, alive_mean=False).tolist() == pytest.approx(
        [100, 100, 50, 25])
    # a step at which no teacher row is alive adds nothing; sets of different lengths are padded with mask 0
    kl_t2, m_t2 = torch.tensor([[1.0, 7.0]]), torch.tensor([[1, 0]])
    got = excess_accumulated_error(kl_s, m_s, kl_t2, m_t2)
    assert got.shape == (4,) and got.tolist() == pytest.approx([100, 300, 400, 500])
    assert got.tolist() == pytest.approx(_exacc_by_loops(kl_s.tolist(), m_s.tolist(), kl_t2.tolist(),
                                                         m_t2.tolist()))


def test_matches_loops_on_random_ragged_batches():
    g = torch.Generator().manual_seed(3)
    kl_s, kl_t = torch.rand(5, 7, generator=g), torch.rand(4, 6, generator=g)
    ends_s, ends_t = torch.tensor([7, 1, 3, 7, 5]), torch.tensor([2, 6, 4, 1])
    m_s = (torch.arange(7) < ends_s[:, None]).long()
    m_t = (torch.arange(6) < ends_t[:, None]).long()
    for alive_mean in (True, False):
        got = excess_accumulated_error(kl_s, m_s, kl_t, m_t, alive_mean)
        want = _exacc_by_loops(kl_s.tolist(), m_s.tolist(), kl_t.tolist(), m_t.tolist(), alive_mean)
        assert got.tolist() == pytest.approx(want, rel=1e-5)


# ------------------------------------------------------------------------------------------ sampling helper
class ContextFree(torch.nn.Module):
    """A fake LM with the same next-token distribution ``probs`` after any context."""

    def __init__(self, probs: list[float]):
        super().__init__()
        self.logits = torch.tensor(probs).log()

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False,
                logits_to_keep=0):
        return SimpleNamespace(logits=self.logits.expand(*input_ids.shape, -1), past_key_values=0)


def test_context_free_models_have_no_exposure_bias():
    """e_t is the same constant on every prefix, so R(l) = l·ε(l): ExAccErr ≡ 0 (alive mean), even though the
    student (EOS w.p. 0.3) and the teacher (EOS w.p. 0.05) stop at different times. With the reference code's
    zero-after-EOS convention, ExAccErr(l) is instead the ratio of summed survival counts minus one."""
    student, teacher = ContextFree([0.05, 0.3, 0.35, 0.3]), ContextFree([0.05, 0.05, 0.1, 0.8])
    prompt = torch.full((64, 2), 3)
    for alive_mean in (True, False):
        eb = measure_exposure_bias(student, teacher, prompt, torch.ones_like(prompt), 10, eos_id=1, pad_id=0,
                                   generator=torch.Generator().manual_seed(0), alive_mean=alive_mean)
        assert eb.mask_student.sum() < eb.mask_teacher.sum()  # the student's answers end sooner
        if alive_mean:
            assert eb.curve.tolist() == pytest.approx([0.0] * 10, abs=1e-4)
        else:
            survival = eb.mask_student.sum(0).cumsum(0) / eb.mask_teacher.sum(0).cumsum(0)
            assert eb.curve.tolist() == pytest.approx(((survival - 1) * 100).tolist(), abs=1e-3)
    # each set is its own model's sample: token 3 has probability 0.3 under the student, 0.8 under the teacher
    assert (eb.student_rollout.response_ids[eb.mask_student.bool()] == 3).float().mean() < 0.5
    assert (eb.teacher_rollout.response_ids[eb.mask_teacher.bool()] == 3).float().mean() > 0.7


def test_helper_on_tiny_llamas_equals_the_direct_computation_from_its_samples():
    student = load_causal_lm(TINY, vocab_size=12, seed=1).eval()
    teacher = load_causal_lm(TINY | {"hidden_size": 48, "num_hidden_layers": 2}, vocab_size=12, seed=2).eval()
    prompt = torch.tensor([[0, 0, 4, 5], [6, 7, 8, 9], [0, 3, 3, 3], [0, 0, 0, 2]])
    mask = (prompt != 0).long()
    eb = measure_exposure_bias(student, teacher, prompt, mask, 9, eos_id=1, pad_id=0,
                               generator=torch.Generator().manual_seed(0))
    assert eb.curve.shape == (9,) and torch.isfinite(eb.curve).all()
    assert eb.curve[0].item() == pytest.approx(0.0, abs=1e-4)  # t = 1: both sets condition on the prompts alone
    direct = {}
    for name, r in (("s", eb.student_rollout), ("t", eb.teacher_rollout)):
        # each model scores each rollout separately (not stacked), KL by the textbook formula
        with torch.no_grad():
            logp = torch.log_softmax(response_logits(teacher, r).double(), -1)
            logq = torch.log_softmax(response_logits(student, r).double(), -1)
        kl = (logp.exp() * (logp - logq)).sum(-1)
        m = r.response_mask
        ours = eb.kl_student_prefixes if name == "s" else eb.kl_teacher_prefixes
        assert torch.allclose(ours[:, :kl.shape[1]], (kl * m).float(), atol=1e-5)
        assert not ours[:, kl.shape[1]:].any()  # padding after the rollout stopped
        direct[name] = (kl.tolist(), m.tolist())
    want = _exacc_by_loops(*direct["s"], *direct["t"])
    want += [want[-1]] * (9 - len(want))  # after every sequence ended the curve stays flat
    assert eb.curve.tolist() == pytest.approx(want, rel=1e-4, abs=1e-4)
    # the student rollout is the student's (α = 0) and the teacher rollout the teacher's (α = 1) sample
    again = measure_exposure_bias(student, teacher, prompt, mask, 9, eos_id=1, pad_id=0,
                                  generator=torch.Generator().manual_seed(0), student_rollout=eb.student_rollout)
    assert torch.equal(again.kl_student_prefixes, eb.kl_student_prefixes)
    g = torch.Generator().manual_seed(0)
    s = sample_mixed(student, None, prompt, mask, 9, 0.0, 1, 0, 1.0, g)
    t = sample_mixed(student, teacher, prompt, mask, 9, 1.0, 1, 0, 1.0, g)
    assert torch.equal(s.response_ids, eb.student_rollout.response_ids)
    assert torch.equal(t.response_ids, eb.teacher_rollout.response_ids)


# ------------------------------------------------------------------------------------------------ validation
def _validate(module: MiniLLM, batches: int = 2, **eval_kw) -> dict:
    data = InstructionDataModule(num_examples=40, num_val=8, batch_size=4, max_response_length=6)
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=batches, callbacks=[GenerationEval(**eval_kw)])
    return trainer.validate(module, data, verbose=False)[0]


def test_validation_logs_ex_acc_err_on_the_first_batch_only_and_can_be_switched_off(monkeypatch):
    calls = []
    real = generation_eval.measure_exposure_bias
    monkeypatch.setattr(generation_eval, "measure_exposure_bias", lambda *a, **k: calls.append(1) or real(*a, **k))
    kw = dict(student=TINY, teacher=TINY | {"hidden_size": 48}, objective="kd", max_new_tokens=6)
    on = _validate(MiniLLM(**kw))
    assert len(calls) == 1 and math.isfinite(on["val/ex_acc_err"])
    off = _validate(MiniLLM(**kw), exposure_bias=False)
    assert len(calls) == 1 and "val/ex_acc_err" not in off
    # the measurement does not perturb the other validation metrics (it samples after them)
    assert on["val/rougeL"] == off["val/rougeL"] and on["val/response_length"] == off["val/response_length"]
    assert "val/ex_acc_err" not in _validate(MiniLLM(student=TINY, teacher=None, objective="sft", max_new_tokens=6))
    assert len(calls) == 1


def test_logged_value_is_the_helper_curve_at_the_eval_length():
    module = MiniLLM(student=TINY, teacher=TINY | {"hidden_size": 48}, objective="kd", max_new_tokens=6,
                     eval_max_new_tokens=5, eval_temperature=0.5)
    logged = _validate(module, batches=1)["val/ex_acc_err"]
    data = InstructionDataModule(num_examples=40, num_val=8, batch_size=4, max_response_length=6)
    data.setup("validate")
    batch = next(iter(data.val_dataloader()))
    module.eval()
    gen = torch.Generator().manual_seed(0)  # GenerationEval's generator: seed 0 + batch index 0
    curve = measure_exposure_bias(module.model, module.teacher, batch["prompt_input_ids"],
                                  batch["prompt_attention_mask"], 5, module.tokenizer.eos_token_id, module.pad_id,
                                  gen).curve  # the Rouge-L sample (temperature 0.5) is not reused
    assert curve.shape == (5,) and logged == pytest.approx(curve[-1].item(), rel=1e-5)

