"""QDPO's generated preference pairs: deduplication (counted), disk caching keyed by models/quantization/
prompts/decoding (a rerun does not generate), generation through the module's one sampler (the same tokens HF
``generate`` decodes greedily: tests/lit_modules/test_generate_answers.py), clear errors."""

from types import SimpleNamespace

import pytest
import torch

import datamodules.qdpo_pairs as qdpo_pairs
from datamodules.qdpo_pairs import QDPOPairsDataModule, unique_prompt_records
from lit_modules import QDPO
from lm.quantization import QuantizerConfig
from lm.sampling import generate_answers
from tiny_models import TINY



def _attach(dm, module):
    dm.trainer = SimpleNamespace(lightning_module=module, strategy=SimpleNamespace(root_device=torch.device("cpu")))
    return dm


@pytest.fixture
def fake_generation(monkeypatch):
    """Replace generation: FP answers "a0", "a1", ...; the quantized model agrees on every third prompt."""
    calls = []

    def fake(model, tokenizer, prompts, **decoding):
        calls.append(model)
        fp = model is module.full_precision
        return [f"a{i}" if fp or i % 3 == 0 else f"q{i}" for i in range(len(prompts))]

    module = QDPO(model=TINY, group_size=16)
    module.configure_model()
    monkeypatch.setattr(qdpo_pairs, "generate_answers", fake)
    return module, calls


def test_identical_pairs_dropped_and_counted(fake_generation):
    module, calls = fake_generation
    dm = _attach(QDPOPairsDataModule(num_prompts=40, val_fraction=0.25), module)
    dm.setup("fit")
    n = len(dm.prompt_records())
    identical = len(range(0, n, 3))
    assert dm.num_dropped_identical == identical
    assert len(dm.pairs) == n - identical == len(dm.train_pairs) + len(dm.val_pairs)
    assert calls == [module.full_precision, module.policy]  # chosen from FP, rejected from the quantized model
    row = dm.pairs[0]["row"]
    assert row["chosen"] != row["rejected"] and row["chosen"].startswith("a") and "task" in row["example"]


def test_an_empty_generated_answer_is_a_pair_whose_response_is_eos_alone(monkeypatch):
    """A quantized model that ends at once (SmolLM2 at 3 bits did, on a free-form prompt) answered "": that pair is
    kept, its rejected response is EOS alone (in a user's file an empty answer stays an error:
    tests/datamodules/test_preference_data.py)."""
    module = QDPO(model=TINY, group_size=16)
    module.configure_model()
    monkeypatch.setattr(qdpo_pairs, "generate_answers", lambda model, tok, prompts, **kw: [
        "" if model is not module.full_precision and i == 0 else f"a{i}" for i in range(len(prompts))])
    dm = _attach(QDPOPairsDataModule(num_prompts=12, val_fraction=0.0), module)
    dm.setup("fit")
    (pair,) = [p for p in dm.pairs if p["row"]["rejected"] == ""]
    eos = module.tokenizer.eos_token_id
    assert pair["rejected_ids"] == [eos]
    assert pair["chosen_ids"] == module.tokenizer("a0", add_special_tokens=False)["input_ids"] + [eos]
    assert len(dm.pairs) == 1 and dm.num_dropped_identical == len(dm.prompt_records()) - 1


def test_cache_hit_does_not_regenerate_and_key_tracks_settings(fake_generation, tmp_path):
    module, calls = fake_generation
    first = _attach(QDPOPairsDataModule(num_prompts=30), module)
    first.records()
    first.setup("fit")
    assert len(calls) == 2 and first.cache_file.exists()

    again = _attach(QDPOPairsDataModule(num_prompts=30), module)
    again.records()
    again.setup("fit")
    assert len(calls) == 2  # read from disk
    assert again.cache_file == first.cache_file
    assert [p["chosen_ids"] for p in again.pairs] == [p["chosen_ids"] for p in first.pairs]

    _attach(QDPOPairsDataModule(num_prompts=30, max_new_tokens=8), module).records()  # decoding changed
    assert len(calls) == 4
    _attach(QDPOPairsDataModule(num_prompts=31), module).records()  # prompts changed
    assert len(calls) == 6
    module.quantizer, module._fingerprint = QuantizerConfig("rtn", 8, 16), None  # quantization changed
    _attach(QDPOPairsDataModule(num_prompts=30), module).records()
    assert len(calls) == 8


def test_prompt_deduplication_keeps_first():
    rows = [{"prompt": "x", "i": 0}, {"prompt": "y", "i": 1}, {"prompt": "x", "i": 2}]
    kept, removed = unique_prompt_records(rows)
    assert [r["i"] for r in kept] == [0, 1] and removed == 1


def test_needs_a_module_with_pair_models():
    dm = QDPOPairsDataModule(num_prompts=5)
    with pytest.raises(RuntimeError, match="pair_models"):
        dm.records()
    with pytest.raises(RuntimeError, match="pair_models"):
        _attach(QDPOPairsDataModule(num_prompts=5), torch.nn.Linear(2, 2)).records()


