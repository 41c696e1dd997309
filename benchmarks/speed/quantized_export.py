"""Size on disk and decode speed of QDPO's exported low-bit models against the full-precision (FP) model, side by side.

    python -m benchmarks.speed.quantized_export [--model smollm2-135m-instruct] [--quantizers rtn,gptq] [--bits 4]
        [--group-size 32] [--batch 8] [--new-tokens 32] [--repeats 3] [--threads N] [--quick] [--out FILE]
    python -m benchmarks.speed.quantized_export --update-docs docs/results/cpu/quantized_export.json

The FP model (``--model``: an alias such as ``smollm2-135m-instruct``, a ``save_pretrained`` directory such as
``checkpoints/minillm_teacher``, or a JSON config dict of a tiny random model with the byte tokenizer) is loaded in
fp32 with :func:`lm.hf.load_causal_lm`. For FP and for each quantizer × bits (:class:`lm.quantization.QuantizerConfig`,
the QDPO export path: :func:`lm.quantization.quantize` = ``prepare_qat`` + ``convert_qat``, GPTQ/AWQ calibrated on
the built-in prompts QDPO calibrates on, :meth:`lit_modules.QDPO.calibration_prompts`' recipe):

- **export**: ``save_pretrained`` (FP) / :func:`lm.quantization.save_quantized` (torchao ``IntxUnpackedToInt8Tensor``:
  int codes one per int8 byte, one fp32 scale and one int8 zero point (always 0: symmetric) per group) into a
  temporary folder; ``disk_bytes`` is the size of the weight files (``*.safetensors``), ``tensor_bytes`` the bytes of
  the tensors in them (from the safetensors header, without the header itself), split into the quantized layers'
  tensors and the rest (embeddings, norms, an untied ``lm_head``: fp32 in every variant);
- **reload**: :func:`lm.hf.load_causal_lm` of that folder; ``reload_max_abs_logit_diff`` is the largest difference
  between the reloaded model's logits and the in-memory model's on the benchmark prompts (0 when the export is
  exact);
- **decode speed**: greedy decoding with the package's one sampler (:func:`lm.sampling.generate`, temperature 0,
  ``eos_id=None`` so every row decodes exactly ``new_tokens`` tokens; KV cache: the sampler's default, dynamic on
  CPU) of a batch of ``batch`` left-padded built-in held-out prompts (free-form, in the model's chat format), by the
  *reloaded* model. ``decode_tokens_per_s`` = batch × new_tokens / wall time of the whole call (prefill included);
  ``prefill_tokens_per_s`` = real prompt tokens / wall time of one forward of the prompt batch (last position's
  logits only). After one warm-up call per variant, the variants take turns for ``repeats`` rounds (order rotated
  each round); medians, and ratios to FP of the medians and the median of per-round ratios.
  ``greedy_token_match_vs_fp``: the fraction of the decoded tokens equal to FP's at the same position.

Prints one JSON object last (command, date, machine, torch threads, settings, per-variant rows); ``--out`` also
writes it. ``--update-docs RESULTS_JSON`` fills the generated block of ``docs/qdpo.md`` from such a file.
"""

from __future__ import annotations

import datetime
import json
import shlex
import shutil
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import apply_threads, benchmark_parser

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MODEL = "smollm2-135m-instruct"
DOC = ROOT / "docs" / "qdpo.md"
DOC_BEGIN = "<!-- quantized_export: begin (generated) -->"
DOC_END = "<!-- quantized_export: end -->"
#: safetensors dtype names -> bytes per element
SAFETENSORS_DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
                           "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def parse_model(text: str) -> str | dict:
    """``--model``: a JSON object is a config dict (tiny random model), anything else a name/alias/directory."""
    return json.loads(text) if text.lstrip().startswith("{") else text


def safetensors_tensors(folder: Path) -> dict[str, int]:
    """Tensor name -> bytes of its data, over every ``*.safetensors`` file in ``folder`` (read from the headers:
    8-byte little-endian header length, then JSON with each tensor's ``data_offsets``)."""
    sizes = {}
    for file in sorted(folder.glob("*.safetensors")):
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        for name, info in header.items():
            if name != "__metadata__":
                begin, end = info["data_offsets"]
                sizes[name] = end - begin
    return sizes


