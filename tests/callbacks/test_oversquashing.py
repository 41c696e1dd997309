"""Over-squashing probes: math on hand-built models with known answers, side-effect freedom, configs via the CLI."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from callbacks import (OverSquashingProbe, RepresentationalCollapseProbe, SequenceTaskProbe,
                       representational_collapse, token_sensitivity)
from callbacks.oversquashing import find_causal_lm
from cli import build_cli
from lit_modules import CausalLM
from lm.tokenizers import byte_tokenizer
from tiny_models import TINY, materialized

ROOT = Path(__file__).resolve().parents[2]
PROBE_CONFIGS = sorted((ROOT / "configs" / "probes").glob("*.yaml"))


class WeightedMeanLM(nn.Module):
    """One 'layer' of causal attention with fixed, position-only scores and no positional encoding:
    y_t = Σ_{j≤t} w_j V e_j / Σ_{j≤t} w_j.  w ≡ 1 is uniform attention (y_t = mean of the value vectors);
    w_j = 0 makes the model ignore position j."""

    def __init__(self, vocab: int = 16, d: int = 8, weights: list[float] | None = None, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.embed = nn.Embedding(vocab, d)
        self.embed.weight.data = torch.randn(vocab, d, generator=g)
        self.value = nn.Linear(d, d, bias=False)
        self.value.weight.data = torch.randn(d, d, generator=g)
        self.weights = weights

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed

    def forward(self, input_ids=None, inputs_embeds=None, output_hidden_states=False):
        e = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        n = e.shape[1]
        w = torch.ones(n, dtype=e.dtype) if self.weights is None else torch.tensor(self.weights[:n], dtype=e.dtype)
        w = w.view(1, n, 1)
        y = (w * self.value(e)).cumsum(1) / w.cumsum(1).clamp_min(1e-12)
        return SimpleNamespace(hidden_states=(e, y), logits=y @ self.embed.weight.T)


def test_collapse_of_uniform_attention_is_exact_and_decays_as_one_over_n():
    # [x]*k + [a] vs [x]*k + [a, a]: y = (k v_x + v_a)/(k+1) vs (k v_x + 2 v_a)/(k+2),
    # so Δ = k (v_a - v_x) / ((k+1)(k+2)) and ‖Δ‖∞ · k → ‖v_a - v_x‖∞.
    model = WeightedMeanLM()
    x, a = 3, 7
    with torch.no_grad():
        gap = (model.value(model.embed.weight[a]) - model.value(model.embed.weight[x])).abs().max().item()
    scaled = []
    for k in (1, 4, 16, 64, 256):
        delta = representational_collapse(model, [x] * k + [a], [x] * k + [a, a])
        assert delta == pytest.approx(k * gap / ((k + 1) * (k + 2)), rel=1e-5)
        scaled.append(delta * k)
    assert scaled[-1] == pytest.approx(gap, rel=0.02)
    # layer 0 is the embedding of the last token, which is `a` in both sequences
    assert representational_collapse(model, [x] * 4 + [a], [x] * 4 + [a, a], layer=0) == 0.0


def test_sensitivity_of_weighted_mean_is_w_i_times_frobenius_norm_of_V():
    # y_last = Σ_i w_i V e_i / Σ w  =>  ∂y_last/∂e_i = (w_i / Σ w) V, exactly; w_i = 0 ignores position i.
    weights = [1.0, 0.0, 2.0, 0.0, 1.0, 4.0]
    model = WeightedMeanLM(weights=weights)
    v_norm = torch.linalg.matrix_norm(model.value.weight).item()
    expected = torch.tensor(weights) / sum(weights) * v_norm
    sens = token_sensitivity(model, [1, 2, 3, 4, 5, 6])
    torch.testing.assert_close(sens, expected, rtol=1e-5, atol=1e-7)
    assert sens[1] == 0 and sens[3] == 0
    estimate = token_sensitivity(model, [1, 2, 3, 4, 5, 6], num_projections=4000, chunk_size=1000)
    torch.testing.assert_close(estimate, expected, rtol=0.05, atol=1e-7)


def test_sensitivity_matches_full_jacobian_on_tiny_llama():
    lm = materialized(CausalLM(model=TINY)).model
    ids = torch.tensor([5, 9, 40, 40, 7, 3])
    embeds = lm.get_input_embeddings()(ids[None]).detach()

    def last_state(e):
        return lm(inputs_embeds=e, output_hidden_states=True).hidden_states[-1][0, -1]

    lm.eval()
    jac = torch.autograd.functional.jacobian(last_state, embeds)[:, 0]  # (d_out, n, d_in)
    expected = jac.pow(2).sum(dim=(0, 2)).sqrt()
    torch.testing.assert_close(token_sensitivity(lm, ids, chunk_size=7), expected, rtol=1e-4, atol=1e-6)


def test_collapse_on_tiny_llama_identical_pairs_zero_and_bf16_runs():
    lm = materialized(CausalLM(model=TINY)).model
    ids = [10] * 12
    assert representational_collapse(lm, ids, ids) == 0.0
    assert representational_collapse(lm, ids, ids + [10]) > 0.0
    assert representational_collapse(lm, [10] * 12 + [11], [10] * 12 + [11, 11],
                                     autocast_dtype=torch.bfloat16) >= 0.0


def test_ones_commas_pairs_are_well_formed_members_of_the_family():
    # v* is the (n+1)-digit member: when n ≡ 0 (mod 3) the extra digit opens a new group ("111" -> "111,1"),
    # never "1111" / "111,1111" (the old construction repeated the last token).
    expected = {1: ("1", "11"), 2: ("11", "111"), 3: ("111", "111,1"), 4: ("111,1", "111,11"),
                5: ("111,11", "111,111"), 6: ("111,111", "111,111,1"), 7: ("111,111,1", "111,111,11"),
                8: ("111,111,11", "111,111,111"), 9: ("111,111,111", "111,111,111,1"),
                10: ("111,111,111,1", "111,111,111,11"), 11: ("111,111,111,11", "111,111,111,111"),
                12: ("111,111,111,111", "111,111,111,111,1")}
    tok = byte_tokenizer()
    probe = RepresentationalCollapseProbe(lengths=list(range(1, 13)), families=["ones_commas", "ones", "digits"])
    pairs = probe.pairs(tok)
    decode = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731
    for n, want in expected.items():
        ((a, b),) = pairs["ones_commas", n]
        assert (decode(a), decode(b)) == want
        ((a, b),) = pairs["ones", n]
        assert (decode(a), decode(b)) == ("1" * n, "1" * (n + 1))
        ((a, b),) = pairs["digits", n]
        assert len(decode(a)) == n and decode(b) == decode(a) + decode(a)[-1]


def uniform_collapse(lengths, precisions):
    """The collapse probe (prefix "x") on uniform causal attention, h(s) = V · mean of the embeddings of s."""
    tok = byte_tokenizer()
    model = WeightedMeanLM(vocab=len(tok))
    probe = RepresentationalCollapseProbe(lengths=lengths, families=["ones", "ones_commas"], precisions=precisions,
                                          prefix="x")
    return probe.measure(model, tok), model, tok


def test_collapse_on_uniform_attention_matches_token_counts_and_commas_keep_delta_larger():
    # h(s) = Σ_t c_t u_t / L with u_t = V e_t and c_t the token counts. ones: [x, 1ⁿ] vs [x, 1ⁿ⁺¹] gives
    # Δ = ‖u_1 − u_x‖∞ / ((n+1)(n+2)) ~ 1/n². ones_commas: a has ⌊(n−1)/3⌋ commas, b ⌊n/3⌋; the digit (or ",1")
    # added to a mean that also holds commas moves it by ~1/n: commas keep Δ larger, by a growing factor.
    lengths = [4, 15, 64, 255]  # n ≡ 0 (mod 3) too: there the extra digit opens a group (",1", two tokens)
    results, model, tok = uniform_collapse(lengths, ["fp32"])
    with torch.no_grad():
        u = {ch: model.value(model.embed.weight[tok(ch, add_special_tokens=False)["input_ids"][0]]).double()
             for ch in "x1,"}
    ratios = []
    for n in lengths:
        ones = (u["1"] - u["x"]).abs().max().item() / ((n + 1) * (n + 2))
        ca, cb = (n - 1) // 3, n // 3
        h_a = (u["x"] + n * u["1"] + ca * u[","]) / (1 + n + ca)
        h_b = (u["x"] + (n + 1) * u["1"] + cb * u[","]) / (2 + n + cb)
        commas = (h_b - h_a).abs().max().item()
        for fam, exact in (("ones", ones), ("ones_commas", commas)):
            # the measured fp32 Δ is within its noise floor of the exact value (the floor's defining bound, which
            # can be tight: slack for the float64 reference's own rounding), and that floor is tiny
            r = results[fam, "fp32", n]
            assert abs(r["delta"][-1] - exact) <= r["noise"][-1] * (1 + 1e-4) < 1e-2 * exact
        assert commas > ones
        ratios.append(commas / ones)
    assert ratios == sorted(ratios) and ratios[-1] > 20 * ratios[0]


def test_bf16_collapses_no_later_than_fp32_and_noise_floors_order_by_precision():
    # Noise floor = ε_a + ε_b, each the precision's error against a float64 copy on the same sequence. bf16 keeps
    # 8 significant bits, fp32 24: bf16's floor is never below fp32's, and wherever fp32 has collapsed
    # (Δ ≤ floor) bf16 has too. ones: Δ ~ ‖u_1 − u_x‖/n² falls under bf16's floor (~2⁻⁸‖u‖) at moderate n but
    # stays far above fp32's (~2⁻²⁴‖u‖) at every length here; the shortest pair is distinct in both.
    lengths = [2, 8, 32, 128, 512]
    results, _, _ = uniform_collapse(lengths, ["fp32", "bf16", "bf16_weights"])
    collapsed = lambda r: r["delta"][-1] <= r["noise"][-1]  # noqa: E731
    for fam in ("ones", "ones_commas"):
        for n in lengths:
            full = results[fam, "fp32", n]
            assert full["noise"][-1] > 0.0 and not collapsed(full)
            for low in ("bf16", "bf16_weights"):
                assert results[fam, low, n]["noise"][-1] >= full["noise"][-1]
                assert collapsed(results[fam, low, n]) or not collapsed(full)
        assert not collapsed(results[fam, "bf16_weights", 2])
    assert collapsed(results["ones", "bf16_weights", 512]) and collapsed(results["ones", "bf16", 512])
    first = {(fam, low): min([n for n in lengths if collapsed(results[fam, low, n])], default=10 ** 9)
             for fam in ("ones", "ones_commas") for low in ("bf16", "bf16_weights")}
    for low in ("bf16", "bf16_weights"):  # commas: Δ ~ 1/n stays above the floor at least as long as ones' 1/n²
        assert first["ones_commas", low] >= first["ones", low]
    assert first["ones_commas", "bf16"] > first["ones", "bf16"]
    scalars = RepresentationalCollapseProbe(lengths=lengths, families=["ones"], precisions=["bf16"]).scalars(
        {("ones", "bf16", n): results["ones", "bf16", n] for n in lengths})
    assert scalars["probes/collapse/ones/bf16/noise"] == results["ones", "bf16", 512]["noise"][-1]


class LastTokenOracle(nn.Module):
    """Greedy 'model': after '=' it emits the token before '=', after EOS a stray digit '9', otherwise EOS —
    a perfect copy_last solver whose continuation goes on past its EOS."""

    def __init__(self, vocab: int, eq_id: int, eos_id: int, nine: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, 2)
        self.vocab, self.eq_id, self.eos_id, self.nine = vocab, eq_id, eos_id, nine

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids, output_hidden_states=False):
        prev = torch.cat([input_ids[:, :1], input_ids[:, :-1]], dim=1)
        target = torch.where(input_ids == self.eos_id, self.nine, torch.full_like(input_ids, self.eos_id))
        target = torch.where(input_ids == self.eq_id, prev, target)
        return SimpleNamespace(logits=nn.functional.one_hot(target, self.vocab).float())


def test_task_probe_accuracy_by_length_and_position_on_an_oracle():
    tok = byte_tokenizer()
    byte = lambda ch: tok(ch, add_special_tokens=False)["input_ids"][0]  # noqa: E731
    model = LastTokenOracle(len(tok), byte("="), tok.eos_token_id, byte("9"))
    probe = SequenceTaskProbe(tasks=["copy_last", "count_ones", "find_odd"], lengths=[5, 9], num_samples=20)
    results = probe.measure(model, tok)
    acc = results["accuracy"]
    assert acc["copy_last", 5] == acc["copy_last", 9] == 1.0  # always the last digit: right
    assert acc["count_ones", 5] == acc["count_ones", 9] == 0.0  # answers "1", truth is "5"/"9"
    # find_odd is right exactly when the odd digit is last: only the last position bin (0.8-1.0]; lengths 5
    # and 9 place no other index in it (3/4 = 0.75, 7/8 = 0.875 -> 0.875 is in the last bin and is wrong).
    by_pos = {x: a for (t, x), a in results["by_position"].items() if t == "find_odd"}
    assert by_pos[0.1] == 0.0 and 0.0 < by_pos[0.9] < 1.0
    assert results["by_position"]["copy_last", 1.0] == 1.0
    scalars = probe.scalars(results)
    assert scalars["probes/tasks/copy_last/acc"] == 1.0 and scalars["probes/tasks/count_ones/acc"] == 0.0


def test_probes_leave_training_state_grads_and_requires_grad_untouched(tmp_path):
    module = CausalLM(model=TINY)
    module.configure_model()
    lm = module.model
    lm.train()
    batch = torch.randint(3, 50, (2, 8))
    lm(input_ids=batch, labels=batch).loss.backward()
    frozen = lm.get_input_embeddings().weight
    frozen.requires_grad_(False)
    grads = {n: p.grad.clone() for n, p in lm.named_parameters() if p.grad is not None}
    flags = {n: p.requires_grad for n, p in lm.named_parameters()}
    trainer = SimpleNamespace(is_global_zero=True, global_step=3, loggers=[], sanity_checking=False)
    probes = [RepresentationalCollapseProbe(lengths=[4, 8], figure_dir=str(tmp_path)),
              OverSquashingProbe(lengths=[6], num_samples=1, figure_dir=str(tmp_path)),
              SequenceTaskProbe(lengths=[3, 4], num_samples=2, figure_dir=str(tmp_path))]
    for probe in probes:
        probe.on_validation_end(trainer, module)
        assert probe.results is not None
        assert all(m.training for m in lm.modules())
        assert {n: p.requires_grad for n, p in lm.named_parameters()} == flags
        for n, p in lm.named_parameters():
            if n in grads:
                assert torch.equal(p.grad, grads[n]), n
            else:
                assert p.grad is None, n
    assert {p.name for p in tmp_path.glob("*.png")} == {"collapse.png", "sensitivity.png", "tasks.png"}
    scalars = probes[0].scalars(probes[0].results)
    assert set(scalars) >= {"probes/collapse/ones/fp32/delta", "probes/collapse/ones_commas/bf16/tv"}


def test_probe_frequency_and_rank_zero_guard():
    module = CausalLM(model=TINY)
    module.configure_model()
    probe = OverSquashingProbe(lengths=[4], num_samples=1, every_n_steps=2, on_validation=False)
    calls = []
    probe.measure = lambda model, tok: calls.append(1) or {"profiles": {4: torch.ones(4)}}
    for step in range(1, 6):
        probe.on_train_batch_end(SimpleNamespace(is_global_zero=True, global_step=step, loggers=[]), module, None,
                                 None, 0)
    assert len(calls) == 2  # steps 2 and 4
    probe.on_validation_end(SimpleNamespace(is_global_zero=True, global_step=7, loggers=[], sanity_checking=False),
                            module)
    assert len(calls) == 2  # on_validation=False
    other_rank = SimpleNamespace(is_global_zero=False, global_step=6, loggers=[])
    probe.on_train_batch_end(other_rank, module, None, None, 0)
    assert len(calls) == 2


def test_find_causal_lm_lookup():
    module = CausalLM(model=TINY)
    module.configure_model()
    assert find_causal_lm(module) is module.model
    assert find_causal_lm(module.model) is module.model
    with pytest.raises(TypeError, match="no causal LM"):
        find_causal_lm(nn.Linear(2, 2))


@pytest.mark.parametrize("config", PROBE_CONFIGS, ids=lambda p: p.name)
def test_probe_configs_parse(config, capsys):
    with pytest.raises(SystemExit) as info:
        build_cli(["fit", "--config", str(config), "--print_config"])
    assert info.value.code in (0, None)
    assert "RepresentationalCollapseProbe" in capsys.readouterr().out


def test_quick_config_trains_two_steps_with_probes_logging_to_tensorboard():
    cli = build_cli(["fit", "--config", str(ROOT / "configs/probes/tasks_quick.yaml"), "--trainer.max_steps", "2",
                     "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
                     "--trainer.enable_progress_bar", "false", "--data.init_args.num_train", "64",
                     "--model.init_args.export_dir", "null"])
    assert cli.trainer.global_step == 2
    probes = [c for c in cli.trainer.callbacks if hasattr(c, "results")]
    assert len(probes) == 3 and all(p.results is not None for p in probes)
    assert {"collapse.png", "sensitivity.png", "tasks.png"} <= {p.name for p in Path("logs").rglob("*.png")}


def test_validate_config_runs_probes_on_a_local_model_directory(tmp_path):
    exported = materialized(CausalLM(model=TINY)).export(tmp_path / "hf_model")
    cli = build_cli(["validate", "--config", str(ROOT / "configs/probes/probe_local_model.yaml"),
                     "--model.init_args.model", str(exported), "--trainer.enable_progress_bar", "false",
                     "--trainer.limit_val_batches", "1"])
    probes = [c for c in cli.trainer.callbacks if hasattr(c, "results")]
    assert len(probes) == 3 and all(p.results is not None for p in probes)
    assert cli.model.model.config.hidden_size == TINY["hidden_size"]
    assert cli.model.model.dtype == torch.float32  # the bf16_weights precision used a copy


def _quick_probe_args(config: str) -> list[str]:
    """A probe config cut to seconds: shortest lengths, few samples, one validation batch, no progress bar."""
    return ["--config", str(ROOT / "configs/probes" / config), "--trainer.enable_progress_bar", "false",
            "--trainer.limit_val_batches", "1", "--model.init_args.model", str(TINY).replace("'", '"'),
            "--data.init_args.num_train", "8", "--data.init_args.num_val", "8", "--data.init_args.batch_size", "4"]


def _validate_quickly(config: str = "probe_local_model.yaml"):
    """Build ``litpapers validate --config configs/probes/<config>`` on a tiny model, cut the probes to their two
    shortest lengths and one sample, and run it as ``litpapers validate`` does (the validation, then the CLI's
    ``after_validate``). Returns the CLI."""
    cli = build_cli(_quick_probe_args(config), run=False)
    for probe in cli.trainer.callbacks:
        if hasattr(probe, "results"):
            probe.lengths, probe.num_samples = probe.lengths[:2], 1
    cli.trainer.validate(cli.model, cli.datamodule)
    cli.after_validate()
    return cli


def test_validate_probe_config_reports_progress_and_ends_with_a_summary_table(capsys):
    # issue 27 item 6: a long probe round said nothing for minutes and the run printed no result
    _validate_quickly()
    out, err = capsys.readouterr()
    assert "probe collapse: fp32, " in err and "probe sensitivity: length 16" in err and "probe tasks: length 4" in err
    assert err.count("done in") == 3
    table = out[out.index("probe collapse:"):]
    assert "ones fp32" in table and "start_over_middle" in table and "count_ones" in table
    header = next(line for line in table.splitlines() if line.strip().startswith("length"))
    assert header.split()[1:] == ["8", "16"]


def test_probe_figures_land_in_each_runs_version_folder():
    # issue 27 item 7: the figures went to logs/<name>/figures, outside the run's folder, and the next run
    # overwrote them
    runs = [Path(_validate_quickly().trainer.log_dir) for _ in range(2)]
    assert runs[0] != runs[1] and all(r.parent.resolve() == Path("logs/probes_local_model").resolve() for r in runs)
    for run in runs:
        assert {p.name for p in (run / "figures").glob("*.png")} == {"collapse.png", "sensitivity.png", "tasks.png"}
    assert not Path("logs/probes_local_model/figures").exists()


def test_fit_on_a_probe_config_writes_no_checkpoint():
    # issue 27 item 6: `fit --trainer.max_steps 2` on the real-model probe config wrote a 1.6 GB last.ckpt
    for config in ("smollm2.yaml", "probe_local_model.yaml"):
        cli = build_cli(_quick_probe_args(config), run=False)
        assert not [c for c in cli.trainer.callbacks if type(c).__name__ == "LastCheckpoint"], config
        assert cli.trainer.checkpoint_callback is None, config


@pytest.mark.slow
def test_validate_config_under_two_process_ddp_logs_probes_once(tmp_path):
    import csv
    import os
    import subprocess
    import sys

    entry = Path(sys.executable).parent / "litpapers"
    launcher = [str(entry)] if entry.exists() else [sys.executable, "-m", "cli"]
    cmd = [*launcher, "validate", "--config", str(ROOT / "configs/probes/probe_local_model.yaml"),
           "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
           "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false",
           "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", str(tmp_path)]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [r for f in tmp_path.rglob("metrics.csv") for r in csv.DictReader(f.read_text().splitlines())]
    logged = [r for r in rows if r.get("probes/tasks/acc")]
    assert len(logged) == 1  # rank 0 only, once
    assert {p.name for p in tmp_path.rglob("version_0/figures/*.png")} == {"collapse.png", "sensitivity.png",
                                                                           "tasks.png"}


def test_collapse_figure_legend_covers_no_panel():
    """The full report's collapse figure had its 18-entry legend over the right panel: it goes under the panels."""
    probe = RepresentationalCollapseProbe(lengths=[8, 16], precisions=["fp32", "bf16", "bf16_weights"], progress=False)
    results = {(fam, p, n): {"delta": {-1: 0.5 / n}, "noise": {-1: 1e-6}, "tv": 0.1 / n}
               for fam in probe.families for p in probe.precisions for n in probe.lengths}
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = probe.figure(results)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    (legend,) = fig.legends
    box = legend.get_window_extent(renderer)
    assert len(legend.get_texts()) == len(probe.families) * len(probe.precisions) * 2
    for ax in fig.axes:
        assert not box.overlaps(ax.get_window_extent(renderer)), "the legend covers a panel"