def test_prompt_file_errors_name_the_line(tmp_path, fake_generation):
    module, _ = fake_generation
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"instruction": "Say hi."}\n{"text": "no prompt"}\n')
    with pytest.raises(KeyError, match=r"prompts.jsonl:2.*neither 'instruction' nor 'prompt'"):
        _attach(QDPOPairsDataModule(path=str(path)), module).records()


def test_all_identical_answers_raise_a_clear_error(monkeypatch):
    module = QDPO(model=TINY, group_size=16)
    module.configure_model()
    monkeypatch.setattr(qdpo_pairs, "generate_answers", lambda model, tok, prompts, **decoding: ["same"] * len(prompts))
    with pytest.raises(ValueError, match="identical answers to all .* no preference pair"):
        _attach(QDPOPairsDataModule(num_prompts=10), module).records()


def test_pairs_and_eval_prompt_the_full_precision_model_in_its_own_format(tmp_path, monkeypatch):
    """The pipeline as `make qdpo` runs it: an SFT export trained with "Q: …\\nA: " is QDPO's full-precision model;
    the pair generator and QuantizationEval, given no template, must ask it in that format. The model here is an
    oracle that answers every built-in prompt correctly in its own format and with nonsense in any other, so its
    chosen answers pass the checker at its own eval's rate (1.0) only when the format is right (old code: 0.0)."""
    import callbacks.quantization_eval as quantization_eval
    from callbacks.quantization_eval import QuantizationEval
    from datamodules import InstructionDataModule
    from datamodules.instruction_tasks import check_answer, generate_examples
    from lit_modules import CausalLM

    sft = CausalLM(model=TINY)
    sft.configure_model()
    data = InstructionDataModule(template="Q: {instruction}\nA: ", num_examples=8, num_val=2)
    data.trainer = SimpleNamespace(lightning_module=sft)
    data.setup("fit")  # what `litpapers fit --config configs/minillm/teacher_sft.yaml` does before training
    sft.export(tmp_path / "teacher")

    known = {ex["instruction"]: ex for seed in (1, 12345) for ex in generate_examples(60, seed=seed)}

    def oracle(model, tokenizer, prompts, *args, **kwargs):
        answers = []
        for p in prompts:
            ex = known.get(p[len("Q: "):-len("\nA: ")]) if p.startswith("Q: ") and p.endswith("\nA: ") else None
            good = ex is not None and model is module.full_precision
            answers.append(ex["references"][0] if good else "cdcdcdcd")
        return answers

    module = QDPO(model=str(tmp_path / "teacher"), group_size=16)
    module.configure_model()
    monkeypatch.setattr(qdpo_pairs, "generate_answers", oracle)
    monkeypatch.setattr(quantization_eval, "generate_answers", oracle)
    dm = _attach(QDPOPairsDataModule(num_prompts=60, prompt_seed=1, val_fraction=0.0), module)
    dm.setup("fit")
    own_eval = [check_answer(ex, oracle(module.full_precision, None, [f"Q: {ex['instruction']}\nA: "])[0])
                for ex in generate_examples(60, seed=1)]
    chosen = [check_answer(p["row"]["example"], p["row"]["chosen"]) for p in dm.pairs]
    assert sum(own_eval) / len(own_eval) == 1.0
    assert sum(chosen) / len(chosen) == 1.0 and len(chosen) == len(dm.prompt_records())

    evaluation = QuantizationEval(num_prompts=30, max_new_tokens=4, exclude_training_prompts=False)
    evaluation._prepare(SimpleNamespace(datamodule=None), module)
    assert all(check_answer(r, a) for r, a in zip(evaluation.records, evaluation.fp_answers))


@pytest.mark.slow
def test_builtin_teacher_pairs_pass_the_checker_at_its_own_eval_rate(root):
    """With the real built-in checkpoint (the repository's when trained, else trained here first: minutes): the
    pair generator's greedy FP answers on held-out built-in prompts pass the checker at the rate of the model's own
    eval in its training format (configs/minillm/teacher_sft.yaml's "Q: …\nA: "), not at ~0."""
    from datamodules.instruction_tasks import check_answer
    from lit_modules.builtin_checkpoints import is_finished_export
    from training.builtin_checkpoints import ensure_built_in

    teacher = root / "checkpoints/minillm_teacher"
    if not is_finished_export(teacher):
        teacher = "checkpoints/minillm_teacher"
        ensure_built_in(teacher)
    module = QDPO(model=str(teacher))
    module.configure_model()
    dm = _attach(QDPOPairsDataModule(num_prompts=300, prompt_seed=12345, max_new_tokens=16, val_fraction=0.0), module)
    rows = dm.records()
    examples = [r["example"] for r in rows]
    own = generate_answers(module.full_precision, module.tokenizer, [f"Q: {ex['instruction']}\nA: " for ex in examples],
                           max_new_tokens=16)
    own_rate = sum(check_answer(ex, a) for ex, a in zip(examples, own)) / len(examples)
    pairs_rate = sum(check_answer(r["example"], r["chosen"]) for r in rows) / len(rows)
    assert own_rate > 0.3 and abs(pairs_rate - own_rate) < 0.05
