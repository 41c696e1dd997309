"""FSDP2 sharding of the LLM modules through Lightning's ``ModelParallelStrategy`` (docs/sharding.md).

Every LLM module (``CausalLM``, ``MiniLLM``, ``DPO``; ``QDPO`` refuses) builds each of its networks with
:func:`build_causal_lm` in its ``configure_model`` hook (:class:`lit_modules.base.DeferredNetworksModule`).
Under any strategy other than ``ModelParallelStrategy`` that is the plain load, so single-device and DDP runs
are unchanged. Under it, each Hugging Face causal LM of the module is built on the meta device, sharded with
PyTorch's ``fully_shard`` on the strategy's data-parallel mesh and filled from rank 0's whole copy
(:func:`materialize_from_rank0`): every decoder layer is its own FSDP unit (its
parameters are all-gathered just before its forward/backward and freed after) and the root holds the rest
(embeddings, final norm, ``lm_head``). Each rank then keeps 1/N of every parameter, of its gradient and of the
optimizer state (AdamW's moments are created on the local shards).

Options live on :class:`FSDP2Strategy` (a ``ModelParallelStrategy`` with three more arguments), so a config
only changes ``trainer.strategy``:

- ``mixed_precision``: ``"bf16"`` = ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``: the
  all-gathered parameters and the compute are bf16, gradients are reduced in fp32, and the sharded master
  weights and the optimizer state stay in fp32;
- ``activation_checkpointing``: recompute each decoder layer's activations in the backward pass;
- ``shard_frozen``: shard the frozen teacher/reference too (default) or keep a whole copy on every rank
  (``False``: no all-gathers in its forwards, for small frozen models).

A plain ``ModelParallelStrategy`` uses the defaults (fp32, no checkpointing, frozen models sharded).
"""

from __future__ import annotations

from pathlib import Path
from collections.abc import Callable
from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

MIXED_PRECISION = (None, "bf16")