def quantized_layer_names(model: torch.nn.Module) -> list[str]:
    """Modules whose weight is a torchao quantized tensor (``IntxUnpackedToInt8Tensor``)."""
    return [name for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and type(m.weight).__name__ == "IntxUnpackedToInt8Tensor"]


def export_sizes(folder: Path, layers: list[str]) -> dict:
    """Bytes on disk of ``folder``'s weight files and of their tensors, split into ``layers``' tensors and the rest."""
    tensors = safetensors_tensors(folder)
    prefixes = tuple(f"{name}." for name in layers)
    in_layers = sum(b for k, b in tensors.items() if k.startswith(prefixes))
    return {"disk_bytes": sum(f.stat().st_size for f in folder.glob("*.safetensors")),
            "tensor_bytes": sum(tensors.values()), "quantized_layers_tensor_bytes": in_layers,
            "other_tensor_bytes": sum(tensors.values()) - in_layers,
            "files": sorted(f.name for f in folder.glob("*.safetensors"))}


def memory_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters in memory; a tensor subclass counts its inner tensors (codes, scales, ...)."""
    def nbytes(t: torch.Tensor) -> int:
        if hasattr(t, "__tensor_flatten__"):
            names, _ = t.__tensor_flatten__()
            return sum(nbytes(getattr(t, n)) for n in names)
        return t.numel() * t.element_size()

    return sum(nbytes(p.data if isinstance(p, torch.nn.Parameter) else p) for p in model.parameters())


def benchmark_prompts(tokenizer, n: int, max_tokens: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """``n`` built-in held-out free-form prompts in the model's chat format, left-padded token ids and mask."""
    from datamodules.freeform_prompts import load_prompt_records
    from lm.tensors import pad_sequences
    from lm.tokenizers import resolve_prompt_template

    template = resolve_prompt_template(tokenizer, None, "quantized_export prompts")
    prompts = [r["prompt"] for r in load_prompt_records("freeform", None, n, 0, template, split="heldout")]
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"][-max_tokens:] for p in prompts]
    return (pad_sequences(ids, tokenizer.pad_token_id, left=True),
            pad_sequences([[1] * len(i) for i in ids], 0, left=True), prompts)


def calibration_ids(tokenizer, config) -> list[torch.Tensor]:
    """GPTQ/AWQ calibration token ids as QDPO makes them (:meth:`lit_modules.QDPO.calibration_prompts`)."""
    from datamodules.freeform_prompts import load_prompt_records
    from lm.tokenizers import resolve_prompt_template

    if not config.calibrated:
        return []
    template = resolve_prompt_template(tokenizer, None, "QDPO calibration")
    records = load_prompt_records(config.calibration, None, config.calibration_size, config.calibration_seed,
                                  template, split="train", where="quantizer calibration")
    return [torch.tensor(tokenizer(r["prompt"], add_special_tokens=False)["input_ids"]) for r in records]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def machine(device: torch.device) -> str:
    from benchmarks.speed.optimizer_step import device_name

    return device_name(device)


