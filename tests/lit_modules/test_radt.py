"""RADT and Decision Transformer: SeqRA timestep causality, StepRA zero-init identity, masking, the loss, the
configs through the real CLI (also as a 2-process DDP run), and checkpoint reload."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from callbacks import ReturnAlignmentEval
from lit_modules import RADT, DecisionTransformer
from lit_modules.radt import seqra_mask
from lit_modules.return_conditioned import interleave, sinusoid_table, token_attention_mask

S, A, K = 5, 3, 6


def inputs(B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, K, S, generator=g), torch.rand(B, K, A, generator=g) * 2 - 1,
            torch.randn(B, K, generator=g), torch.arange(K).repeat(B, 1), torch.ones(B, K))


def materialized(module):
    """``module`` with its declared networks built (tests/tiny_models.py has the same; this file is also imported
    by the DDP subprocess below, where the tests folder is not on the path)."""
    module.configure_model()
    return module


def small(cls, **kw):
    torch.manual_seed(0)
    return materialized(cls(state_dim=S, act_dim=A, embed_dim=16, n_layers=2, n_heads=2, context_len=K,
                            max_timestep=32, **kw)).eval()


def test_seqra_mask_hand_enumerated():
    # K = 3, step 0 is padding: token q belongs to step q // 2 and sees returns j <= its step that are real,
    # plus its own step (so the padded step's row is not empty)
    got = seqra_mask(torch.tensor([[0.0, 1.0, 1.0]]))[0, 0].int().tolist()
    assert got == [[1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 1, 0], [0, 1, 1], [0, 1, 1]]


@pytest.mark.parametrize("kw", [dict(), dict(stepra=False), dict(seqra=False)])
def test_later_return_cannot_change_earlier_prediction(kw):
    model = small(RADT, **kw)
    for block in model.blocks:  # leave the zero init so every path from the returns is live
        for p in block.parameters():
            p.data.add_(0.05 * torch.randn_like(p))
    s, a, r, t, m = inputs()
    base = model(s, a, r, t, m)
    r2 = r.clone()
    r2[:, 3] += 5.0
    moved = model(s, a, r2, t, m)
    torch.testing.assert_close(moved[:, :3], base[:, :3], rtol=0, atol=0)
    assert (moved[:, 3:] - base[:, 3:]).abs().amax() > 1e-3


def test_action_reaches_only_later_steps_and_padding_is_invisible():
    for model in (small(RADT), small(DecisionTransformer)):
        s, a, r, t, m = inputs()
        base = model(s, a, r, t, m)
        a2 = a.clone()
        a2[:, 2] = -a2[:, 2]
        moved = model(s, a2, r, t, m)
        torch.testing.assert_close(moved[:, :3], base[:, :3], rtol=0, atol=0)  # a_2 is after s_2
        assert (moved[:, 3:] - base[:, 3:]).abs().amax() > 1e-4
        # left padding: garbage in masked steps changes nothing on the real steps
        m[:, :2] = 0
        clean = model(s, a, r, t, m)
        s2, a3, r3 = s.clone(), a.clone(), r.clone()
        s2[:, :2], a3[:, :2], r3[:, :2] = 99.0, 0.5, -77.0
        torch.testing.assert_close(model(s2, a3, r3, t, m)[:, 2:], clean[:, 2:], rtol=1e-5, atol=1e-5)


def test_stepra_zero_init_is_plain_post_norm_block():
    model = small(RADT, seqra=False)
    s, a, r, t, m = inputs()
    # at initialisation the modulation is exactly zero: the returns cannot matter
    torch.testing.assert_close(model(s, a, r + 3.0, t, m), model(s, a, r, t, m), rtol=0, atol=0)
    # and each block is LN(h + MLP(h)) after h = LN(x + SA(x)) with affine-free LayerNorm (eps 1e-6)
    block = model.blocks[0]
    x = torch.randn(2, 2 * K, 16)
    c = torch.randn(2, K, 16)
    amask = torch.ones(2 * K, 2 * K, dtype=torch.bool).tril()[None, None]
    ln = lambda v: F.layer_norm(v, (16,), eps=1e-6)  # noqa: E731
    h = ln(x + block.attn(x, amask))
    expected = ln(h + block.mlp(h))
    torch.testing.assert_close(block(x, block.step_inputs(c, torch.zeros_like(c)), amask, None), expected)
    # once the modulation is trained (non-zero) the returns do change the output
    torch.nn.init.normal_(block.stepra.net[1].weight, std=0.5)
    assert (model(s, a, r + 3.0, t, m) - model(s, a, r, t, m)).abs().amax() > 1e-3


# -- the block equations of the reference (CyberAgentAILab/radt gym/models/radt.py), written out by hand --------
def layer_norm(x, weight=None, bias=None, eps=1e-5):
    mu = x.mean(-1, keepdim=True)
    y = (x - mu) / torch.sqrt(((x - mu) ** 2).mean(-1, keepdim=True) + eps)
    return y if weight is None else y * weight + bias


def attention(q, k, v, wo, bo, allowed, heads):
    """softmax(Q_h K_hᵀ/√d_h, disallowed → −∞) V_h per head, heads concatenated, then ·Woᵀ + bo."""
    dh = q.shape[-1] // heads
    outs = []
    for h in range(heads):
        cols = slice(h * dh, (h + 1) * dh)
        scores = (q[..., cols] @ k[..., cols].transpose(-1, -2)) / math.sqrt(dh)
        outs.append(torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1) @ v[..., cols])
    return torch.cat(outs, -1) @ wo.T + bo


def mlp(x, seq):
    hidden = x @ seq[0].weight.T + seq[0].bias
    hidden = 0.5 * hidden * (1 + torch.erf(hidden / math.sqrt(2)))  # exact GELU
    return hidden @ seq[2].weight.T + seq[2].bias


def reference_block(block, x, c, e, heads):
    """One RADT block from the reference's equations, with the module's weights plugged in. x: (B, 2K, d) tokens
    (s_0, a_0, s_1, ...), c: return embeddings (B, K, d), e: timestep embeddings (B, K, d)."""
    L, K, d = x.shape[1], c.shape[1], x.shape[-1]
    self_allowed = torch.tensor([[j <= i for j in range(L)] for i in range(L)])
    cross_allowed = torch.tensor([[j <= i // 2 for j in range(K)] for i in range(L)])  # token i is of step i // 2
    assert block.attn.qkv.bias is None  # the reference's qkv_bias=False
    w = block.attn.qkv.weight
    sa = lambda z: attention(z @ w[:d].T, z @ w[d:2 * d].T, z @ w[2 * d:].T, block.attn.proj.weight,  # noqa: E731
                             block.attn.proj.bias, self_allowed, heads)
    ln = lambda z, m: layer_norm(z, m.weight, m.bias, m.eps)  # noqa: E731

    def seqra(query, residual):  # (1 + α) ⊙ o with α = W_g [o; residual] + b_g
        ca = block.cross
        keys, values = ln(c + e, ca.ln_k) @ ca.k.weight.T, ln(c, ca.ln_v) @ ca.v.weight.T
        o = attention(query @ ca.q.weight.T, keys, values, ca.proj.weight, ca.proj.bias, cross_allowed, heads)
        alpha = torch.cat([o, residual], -1) @ ca.gate.weight.T + ca.gate.bias
        return (1 + alpha) * o

    if block.stepra is None:  # PreNormDecoderBlock: standard LNs, the gate sees the un-normalised residual
        x = x + sa(ln(x, block.norm_attn))
        x = x + seqra(ln(x, block.norm_cross), x)
        return x + mlp(ln(x, block.norm_mlp), block.mlp)
    # DecoderBlock: post-norm adaLN (affine-free LN, eps 1e-6); modulations of step t for both of its tokens
    lin = block.stepra.net[1]
    mods = (c * torch.sigmoid(c)) @ lin.weight.T + lin.bias
    mods = [m.repeat_interleave(2, dim=1) for m in mods.split(d, dim=-1)]
    plain = lambda z: layer_norm(z, eps=1e-6)  # noqa: E731
    if block.cross is not None:
        g_sa, b_sa, g_ca, b_ca, g_mlp, b_mlp = mods
    else:
        (g_sa, b_sa, g_mlp, b_mlp), g_ca = mods, None
    h = plain(x + sa(x)) * (1 + g_sa) + b_sa
    if g_ca is not None:
        h = plain(h + seqra(h, h)) * (1 + g_ca) + b_ca
    return plain(h + mlp(h, block.mlp)) * (1 + g_mlp) + b_mlp


@pytest.mark.parametrize("kw", [dict(), dict(seqra=False), dict(stepra=False)],
                         ids=["full", "StepRA-only", "SeqRA-only"])
def test_block_matches_reference_equations(kw):
    torch.manual_seed(0)
    d, heads = 8, 2
    model = materialized(RADT(state_dim=S, act_dim=A, embed_dim=d, n_layers=1, n_heads=heads, context_len=3,
                              max_timestep=16, **kw)).double().eval()
    block = model.blocks[0]
    ln_weights = {id(m.weight) for m in block.modules() if isinstance(m, torch.nn.LayerNorm) and m.weight is not None}
    for p in block.parameters():  # every weight non-trivial, incl. the zero-initialised gate and adaLN
        p.data.copy_(0.3 * torch.randn_like(p) + (1.0 if id(p) in ln_weights else 0.0))
    B, K = 2, 3
    g = torch.Generator().manual_seed(3)
    x, c, e = (torch.randn(B, n, d, generator=g, dtype=torch.float64) for n in (2 * K, K, K))
    expected = reference_block(block, x, c, e, heads)
    valid = torch.ones(B, K)
    got = block(x, block.step_inputs(c, e), token_attention_mask(valid.repeat_interleave(2, 1)), seqra_mask(valid))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)


def test_sinusoid_timestep_table_hand_computed():
    # PE[p, 2i] = sin(p / 10000^(2i/d)), PE[p, 2i+1] = cos(p / 10000^(2i/d)); d = 4: frequencies 1 and 1/100
    want = [[0, 1, 0, 1], [math.sin(1), math.cos(1), math.sin(0.01), math.cos(0.01)],
            [math.sin(2), math.cos(2), math.sin(0.02), math.cos(0.02)]]
    torch.testing.assert_close(sinusoid_table(3, 4), torch.tensor(want, dtype=torch.float32))


def test_radt_embeddings_and_output_as_in_reference():
    # tokens Linear(s) + E[t], Linear(a) + E[t] with E[t] = Linear(PE[t]) (no input LayerNorm, no dropout);
    # the s-token's hidden state after the last block, with no final LayerNorm
    model = small(RADT, stepra=False)
    for p in model.parameters():
        p.data.add_(0.2 * torch.randn_like(p))
    assert not any(isinstance(m, torch.nn.Embedding) for m in model.modules())
    s, a, r, t, m = inputs()
    t = t + 7
    lin = model.embed_timestep.linear
    angle = lambda p, i: p / 10000 ** (2 * (i // 2) / 16)  # noqa: E731
    pe = torch.tensor([[[math.sin(angle(p, i)) if i % 2 == 0 else math.cos(angle(p, i)) for i in range(16)]
                        for p in row] for row in t.tolist()])
    e = pe @ lin.weight.T + lin.bias
    x = interleave(s @ model.embed_state.weight.T + model.embed_state.bias + e,
                   a @ model.embed_action.weight.T + model.embed_action.bias + e)
    c = r[..., None] @ model.embed_return.weight.T + model.embed_return.bias
    amask, cmask = token_attention_mask(m.repeat_interleave(2, 1)), seqra_mask(m)
    for block in model.blocks:
        x = block(x, block.step_inputs(c, e), amask, cmask)
    torch.testing.assert_close(model(s, a, r, t, m), x[:, 0::2], rtol=1e-5, atol=1e-5)
    learned = small(RADT, timestep_embedding="learned")
    assert isinstance(learned.embed_timestep, torch.nn.Embedding)
    with pytest.raises(ValueError, match="timestep_embedding"):
        small(RADT, timestep_embedding="rotary")


def test_seqra_gate_starts_at_zero():
    model = small(RADT)
    for block in model.blocks:
        assert block.cross.gate.weight.abs().sum() == 0 and block.cross.gate.bias.abs().sum() == 0
    with pytest.raises(ValueError, match="seqra=True or stepra=True"):
        RADT(seqra=False, stepra=False)


@pytest.mark.parametrize("cls", [RADT, DecisionTransformer])
@pytest.mark.parametrize("name", ["context_len", "max_timestep"])
def test_window_sizes_below_one_are_one_clear_error(cls, name):
    with pytest.raises(ValueError, match=f"^{name} must be >= 1, got 0$"):
        cls(**{name: 0})


@pytest.mark.parametrize("cls,kw", [(RADT, {}), (RADT, {"stepra": False}), (RADT, {"seqra": False}),
                                    (DecisionTransformer, {})])
def test_act_with_cache_equals_full_forward_along_a_sliding_rollout(cls, kw):
    # act() leaves out the newest action token, computes only the newest state token in the last block and
    # reuses per-step work from the cache; along a rollout whose windows slide by one step (left-padded while
    # t < K) it must give the full forward's last prediction at every step.
    model = small(cls, **kw)
    for p in model.parameters():  # leave the zero inits so every path is live
        p.data.add_(0.2 * torch.randn_like(p))
    B, T = 3, 3 * K  # the cache moves its buffers twice
    g = torch.Generator().manual_seed(1)
    states, actions = torch.randn(B, T, S, generator=g), torch.rand(B, T, A, generator=g)
    rtg = 1000 * torch.randn(B, T, generator=g)  # R̂/rtg_scale of order 1, so the returns matter
    cache = {}
    for t in range(T):
        lo = max(0, t + 1 - K)
        pad = K - (t + 1 - lo)
        window = lambda x: F.pad(x[:, lo:t + 1].movedim(1, -1), (pad, 0)).movedim(-1, 1)  # noqa: E731
        acts = window(actions).clone()
        acts[:, -1] = 0  # the newest action is not known yet
        ts = F.pad(torch.arange(lo, t + 1), (pad, 0)).repeat(B, 1)
        mask = F.pad(torch.ones(t + 1 - lo), (pad, 0)).repeat(B, 1)
        batch = {"states": window(states), "actions": acts, "returns_to_go": window(rtg), "timesteps": ts, "mask": mask}
        with torch.no_grad():
            full = model.predict_actions(batch)[:, -1]
        torch.testing.assert_close(model.act(*batch.values(), cache=cache), full, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model.act(*batch.values()), full, rtol=1e-5, atol=1e-6)
    # a window that does not continue the cached one (another rollout, a skipped step) is computed in full
    for other in (inputs(B, seed=5), inputs(B, seed=6)):
        other = (other[0], other[1], 1000 * other[2], *other[3:])
        batch = dict(zip(("states", "actions", "returns_to_go", "timesteps", "mask"), other))
        with torch.no_grad():
            full = model.predict_actions(batch)[:, -1]
        torch.testing.assert_close(model.act(*other, cache=cache), full, rtol=1e-5, atol=1e-6)


def test_masked_mse_and_cross_entropy_hand_computed():
    model = small(DecisionTransformer)
    pred = torch.zeros(1, 3, 2)
    actions = torch.tensor([[[1.0, 1.0], [0.5, -0.5], [9.0, 9.0]]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])  # the third step is padding
    # per step mean squared errors 1 and 0.25 -> mean over the two real steps
    assert model.action_loss(pred, actions, mask).item() == pytest.approx(0.625)
    disc = materialized(RADT(state_dim=S, act_dim=3, discrete=True, embed_dim=16, n_layers=1, context_len=2,
                             max_timestep=8))
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]]]))
    loss = disc.action_loss(logits, torch.tensor([[1, 2]]), torch.tensor([[1.0, 1.0]]))
    assert loss.item() == pytest.approx(-(torch.log(torch.tensor(0.25)) + torch.log(torch.tensor(0.8))).item() / 2)
    acts = disc.act(torch.randn(4, 2, S), torch.randint(0, 3, (4, 2)), torch.randn(4, 2),
                    torch.zeros(4, 2, dtype=torch.long), torch.ones(4, 2))
    assert acts.dtype == torch.long and acts.shape == (4,) and acts.min() >= 0 and acts.max() < 3


CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs" / "radt").glob("*.yaml"))
TINY_DATA = ["--data.generate_episodes", "6", "--data.generate_max_steps", "25", "--data.generate_num_envs", "3"]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_config_parses(config):
    from cli import build_cli

    cli = build_cli(["--config", str(config)], run=False)
    assert type(cli.model).__name__ in ("RADT", "DecisionTransformer")
    assert cli.model.embed_dim == 128 and cli.model.n_layers == 3 and cli.model.context_len == 20
    assert cli.trainer.gradient_clip_val == 0.25


@pytest.mark.parametrize("name", ["halfcheetah.yaml", "dt_swimmer.yaml"])
def test_quick_config_trains_evaluates_and_reloads(root, name):
    from cli import build_cli

    cli = build_cli(["fit", "--config", str(root / "configs" / "radt" / name), "--trainer.max_steps", "2",
                     "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
                     "--data.batch_size", "8", *TINY_DATA])
    metrics = cli.trainer.callback_metrics
    assert torch.isfinite(metrics["train/action_loss"]) and torch.isfinite(metrics["val/return_alignment_error"])
    ckpt = next(Path(cli.trainer.log_dir).rglob("*.ckpt"))
    reloaded = type(cli.model).load_from_checkpoint(ckpt)
    torch.testing.assert_close(reloaded.state_mean, cli.model.state_mean)
    assert reloaded.state_mean.abs().sum() > 0 and reloaded.state_dim == cli.datamodule.state_dim


class RolloutRecorder(L.Callback):
    """Probe for the DDP test below (the CLI imports it as ``tests.lit_modules.test_radt.RolloutRecorder``): the
    loggers only show rank 0, so every rank appends what it evaluated at each validation to
    ``<out_dir>/rank<r>.jsonl``."""

    def __init__(self, out_dir: str):
        self.out_dir = Path(out_dir)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        (evaluator,) = [c for c in trainer.callbacks if isinstance(c, ReturnAlignmentEval)]
        record = {"step": trainer.global_step, "world_size": trainer.world_size, "result": evaluator.last_result,
                  "metrics": {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")},
                  "param_sum": sum(p.detach().double().sum().item() for p in pl_module.parameters()),
                  "open_figures": len(plt.get_fignums()) if (plt := sys.modules.get("matplotlib.pyplot")) else 0}
        with open(self.out_dir / f"rank{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")


def test_radt_fit_and_validate_under_two_process_ddp(root, tmp_path):
    # A 2-process gloo DDP fit of the quick RADT config through the real `litpapers` script (DDP re-launches the
    # command line for rank 1, so it cannot be `python -c`); the built-in data is generated into the fresh
    # $LITPAPERS_CACHE by rank 0 while rank 1 waits. Then a single-process validate of its checkpoint.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from cli import build_cli

    config = str(root / "configs" / "radt" / "halfcheetah.yaml")
    common = ["--config", config, "--data.batch_size", "8", "--trainer.limit_val_batches", "1",
              "--trainer.enable_progress_bar", "false", *TINY_DATA]
    probe = tmp_path / "probe"
    probe.mkdir()
    entry = Path(sys.executable).parent / "litpapers"
    launcher = [str(entry)] if entry.exists() else [sys.executable, "-m", "cli"]
    cmd = [*launcher, "fit", *common, "--trainer.accelerator", "cpu", "--trainer.devices", "2",
           "--trainer.strategy", "ddp", "--trainer.max_steps", "4", "--trainer.val_check_interval", "2",
           "--trainer.logger.init_args.save_dir", str(tmp_path / "ddp"),
           "--trainer.callbacks+=" + json.dumps({"class_path": "tests.lit_modules.test_radt.RolloutRecorder",
                                                  "init_args": {"out_dir": str(probe)}})]
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]

    # Both ranks evaluated at both validations (steps 2 and 4), with the same weights and the same rollouts.
    records = {r: [json.loads(line) for line in (probe / f"rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)}
    assert [rec["step"] for rec in records[0]] == [rec["step"] for rec in records[1]] == [2, 4]
    assert all(rec["world_size"] == 2 for rec in records[0] + records[1])
    for rank0, rank1 in zip(records[0], records[1]):
        assert rank0["param_sum"] == rank1["param_sum"]
        assert rank0["open_figures"] == rank1["open_figures"] == 0  # no rank leaks the alignment figure
        assert rank0["result"] == rank1["result"]  # targets, every episode's return, errors: exactly equal
        assert rank0["metrics"] == rank1["metrics"]  # incl. val/action_loss, synced across the ranks
        assert len(rank0["result"]["targets"]) == 7 and len(rank0["result"]["actual"][0]) == 10
    assert records[0][0]["result"]["actual"] != records[0][1]["result"]["actual"]  # step 4 rolled out new weights

    # Rank 0 alone logged: one TensorBoard event file, each alignment metric and the figure once per validation.
    (version,) = (tmp_path / "ddp" / "radt_halfcheetah").iterdir()
    (events,) = version.glob("events.out.tfevents.*")
    acc = EventAccumulator(str(events)).Reload()
    logged = {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    last = records[0][1]["result"]
    assert logged["val/return_alignment_error"] == pytest.approx(
        [rec["result"]["mean_error"] for rec in records[0]], rel=1e-6)
    assert logged["val/return_alignment_error_sum"] == pytest.approx(
        [rec["result"]["sum_error"] for rec in records[0]], rel=1e-6)
    for i, (target, actual) in enumerate(zip(last["targets"], last["actual"])):
        assert len(logged[f"val/return_actual/{i}"]) == len(logged[f"val/return_target/{i}"]) == 2
        assert logged[f"val/return_actual/{i}"][-1] == pytest.approx(sum(actual) / len(actual), rel=1e-6)
        assert logged[f"val/return_target/{i}"][-1] == pytest.approx(target, rel=1e-6)
    assert len(logged["val/action_loss"]) == 2 and len(acc.Images("val/return_alignment")) == 2

    # The checkpoint holds the step-4 weights and data statistics; one process validating it rolls out exactly
    # what the DDP ranks did.
    ckpt = version / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert saved["global_step"] == 4 and saved["state_dict"]["state_mean"].abs().sum() > 0
    single = build_cli(["validate", *common, "--ckpt_path", str(ckpt)])
    (evaluator,) = [c for c in single.trainer.callbacks if isinstance(c, ReturnAlignmentEval)]
    assert single.trainer.world_size == 1
    assert sum(p.detach().double().sum().item() for p in single.model.parameters()) == pytest.approx(
        records[0][1]["param_sum"], rel=1e-12)
    assert evaluator.last_result["targets"] == last["targets"]
    torch.testing.assert_close(torch.tensor(evaluator.last_result["actual"]), torch.tensor(last["actual"]),
                               rtol=1e-5, atol=1e-6)
    assert single.trainer.callback_metrics["val/return_alignment_error"].item() == pytest.approx(
        last["mean_error"], rel=1e-6)
