"""Resume reproduces the uninterrupted run, for every module: N steps in one run vs the same run's step-N/2
checkpoint resumed to N in a fresh run (what a SIGKILL right after that save leaves; one test kills a real
process). Final weights must be equal (tolerance 0 on CPU: same ops in the same order).

What makes it exact: the checkpoint holds the position within the epoch (``ResumableDataLoader``) and the
torch/numpy/python random states (``callbacks.ExactResume``), besides Lightning's own optimizer, scheduler and
loop state.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import cli

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
COMMON = ["--trainer.enable_progress_bar", "false", "--trainer.logger", "false", "--trainer.limit_val_batches", "1"]
TINY_LM = ("{model_type: llama, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 2,"
           " num_key_value_heads: 2}")


def _checkpoints(every: int, folder: str) -> list[str]:
    spec = {"class_path": "callbacks.LastCheckpoint",
            "init_args": {"every_n_train_steps": every, "save_top_k": -1, "filename": "{step}", "dirpath": folder}}
    return ["--trainer.callbacks+", json.dumps(spec)]


def assert_resume_is_exact(args: list[str], steps: int) -> None:
    """Run ``steps`` steps; resume its step-``steps/2`` checkpoint to ``steps`` in a new run; compare weights."""
    half = steps // 2
    args = ["fit", *args, *COMMON, "--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(half)]
    full = cli.build_cli([*args, *_checkpoints(half, "full")])
    assert full.trainer.global_step == steps
    resumed = cli.build_cli([*args, *_checkpoints(half, "resumed"), "--ckpt_path", f"full/step={half}.ckpt"])
    assert resumed.trainer.global_step == steps
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    moved = False
    start = torch.load(f"full/step={half}.ckpt", weights_only=False)["state_dict"]
    for name, value in a.items():
        torch.testing.assert_close(b[name], value, rtol=0, atol=0, msg=name)
        moved |= name in start and not torch.equal(start[name], value)
    assert moved, "the second half must train something"


def test_causal_lm_with_ademamix_resumes_exactly():
    assert_resume_is_exact(["--config", str(CONFIGS / "ademamix" / "quick.yaml"),
                            "--model.init_args.model", TINY_LM, "--data.init_args.max_documents", "40",
                            "--data.init_args.block_size", "32", "--data.init_args.batch_size", "4"], steps=8)


def test_dpo_resumes_exactly():
    assert_resume_is_exact(["--config", str(CONFIGS / "dpo" / "dpo.yaml"), "--model.init_args.model", TINY_LM,
                            "--data.init_args.num_examples", "64", "--data.init_args.batch_size", "4"], steps=6)


def test_dpo_with_precomputed_reference_resumes_exactly_and_ignores_the_cache_state():
    args = ["--config", str(CONFIGS / "dpo" / "dpo.yaml"), "--model.init_args.model", TINY_LM,
            "--model.init_args.precompute_ref_logps", "true", "--model.init_args.ref_cache_dir", "ref_cache",
            "--data.init_args.num_examples", "64", "--data.init_args.batch_size", "4"]
    assert_resume_is_exact(args, steps=6)  # the first run computes the table, the resumed one has it saved
    assert len(list(Path("ref_cache").glob("*.pt"))) == 1
    fresh = ["fit", *args, *COMMON, "--trainer.max_steps", "3", "--trainer.enable_checkpointing", "false"]
    cached = cli.build_cli(fresh).model.state_dict()  # table loaded from the cache
    for f in Path("ref_cache").glob("*.pt"):
        f.unlink()
    computed = cli.build_cli(fresh).model.state_dict()  # table computed again
    for name, value in cached.items():
        torch.testing.assert_close(computed[name], value, rtol=0, atol=0, msg=name)


RADT_TINY = ["--model.init_args.embed_dim", "32", "--model.init_args.n_layers", "1", "--model.init_args.n_heads", "2",
             "--data.init_args.batch_size", "8", "--data.init_args.generate_episodes", "6",
             "--data.init_args.generate_max_steps", "25", "--data.init_args.generate_num_envs", "3",
             "--trainer.callbacks", "[]", "--trainer.limit_val_batches", "0"]


@pytest.mark.parametrize("config", ["halfcheetah.yaml", "dt_halfcheetah.yaml"], ids=["RADT", "DT"])
def test_return_conditioned_transformers_resume_exactly(config):
    assert_resume_is_exact(["--config", str(CONFIGS / "radt" / config), *RADT_TINY], steps=6)


@pytest.mark.parametrize("steps", [8, 6], ids=["at_a_rollout_boundary", "mid_rollout"])
def test_minillm_resumes_exactly(steps):
    # 4 PPO optimizer steps per rollout batch: a step-3 checkpoint is in the middle of one
    assert_resume_is_exact(["--config", str(CONFIGS / "minillm" / "base.yaml"), "--model.init_args.student", TINY_LM,
                            "--model.init_args.teacher", TINY_LM.replace("hidden_size: 32", "hidden_size: 48"),
                            "--model.init_args.max_new_tokens", "4", "--data.init_args.num_examples", "64",
                            "--data.init_args.num_val", "4", "--data.init_args.batch_size", "4",
                            "--data.init_args.pretrain_block_size", "16", "--trainer.callbacks", "[]"], steps=steps)


def test_qdpo_resumes_exactly():
    from lm.hf import load_causal_lm, save_pretrained_with_tokenizer
    from lm.tokenizers import byte_tokenizer

    tokenizer = byte_tokenizer()
    save_pretrained_with_tokenizer(load_causal_lm({}, vocab_size=len(tokenizer), seed=0), tokenizer, "fp")
    assert_resume_is_exact(["--config", str(CONFIGS / "qdpo" / "int4.yaml"), "--model.init_args.model", "fp",
                            "--model.init_args.export_dir", "exported", "--data.init_args.num_prompts", "40",
                            "--data.init_args.max_new_tokens", "6", "--data.init_args.batch_size", "4",
                            "--trainer.callbacks", "[]", "--trainer.max_epochs", "3"], steps=6)  # 4 batches an epoch


def test_a_sigkilled_run_resumes_to_the_uninterrupted_result():
    steps, save_at = 40, 6
    args = ["fit", "--config", str(CONFIGS / "ademamix" / "quick.yaml"), "--model.init_args.model", TINY_LM,
            "--data.init_args.max_documents", "40", "--data.init_args.block_size", "32",
            "--data.init_args.batch_size", "4", *COMMON, "--trainer.max_steps", str(steps),
            "--trainer.val_check_interval", str(save_at)]
    killed = subprocess.Popen([sys.executable, "-m", "cli", *args, *_checkpoints(save_at, "killed")],
                              env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        saved, size, deadline = Path(f"killed/step={save_at}.ckpt"), -1, time.time() + 180
        while time.time() < deadline and not (saved.exists() and saved.stat().st_size == size > 0):
            size = saved.stat().st_size if saved.exists() else -1
            time.sleep(0.5)  # written completely: the same size twice in a row
        assert killed.poll() is None, "the run finished before it could be killed"
        killed.send_signal(signal.SIGKILL)
        killed.wait(timeout=30)
    finally:
        killed.kill()
    full = cli.build_cli(args)
    resumed = cli.build_cli([*args, "--ckpt_path", str(saved)])
    assert resumed.trainer.global_step == full.trainer.global_step == steps
    for name, value in full.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[name], value, rtol=0, atol=0, msg=name)