class FSDP2Strategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` plus the sharding options :func:`shard_module` reads.

    Args:
        mixed_precision: ``None`` (fp32) or ``"bf16"`` (bf16 params/compute, fp32 gradient reduction).
        activation_checkpointing: recompute decoder-layer activations in the backward pass.
        shard_frozen: shard frozen teachers/references (``False``: a whole copy on every rank).
        data_parallel_size, tensor_parallel_size, save_distributed_checkpoint, process_group_backend, timeout:
            see ``lightning.pytorch.strategies.ModelParallelStrategy`` (tensor parallelism is not applied by
            the modules: keep ``tensor_parallel_size`` 1).
    """

    def __init__(self, mixed_precision: str | None = None, activation_checkpointing: bool = False,
                 shard_frozen: bool = True, data_parallel_size: int | str = "auto",
                 tensor_parallel_size: int | str = 1, **kwargs: Any):
        if mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"FSDP2Strategy mixed_precision={mixed_precision!r} is not one of {MIXED_PRECISION}")
        if data_parallel_size == "auto" and tensor_parallel_size == 1:
            data_parallel_size = "auto_all"  # resolved in setup_environment: every process is data parallel
        super().__init__(data_parallel_size=data_parallel_size, tensor_parallel_size=tensor_parallel_size, **kwargs)
        self.mixed_precision, self.activation_checkpointing = mixed_precision, activation_checkpointing
        self.shard_frozen = shard_frozen

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto_all":
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()


def is_model_parallel(module) -> bool:
    """True when ``module`` is attached to a trainer running ``ModelParallelStrategy`` (or a subclass)."""
    trainer = getattr(module, "_trainer", None)
    return trainer is not None and isinstance(trainer.strategy, ModelParallelStrategy)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder blocks of a Hugging Face causal LM (``model.model.layers`` for Llama/Qwen/Mistral...,
    ``transformer.h`` for GPT-2 style models)."""
    for path in ("model.layers", "transformer.h", "model.decoder.layers", "gpt_neox.layers"):
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList):
            return list(obj)
    raise ValueError(f"cannot shard {type(model).__name__}: no decoder layer list found (looked for model.layers, "
                     "transformer.h, model.decoder.layers, gpt_neox.layers)")


def mixed_precision_policy(mixed_precision: str | None):
    """FSDP2 ``MixedPrecisionPolicy`` for ``"bf16"`` (bf16 params/compute, fp32 reduce), ``None`` for fp32."""
    if mixed_precision is None:
        return None
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def shard_causal_lm(model: nn.Module, mesh, mixed_precision: str | None = None,
                    activation_checkpointing: bool = False, frozen: bool = False) -> nn.Module:
    """``fully_shard`` every decoder layer of ``model``, then the root, on ``mesh`` (a 1-D device mesh).
    ``frozen``: the root reshards after its forward too (FSDP2 keeps a root unsharded from forward to backward,
    and a frozen model has no backward). ``model`` may be on the meta device (then see
    :func:`materialize_from_rank0`). Idempotent: an already sharded model is returned as is."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if isinstance(model, FSDPModule):
        return model
    layers = decoder_layers(model)
    if activation_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

        ids = {id(layer) for layer in layers}
        apply_activation_checkpointing(model, check_fn=lambda m: id(m) in ids)
        layers = decoder_layers(model)  # now the checkpoint wrappers
    kwargs: dict[str, Any] = {"mesh": mesh}
    policy = mixed_precision_policy(mixed_precision)
    if policy is not None:
        kwargs["mp_policy"] = policy
    for layer in layers:
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs, **({"reshard_after_forward": True} if frozen else {}))
    if not any(p.is_meta for p in model.parameters()):
        gather_once(model)
    return model


def gather_once(model: nn.Module) -> None:
    """All-gather every FSDP group of ``model`` once and free again. FSDP2 allocates a group's unsharded
    parameters at its first all-gather; done inside the sampler's ``torch.inference_mode`` they would be
    inference tensors that a later training forward cannot refill, so the first one happens here, in normal
    mode."""
    from torch.distributed.fsdp import FSDPModule

    for group in [m for m in model.modules() if isinstance(m, FSDPModule)]:
        group.unshard()
        group.reshard()


_WRAPPED = "_checkpoint_wrapped_module."  # the name part activation checkpointing inserts


@torch.no_grad()
def materialize_from_rank0(model: nn.Module, source: nn.Module | None, device: torch.device) -> nn.Module:
    """Allocate the local shards of the sharded meta-device ``model`` on ``device`` and fill them with the
    weights of ``source``, the same model built whole on rank 0 (``None`` on the other ranks), which is all
    they ever receive of it. One tensor at a time, rank 0 broadcasts the whole tensor and every rank copies its
    rows into its shard: FSDP2 shards dim 0 as ``torch.chunk(tensor, N)`` does, rank r holding chunk r. Buffers
    (rotary frequencies) are not sharded: every rank keeps the whole one. No rank holds more than its shards
    plus one whole tensor (rank 0: plus ``source``). Collective."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    model.to_empty(device=device)
    whole = {} if source is None else dict(source.named_parameters()) | dict(source.named_buffers())
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        full = whole[name.replace(_WRAPPED, "")].to(device) if source is not None else (
            torch.empty(tensor.shape, dtype=tensor.dtype, device=device))
        dist.broadcast(full, src=0)
        if isinstance(tensor, DTensor):
            mesh = tensor.device_mesh
            chunks = full.chunk(mesh.size(), dim=0)
            rank = mesh.get_local_rank()
            full = chunks[rank] if rank < len(chunks) else full[:0]
        if full.shape != local.shape:
            raise RuntimeError(f"materialize_from_rank0: {name}'s local shard has shape {tuple(local.shape)}, its "
                               f"rows of the whole tensor {tuple(full.shape)} (not a dim-0 FSDP2 shard)")
        local.copy_(full)
    return model


def build_causal_lm(module, load: Callable[[], nn.Module], frozen: bool = False) -> nn.Module:
    """Build one causal LM of ``module`` with ``load()`` (the module's loader: a name, directory or config dict),
    sharded when ``module`` runs under ``ModelParallelStrategy``; ``frozen``: eval mode, no gradients.

    Outside that strategy: ``load()`` as is (single device, DDP: every process builds the whole model).
    Under it: rank 0 runs ``load()`` (reads the pretrained weights, or draws the seeded random initialisation
    a single process draws); every rank builds the same architecture on the meta device (no memory), shards
    it (:func:`shard_causal_lm`), allocates its local shards and receives its slices of rank 0's weights
    (:func:`materialize_from_rank0`); rank 0 then frees its whole copy. So ranks > 0 never hold more than their
    shards (and, like any FSDP run, one all-gathered unit at a time), rank 0 one whole model at a time. A frozen
    model with ``shard_frozen=False`` is built whole on every rank and moved to its device."""
    import torch.distributed as dist

    if not is_model_parallel(module):
        return _freeze(load()) if frozen else load()
    strategy = module.trainer.strategy
    if frozen and not getattr(strategy, "shard_frozen", True):
        return _freeze(load()).to(strategy.root_device)
    with torch.device("meta"):
        model = load()
    if frozen:
        _freeze(model)
    shard_causal_lm(model, data_parallel_mesh(module), frozen=frozen, **_options(strategy, frozen))
    materialize_from_rank0(model, load() if dist.get_rank() == 0 else None, strategy.root_device)
    gather_once(model)  # rank 0's whole copy is freed by now: the two do not add up
    return model


def _freeze(model: nn.Module) -> nn.Module:
    return model.eval().requires_grad_(False)


def data_parallel_mesh(module):
    """The ``data_parallel`` mesh of ``module``'s strategy; an error when tensor parallelism is asked for."""
    mesh = module.device_mesh
    if "tensor_parallel" in (mesh.mesh_dim_names or ()) and mesh["tensor_parallel"].size() > 1:
        raise ValueError(f"{type(module).__name__}: tensor parallelism is not supported by the LLM modules; set "
                         "trainer.strategy.init_args.tensor_parallel_size: 1 (all processes data parallel)")
    return mesh["data_parallel"] if mesh.mesh_dim_names else mesh


def _options(strategy, frozen: bool) -> dict[str, Any]:
    """The strategy's sharding options (defaults for a plain ``ModelParallelStrategy``); frozen models never
    checkpoint activations (no backward)."""
    return {"mixed_precision": getattr(strategy, "mixed_precision", None),
            "activation_checkpointing": not frozen and getattr(strategy, "activation_checkpointing", False)}


def shard_module(module, trainable: list[nn.Module | None], frozen: list[nn.Module | None] = ()) -> bool:
    """Shard ``module``'s already built (whole) causal LMs in place when it runs under ``ModelParallelStrategy``
    (networks built before the trainer attached, e.g. read before ``fit``); return whether it did.

    ``trainable`` models are always sharded; ``frozen`` ones (teacher, reference; ``None`` entries skipped) too
    unless the strategy says ``shard_frozen=False``, then they stay whole on the rank's device."""
    if not is_model_parallel(module):
        return False
    strategy = module.trainer.strategy
    mesh = data_parallel_mesh(module)
    for model in trainable:
        if model is not None:
            shard_causal_lm(model, mesh, **_options(strategy, False))
    for model in frozen:
        if model is None:
            continue
        if getattr(strategy, "shard_frozen", True):
            shard_causal_lm(model, mesh, frozen=True, **_options(strategy, True))
        else:
            model.to(strategy.root_device)
    return True


def local_bytes(tensors) -> int:
    """Bytes this rank holds for ``tensors``: a DTensor counts its local shard only."""
    from torch.distributed.tensor import DTensor

    total = 0
    for t in tensors:
        if t is None:
            continue
        local = t.to_local() if isinstance(t, DTensor) else t
        total += local.numel() * local.element_size()
    return total


def memory_per_rank(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
    """Local bytes of ``model``'s trainable parameters, their gradients, its frozen parameters, and the tensors
    of ``optimizer``'s state on this rank."""
    params = list(model.parameters())
    state = [] if optimizer is None else [v for s in optimizer.state.values() for v in s.values()
                                          if isinstance(v, torch.Tensor) and v.ndim > 0]
    return {"trainable_params": local_bytes(p for p in params if p.requires_grad),
            "grads": local_bytes(p.grad for p in params if p.requires_grad),
            "frozen_params": local_bytes(p for p in params if not p.requires_grad),
            "optimizer_state": local_bytes(state)}


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole (unsharded) state dict of ``model`` on CPU; with a sharded model a collective call that
    returns it on rank 0 only (an empty dict elsewhere)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import FSDPModule

    if not any(isinstance(m, FSDPModule) for m in model.modules()):
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def unsharded_copy(model: nn.Module) -> nn.Module:
    """A plain (unsharded, CPU) Hugging Face model with ``model``'s weights; collective when ``model`` is
    sharded, and then ``None`` on every rank but 0."""
    from torch.distributed.fsdp import FSDPModule
    from transformers import AutoModelForCausalLM

    if not any(isinstance(m, FSDPModule) for m in model.modules()):
        return model
    state = full_state_dict(model)
    if torch.distributed.get_rank() != 0:
        return None
    state = {k.replace("_checkpoint_wrapped_module.", ""): v for k, v in state.items()}
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(model.config, dtype=next(iter(state.values())).dtype)
    plain.load_state_dict(state, assign=True, strict=False)
    plain.tie_weights()
    unwrap = {k.replace("_checkpoint_wrapped_module.", ""): v for k, v in model.named_buffers()}
    for name, buf in list(plain.named_buffers()):  # non-persistent buffers (rotary frequencies): never sharded
        if buf.is_meta and name in unwrap:
            owner, _, leaf = name.rpartition(".")
            plain.get_submodule(owner).register_buffer(leaf, unwrap[name].detach().cpu().clone(), persistent=False)
    missing = [n for n, t in list(plain.named_parameters()) + list(plain.named_buffers()) if t.is_meta]
    if missing:
        raise RuntimeError(f"export of a sharded model: no gathered value for {missing[:5]}")
    return plain


def export_pretrained(module, model: nn.Module, tokenizer, path: str | Path) -> Path | None:
    """``save_pretrained`` ``model`` and ``tokenizer`` into ``path`` from rank 0; from sharded weights they
    are gathered once (every rank must call this). Returns the path on rank 0, ``None`` elsewhere."""
    from lm.hf import save_pretrained_with_tokenizer

    plain = unsharded_copy(model)
    trainer = getattr(module, "_trainer", None)
    if plain is None or (trainer is not None and not trainer.is_global_zero):
        return None
    return save_pretrained_with_tokenizer(plain, tokenizer, path)


def truncate_at_eos(rollout, eos_id: int, pad_id: int):
    """A fixed-length rollout (sampled with ``eos_id=None``) cut as if sampling had stopped at EOS.

    With e_t = 1[y_t = EOS]: mask_t = 1 − 1[Σ_{t'<t} e_t' > 0] (the EOS itself kept), y_t → ``pad_id`` where
    mask_t = 0, and the tokens after the last row's EOS dropped: T' = max_b Σ_t mask_{b,t}. Token t's law depends
    only on y_<t, so the kept tokens and log-probs are those of sampling with ``eos_id`` (same random draws);
    the log-probs at masked positions are not the pad's (they are masked everywhere they are used).

    Why: under FSDP every forward is a collective, so all ranks must run the same number of decode steps; an
    early exit "all rows of this rank are done" would differ between ranks and deadlock (docs/sharding.md).
    """
    from lm.sampling import Rollout

    ended_before = (rollout.response_ids == eos_id).long().cumsum(1) - (rollout.response_ids == eos_id).long()
    mask = rollout.response_mask * (ended_before == 0).long()
    n = int(mask.sum(1).max())
    ids = torch.where(mask.bool(), rollout.response_ids, torch.full_like(rollout.response_ids, pad_id))
    cut = {k: None if v is None else v[:, :n] for k, v in vars(rollout).items()
           if k in ("student_logprobs", "teacher_logprobs", "mix_logprobs")}
    return Rollout(rollout.prompt_ids, rollout.prompt_mask, ids[:, :n], mask[:, :n], **cut)