def main(argv: list[str] | None = None) -> dict:
    parser = benchmark_parser(__doc__, "fewer repeats and tokens, small calibration set")
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="alias, save_pretrained directory or JSON config dict (default %(default)s)")
    parser.add_argument("--quantizers", default="rtn,gptq", help="comma-separated of rtn, hqq, gptq, awq")
    parser.add_argument("--bits", default="4", help="comma-separated bit widths (2..8)")
    parser.add_argument("--group-size", type=int, default=32, help="0 = one scale per output row")
    parser.add_argument("--calibration-size", type=int, default=None,
                        help="GPTQ/AWQ calibration prompts (default: QuantizerConfig's, 8 with --quick)")
    parser.add_argument("--batch", type=int, default=8, help="prompts decoded together")
    parser.add_argument("--prompt-tokens", type=int, default=64, help="each prompt cut to its last N tokens")
    parser.add_argument("--new-tokens", type=int, default=None, help="greedy tokens decoded per prompt (default 32)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 5, 3 with --quick)")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    parser.add_argument("--note", default=None, help="a remark about the machine kept in the JSON (e.g. shared)")
    parser.add_argument("--update-docs", type=Path, default=None, metavar="RESULTS_JSON",
                        help="only fill the generated block of --doc from RESULTS_JSON")
    parser.add_argument("--doc", type=Path, default=DOC)
    args = parser.parse_args(argv)
    if args.update_docs:
        update_docs(args.update_docs, args.doc)
        return {}
    apply_threads(args)
    from lm.hf import load_causal_lm
    from lm.quantization import QuantizerConfig, quantizable_linears, quantize, save_quantized
    from lm.sampling import generate
    from lm.tokenizers import byte_tokenizer, load_tokenizer

    device = torch.device(args.device)
    new_tokens = args.new_tokens or (8 if args.quick else 32)
    repeats = args.repeats or (3 if args.quick else 5)
    spec = parse_model(args.model)
    group_size = args.group_size or None
    calibration_size = {"calibration_size": args.calibration_size or 8} if args.quick or args.calibration_size else {}
    configs = [QuantizerConfig(name, int(bits), group_size, **calibration_size)
               for name in args.quantizers.split(",") if name for bits in args.bits.split(",") if bits]

    tokenizer = byte_tokenizer() if isinstance(spec, dict) else load_tokenizer(None, spec)
    fp = load_causal_lm(spec, vocab_size=len(tokenizer), dtype="float32", seed=0).eval()
    ids, mask, prompts = benchmark_prompts(tokenizer, args.batch, args.prompt_tokens)
    ids, mask = ids.to(device), mask.to(device)
    n_params = sum(p.numel() for p in fp.parameters())

    @torch.inference_mode()
    def logits(model) -> torch.Tensor:
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        return model(input_ids=ids, attention_mask=mask, position_ids=positions).logits.float()

    # every variant's quantized layers are the same nn.Linear layers (lm_head excluded): FP's are split by them too
    layers = quantizable_linears(fp, group_size)
    n_weights = sum(fp.get_submodule(name).weight.numel() for name in layers)
    n_groups = sum(fp.get_submodule(name).weight.numel() // (group_size or fp.get_submodule(name).in_features)
                   for name in layers)
    tmp = Path(tempfile.mkdtemp(prefix="quantized_export_"))
    variants: dict[str, dict] = {}
    try:
        for config in [None, *configs]:
            tag = "fp32" if config is None else config.tag
            start = time.perf_counter()
            if config is None:
                model, folder = fp, tmp / tag
                fp.save_pretrained(folder)
            else:
                model = quantize(fp, config, calibration_ids(tokenizer, config)).eval()
                if quantized_layer_names(model) != layers:
                    raise RuntimeError(f"{tag}: quantized {quantized_layer_names(model)}, expected {layers}")
                folder = save_quantized(model, tmp / tag, config)
            export_s = time.perf_counter() - start
            sizes = export_sizes(folder, layers)
            reloaded = load_causal_lm(str(folder)).eval().to(device)
            diff = (logits(reloaded) - logits(model.to(device))).abs().max().item()
            variants[tag] = {"config": None if config is None else config.key(), "export_s": export_s, **sizes,
                             "memory_bytes": memory_bytes(reloaded), "reload_max_abs_logit_diff": diff,
                             "model": reloaded, "decode_s": [], "prefill_s": []}
            if config is not None:
                variants[tag]["packed_ideal_quantized_layers_bytes"] = n_weights * config.bits // 8 + 4 * n_groups
            del model
            print(f"{tag}: quantized + exported in {export_s:.1f} s, {sizes['disk_bytes'] / 2**20:.2f} MiB on disk, "
                  f"reload max |dlogit| {diff:g}", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    tags = list(variants)

    @torch.inference_mode()
    def prefill(model) -> float:
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        _sync(device)
        start = time.perf_counter()
        model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=1)
        _sync(device)
        return time.perf_counter() - start

    def decode(model) -> tuple[float, torch.Tensor]:
        _sync(device)
        start = time.perf_counter()
        out = generate(model, ids, mask, new_tokens, temperature=0.0, eos_id=None, pad_id=tokenizer.pad_token_id)
        _sync(device)
        return time.perf_counter() - start, out.response_ids

    tokens = {}
    for tag in tags:  # warm-up
        prefill(variants[tag]["model"])
        tokens[tag] = decode(variants[tag]["model"])[1]
    for r in range(repeats):
        for tag in tags[r % len(tags):] + tags[:r % len(tags)]:
            v = variants[tag]
            v["prefill_s"].append(prefill(v["model"]))
            v["decode_s"].append(decode(v["model"])[0])
        print(f"round {r + 1}/{repeats}: " + ", ".join(
            f"{t} {args.batch * new_tokens / variants[t]['decode_s'][-1]:.1f} tok/s" for t in tags),
              file=sys.stderr, flush=True)

    prompt_tokens = int(mask.sum())
    fp_row = variants["fp32"]
    rows = {}
    for tag, v in variants.items():
        v.pop("model")
        decode_tps = [args.batch * new_tokens / s for s in v["decode_s"]]
        prefill_tps = [prompt_tokens / s for s in v["prefill_s"]]
        fp_decode = [args.batch * new_tokens / s for s in fp_row["decode_s"]]
        fp_prefill = [prompt_tokens / s for s in fp_row["prefill_s"]]
        rows[tag] = {**v,
                     "decode_tokens_per_s": statistics.median(decode_tps),
                     "prefill_tokens_per_s": statistics.median(prefill_tps),
                     "decode_speed_vs_fp": statistics.median(decode_tps) / statistics.median(fp_decode),
                     "decode_speed_vs_fp_per_round_median": statistics.median(
                         a / b for a, b in zip(decode_tps, fp_decode)),
                     "prefill_speed_vs_fp": statistics.median(prefill_tps) / statistics.median(fp_prefill),
                     "disk_bytes_vs_fp": v["disk_bytes"] / fp_row["disk_bytes"],
                     "quantized_layers_bytes_vs_fp": (v["quantized_layers_tensor_bytes"]
                                                      / fp_row["quantized_layers_tensor_bytes"]
                                                      if fp_row["quantized_layers_tensor_bytes"] else None),
                     "memory_bytes_vs_fp": v["memory_bytes"] / fp_row["memory_bytes"],
                     "greedy_token_match_vs_fp": (tokens[tag] == tokens["fp32"]).float().mean().item()}
    result = {
        "benchmark": "quantized_export",
        "command": "python -m benchmarks.speed.quantized_export " + shlex.join(sys.argv[1:] if argv is None else argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(device), "device": args.device, "torch": torch.__version__,
        "threads": torch.get_num_threads(), "note": args.note,
        "settings": {"model": args.model, "parameters": n_params, "dtype": "float32",
                     "tied_embeddings": bool(getattr(fp.config, "tie_word_embeddings", False)),
                     "quantized_layers": len(layers), "quantized_layers_weights": n_weights,
                     "quantized_layers_groups": n_groups,
                     "group_size": group_size, "batch": args.batch, "prompt_tokens_max": ids.shape[1],
                     "prompt_tokens_total": prompt_tokens, "new_tokens": new_tokens, "repeats": repeats,
                     "warmup": "one prefill + one decode per variant",
                     "decode": "lm.sampling.generate, greedy (temperature 0), eos_id=None, default KV cache "
                               "(dynamic on CPU), reloaded model",
                     "prompts": "built-in free-form held-out prompts (seed 0) in the model's chat format",
                     "export_format": "torchao IntxUnpackedToInt8Tensor: int8 code per weight + fp32 scale + int8 "
                                      "zero point per group (save_quantized); FP: save_pretrained fp32 safetensors",
                     "statistic": "median over repeats; variants interleaved, order rotated each round"},
        "variants": rows,
    }
    print(json.dumps(result))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def docs_block(result: dict, source: str) -> str:
    """The markdown of the generated block: a table of every variant and what it shows, from ``result``."""
    rows = result["variants"]
    s = result["settings"]
    lines = [f"Generated from `{source}` by `python -m benchmarks.speed.quantized_export --update-docs {source}`; "
             f"measured by `{result['command']}` on {result['machine']}, {result['threads']} torch thread(s), "
             f"{result['date'][:10]}. Model `{s['model']}` ({s['parameters'] / 1e6:.1f}M parameters, fp32), group size "
             f"{s['group_size']}; greedy decoding of {s['new_tokens']} tokens for {s['batch']} prompts with "
             f"`lm.sampling.generate`, medians of {s['repeats']} interleaved rounds.", "",
             "| variant | weight files | × FP | quantized layers | × FP | decode tok/s | × FP | prefill tok/s | × FP "
             "| reload max abs logit diff | greedy tokens = FP (position-wise) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for tag, r in rows.items():
        layer_ratio = r["quantized_layers_bytes_vs_fp"]
        lines.append(f"| {tag} | {_mib(r['disk_bytes'])} | {r['disk_bytes_vs_fp']:.3f} | "
                     f"{_mib(r['quantized_layers_tensor_bytes'])} | "
                     f"{'' if layer_ratio is None else f'{layer_ratio:.3f}'} | {r['decode_tokens_per_s']:.1f} | "
                     f"{r['decode_speed_vs_fp']:.2f} | {r['prefill_tokens_per_s']:.0f} | {r['prefill_speed_vs_fp']:.2f} "
                     f"| {r['reload_max_abs_logit_diff']:.3g} | {r['greedy_token_match_vs_fp']:.0%} |")
    lines.append("")
    fp = rows["fp32"]
    quantized = {tag: r for tag, r in rows.items() if tag != "fp32"}
    span = lambda v, f: f"{min(v):{f}}" if f"{min(v):{f}}" == f"{max(v):{f}}" else f"{min(v):{f}}–{max(v):{f}}"  # noqa: E731
    for bits in sorted({r["config"]["bits"] for r in quantized.values()}):
        same = [r for r in quantized.values() if r["config"]["bits"] == bits]
        shrink = span([1 / r["quantized_layers_bytes_vs_fp"] for r in same], ".2f")
        packed = span([r["quantized_layers_tensor_bytes"] / r["packed_ideal_quantized_layers_bytes"] for r in same],
                      ".2f")
        ideal = span([fp["quantized_layers_tensor_bytes"] / r["packed_ideal_quantized_layers_bytes"] for r in same],
                     ".2f")
        lines.append(
            f"- **int{bits}** ({', '.join(t for t, r in quantized.items() if r['config']['bits'] == bits)}): the "
            f"quantized layers take {shrink}× less room than in fp32 — codes are stored one per byte (int8), plus an "
            f"fp32 scale and an int8 zero point per group, so int{bits} is {packed}× the size of packed int{bits} "
            f"codes with fp32 scales ({ideal}× smaller than fp32). The whole weight file is "
            f"{span([1 / r['disk_bytes_vs_fp'] for r in same], '.2f')}× smaller: embeddings and norms stay fp32"
            + (" (the embedding is tied to the output layer, which is not quantized)." if s["tied_embeddings"] else "."))
    decode, prefill = [r["decode_speed_vs_fp"] for r in quantized.values()], [r["prefill_speed_vs_fp"]
                                                                                 for r in quantized.values()]
    exact = [t for t, r in quantized.items() if r["reload_max_abs_logit_diff"] == 0]
    lines.append(f"- **Speed**: decoding at {span(decode, '.2f')}× FP's tokens/s"
                 + (" (slower: on this CPU the weights are dequantized to fp32 in every matmul)" if max(decode) < 0.95
                    else "") + f", prefill {span(prefill, '.2f')}× FP's. Reloaded vs in-memory logits: max abs diff 0 "
                 f"(the export is exact) for {len(exact)} of {len(quantized)} variants.")
    if result.get("note"):
        lines += ["", f"Note on the run: {result['note']}"]
    return "\n".join(lines)


def update_docs(results_json: Path, doc: Path = DOC) -> None:
    from benchmarks.claim_common import fill_block

    result = json.loads(Path(results_json).read_text())
    fill_block(Path(doc), DOC_BEGIN, DOC_END, docs_block(result, Path(results_json).as_posix()))


if __name__ == "__main__":
    main()
