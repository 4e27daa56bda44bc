"""Many processes, one run: torchrun's environment, FSDP2 sharding, rank-aware data, DCP checkpoints.

    torchrun --nproc_per_node=N train.py --stage sft --config cfg.toml

Every rank builds the stage as a single process would (same seed, so the same initial weights), except
that for pt, sft, dpo and kto only rank 0 reads the checkpoint and the other ranks build on the meta
device; then `prepare_stage` shards it, filling those ranks' shards from rank 0 (`load_sharded_from_rank0`):

- FSDP2 (`torch.distributed.fsdp.fully_shard`, Zhao et al. 2023 "PyTorch FSDP"; ZeRO-3, Rajbhandari et
  al. 2020): each decoder block is one FSDP unit and the root (embeddings, final norm, heads) another.
  A rank holds 1/N of every weight, gradient and AdamW moment; a unit's full weights exist only while it
  runs (all-gather before, reduce-scatter of the gradients after, averaged over ranks).
- On GPU a MixedPrecisionPolicy all-gathers weights in bf16 and reduces gradients in fp32; the sharded
  master weights and AdamW states stay fp32. [train] fsdp_cpu_offload keeps them in host memory.
- Data: each rank reads a disjoint slice of the single-process order (`data.BatchIterator.shard`):
  micro-batch k of rank r is micro-batch k * N + r of one process. With gradients averaged over ranks,
  an N-rank step with grad_accum = G equals a one-process step with grad_accum = G * N:

      global batch = micro_batch_size * grad_accum * world_size   (examples per optimizer step)

Checkpoints go through torch.distributed.checkpoint (DCP): each rank writes its shards of the trainable
weights and optimizer states; DCP records the global layout, so a checkpoint loads on another world
size (or in one plain process). The run state (step, schedule, data position, stage state) is the same
on every rank and is written once; RNG states are written per rank. At the end the full weights are
gathered to rank 0 (on the CPU) and saved as a Hugging Face directory or a LoRA adapter, as a single
process would. See docs/distributed.md.
"""

from __future__ import annotations

import copy
import functools
import gc
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
import torch.nn as nn

from minirlhf.config import Config

logger = logging.getLogger(__name__)


@dataclass
class DistContext:
    """This process's place in the run and the sharding options it applies."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    cpu_offload: bool = False
    reshard_after_forward: bool = True
    mixed_precision: bool = False
    skeleton: nn.Module | None = field(default=None, repr=False)  # meta-device copy of the unsharded model

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        dist.barrier()

    def mean_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """Each metric averaged over ranks (every rank must pass the same keys)."""
        keys = sorted(metrics)
        t = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=_comm_device())
        dist.all_reduce(t)
        return {k: float(v) / self.world_size for k, v in zip(keys, t.tolist())}

    def sum(self, value: float) -> float:
        t = torch.tensor([float(value)], dtype=torch.float64, device=_comm_device())
        dist.all_reduce(t)
        return float(t)


def init_distributed(cfg: Config) -> DistContext | None:
    """A process group from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT):
    nccl on CUDA, gloo on CPU. None when not launched by torchrun (no WORLD_SIZE): a plain process."""
    if "WORLD_SIZE" not in os.environ:
        return None
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        if not dist.is_initialized():
            dist.init_process_group("gloo")
    ctx = DistContext(rank=dist.get_rank(), local_rank=local_rank, world_size=dist.get_world_size(),
                      device=device, cpu_offload=cfg.train.fsdp_cpu_offload,
                      reshard_after_forward=cfg.train.fsdp_reshard_after_forward,
                      mixed_precision=device.type == "cuda" and cfg.train.precision != "fp32")
    if not ctx.is_main:  # one rank speaks; the others only warn
        logging.getLogger("minirlhf").setLevel(logging.WARNING)
    return ctx


def close(ctx: DistContext | None = None, barrier: bool = True) -> None:
    """Tear the process group down, after every rank got here when `barrier` (a rank that leaves early
    while another still has collectives in flight makes gloo abort the process).

    Call it on every way out, errors included (then with barrier=False: the other ranks may never get
    to a barrier). A group still alive when the interpreter shuts down can abort the process ("terminate
    called without an active exception", once in the distributed tests) while gloo's worker threads are
    torn down; and destroy_process_group() alone does not end it while FSDP's state still refers to it,
    which a finished trainer does from reference cycles (3 FSDP modules alive at this point, measured).
    So the garbage is collected first, and the group ends here."""
    if dist.is_initialized():
        if barrier:
            dist.barrier()
        gc.collect()
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------------
# collectives that are no-ops in a plain process (stages call these; no context needed)


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def all_mean(value: float) -> float:
    """The mean of a float over ranks (the value itself in a plain process)."""
    if not dist.is_initialized():
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return float(t) / dist.get_world_size()


def gather_cat(x: torch.Tensor) -> torch.Tensor:
    """Every rank's x (same shape on each) concatenated along dim 0 in rank order: [n] -> [N * n]."""
    if not dist.is_initialized():
        return x
    y = x.detach().to(_comm_device())
    parts = [torch.empty_like(y) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, y)
    return torch.cat(parts).to(x.device)


# --------------------------------------------------------------------------------------------------
# FSDP2


def fsdp_kwargs(ctx: DistContext) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy

    mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if ctx.mixed_precision
          else MixedPrecisionPolicy())
    offload = CPUOffloadPolicy(pin_memory=ctx.device.type == "cuda") if ctx.cpu_offload else OffloadPolicy()
    return {"mesh": mesh, "mp_policy": mp, "offload_policy": offload,
            "reshard_after_forward": ctx.reshard_after_forward}


def shard_model(module: nn.Module, ctx: DistContext) -> list[nn.Module]:
    """fully_shard every decoder block, then each model root, in place; returns the roots.

    A Transformer is a root; a RewardModel (backbone + scalar head) is one root holding its backbone's
    embeddings and norm; any other module (ppo's policy + critic pair) is searched for those. The
    methods the stages call instead of forward (`hidden_states`, `decode_step`, `values`) are registered
    so that they gather the root's weights as forward does.
    """
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    from minirlhf.heads import RewardModel
    from minirlhf.model import Transformer

    kw = fsdp_kwargs(ctx)
    roots: list[nn.Module] = []

    def visit(m: nn.Module) -> None:
        if isinstance(m, (Transformer, RewardModel)):
            backbone = m.backbone if isinstance(m, RewardModel) else m
            for layer in backbone.layers:
                fully_shard(layer, **kw)
            # the root's weights (embeddings, heads) are used right after its forward (the fused LM-head
            # loss reads lm_head.weight) and again at the start of backward: keep them gathered
            fully_shard(m, **{**kw, "reshard_after_forward": False})
            methods = ("values",) if isinstance(m, RewardModel) else ("hidden_states", "decode_step")
            for name in methods:
                register_fsdp_forward_method(m, name)
            roots.append(m)
            return
        for child in m.children():
            visit(child)

    visit(module)
    if not roots:
        raise TypeError(f"distributed.shard_model: no Transformer or RewardModel inside {type(module).__name__}")
    return roots


def fsdp_modules(module: nn.Module) -> list[nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in module.modules() if isinstance(m, FSDPModule)]


@contextmanager
def unsharded(module: nn.Module, reshard_after_forward: bool = True) -> Iterator[nn.Module]:
    """Full weights on every rank for the duration (ppo's generation), sharded again on exit.

    Generation runs one forward per new token and stops when every row has stopped, so ranks make
    different numbers of forwards; with per-forward all-gathers they would deadlock. Gathering every
    unit once before (FSDPModule.unshard) and keeping it gathered through those forwards
    (set_reshard_after_forward(False)) needs no collective inside the loop. Costs the full weights
    (in the all-gather dtype) on each rank while generating.
    """
    from minirlhf.heads import RewardModel
    from minirlhf.model import Transformer

    mods = fsdp_modules(module)
    for m in mods:
        m.unshard()
    for m in mods:
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield module
    finally:
        for m in mods:  # roots keep their weights after forward (see shard_model), blocks as configured
            is_root = isinstance(m, (Transformer, RewardModel))
            m.set_reshard_after_forward(False if is_root else reshard_after_forward, recurse=False)
            m.reshard()


def reshard(module: nn.Module) -> None:
    """Free the gathered full weights of every FSDP unit in `module` (a no-op for a module that is not
    sharded, as in a plain process).

    A frozen model never runs backward, which is where a trainable root (kept gathered after forward,
    see shard_model) gives its full weights back; the stages call this once they are done with one.
    """
    for m in fsdp_modules(module):
        m.reshard()


def local_parameter_bytes(module: nn.Module) -> tuple[int, int]:
    """(bytes of parameters this rank holds, bytes of the full unsharded parameters)."""
    local = full = 0
    for p in module.parameters():
        t = p.to_local() if hasattr(p, "to_local") else p
        local += t.numel() * t.element_size()
        full += p.numel() * p.element_size()
    return local, full


def meta_copy(module: nn.Module) -> nn.Module:
    """A structural copy of `module` whose parameters and buffers live on the meta device (no memory);
    shared parameters (tied embeddings) stay shared."""
    memo: dict[int, Any] = {}
    for t in module.parameters():
        memo[id(t)] = nn.Parameter(torch.empty_like(t, device="meta"), requires_grad=t.requires_grad)
    for t in module.buffers():
        memo[id(t)] = torch.empty_like(t, device="meta")
    return copy.deepcopy(module, memo)


def _built_on_meta(module: nn.Module, ctx: DistContext) -> bool:
    """Whether the ranks other than 0 built `module` on the meta device (collective). Rank 0 must hold
    real weights then, and every rank the same parameter names, shapes and dtypes."""
    on_meta = torch.tensor([float(any(p.is_meta for p in module.parameters()))], device=_comm_device())
    dist.all_reduce(on_meta, op=dist.ReduceOp.MAX)
    if not on_meta.item():
        return False
    layout = [[(n, tuple(p.shape), p.dtype, p.is_meta) for n, p in module.named_parameters()]]
    dist.broadcast_object_list(layout, src=0)
    if ctx.is_main and any(m for *_, m in layout[0]):
        raise RuntimeError(f"distributed: rank 0's {type(module).__name__} has meta parameters; rank 0 must "
                           f"load the weights it broadcasts")
    ours = [(n, tuple(p.shape), p.dtype) for n, p in module.named_parameters()]
    theirs = [row[:3] for row in layout[0]]
    if ours != theirs:
        first = next(i for i, (a, b) in enumerate(zip(ours + [None], theirs + [None])) if a != b)
        raise RuntimeError(f"distributed: rank {ctx.rank}'s {type(module).__name__} differs from rank 0's at "
                           f"parameter {first}: {(ours + [None])[first]} here, {(theirs + [None])[first]} on rank 0")
    return True


def load_sharded_from_rank0(module: nn.Module, ctx: DistContext) -> list[nn.Module]:
    """shard_model(module), then its weights from rank 0's full copy, broadcast one tensor at a time, each
    rank keeping its shard (collective; returns the FSDP roots).

    Rank 0 built `module` with its weights loaded; every other rank built it on the meta device and read
    nothing, so its peak is one full tensor plus its shards, not the whole model. Rank 0's full weights
    are freed on return. LoRA adapters and modules_to_save copies are broadcast like the base
    weights, so every rank starts from rank 0's initialisation. Shared parameters (tied embeddings) are
    one parameter on the meta device too, so they stay one after fully_shard and to_empty.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    full = module.state_dict() if ctx.is_main else {}  # views of rank 0's loaded tensors, before sharding
    roots = shard_model(module, ctx)
    if not ctx.is_main:
        module.to_empty(device="cpu" if ctx.cpu_offload else ctx.device)
    set_model_state_dict(module, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return roots


def prepare_stage(stage, ctx: DistContext) -> None:
    """Shard a built stage in place: its trainable model under FSDP2, its frozen models
    (`stage.frozen_modules()`: a reference copy, a reward model) the same way, so that each rank holds
    1/N of them too, its data iterators by rank, and (ppo) generation with gathered weights. Call before
    the Trainer builds its optimizer (the frozen models have no gradients and no optimizer states)."""
    from minirlhf.data import BatchIterator

    ctx.skeleton = meta_copy(stage.model)
    for module in [stage.model, *stage.frozen_modules()]:
        if _built_on_meta(module, ctx):
            load_sharded_from_rank0(module, ctx)
        else:
            shard_model(module, ctx)
    for name in ("batches", "ptx"):
        it = getattr(stage, name, None)
        if isinstance(it, BatchIterator):
            it.shard(ctx.rank, ctx.world_size)
    if hasattr(stage, "generation_context"):
        stage.generation_context = functools.partial(unsharded, stage.policy,
                                                     reshard_after_forward=ctx.reshard_after_forward)


# --------------------------------------------------------------------------------------------------
# checkpoints (torch.distributed.checkpoint)


def _state_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True, **kw)


def save_sharded(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Trainable weights and optimizer states, each rank its own shards, into `path` (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    state = {"model": get_model_state_dict(model, options=_state_options()),
             "optim": get_optimizer_state_dict(model, optimizer, options=_state_options())}
    dcp.save(state, checkpoint_id=str(path))


def load_sharded(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """The inverse of save_sharded, onto any world size (or a plain process): DCP reads from each saved
    shard the pieces this rank's shards cover. Nothing is unpickled beyond DCP's own metadata types and
    torch's weights-only set (see `_safe_reader`)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)

    state = {"model": get_model_state_dict(model, options=_state_options()),
             "optim": get_optimizer_state_dict(model, optimizer, options=_state_options())}
    reader, planner = _safe_reader(path)
    dcp.load(state, storage_reader=reader, planner=planner, no_dist=not dist.is_initialized())
    set_model_state_dict(model, state["model"], options=_state_options(strict=False))
    set_optimizer_state_dict(model, optimizer, state["optim"], options=_state_options())


def _safe_reader(path: Path):
    """A DCP FileSystemReader and load planner that unpickle nothing that can run code.

    DCP reads its `.metadata` with plain pickle.load and its non-tensor items (the optimizer's lr, betas
    ...) with torch.load(weights_only=False), so a crafted checkpoint would run code on resume. Here the
    metadata goes through an unpickler that knows only DCP's metadata classes and a few torch values,
    and the items through torch.load(weights_only=True)."""
    import io
    import pickle

    from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
    from torch.distributed.checkpoint import metadata as dcp_metadata

    allowed = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
               ("pathlib", "WindowsPath"), ("torch.distributed.checkpoint.filesystem", "_StorageInfo")}

    class MetadataUnpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str):
            found = getattr(dcp_metadata, name, None) if module == dcp_metadata.__name__ else None
            if (module, name) in allowed or (isinstance(found, type) and found.__module__ == module) or (
                    module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
                return super().find_class(module, name)
            raise pickle.UnpicklingError(f"{module}.{name} has no place in a checkpoint's .metadata")

    class Reader(FileSystemReader):
        def read_metadata(self, *args, **kwargs) -> dcp_metadata.Metadata:
            rank = kwargs.get("rank")  # DCP's file names: .metadata, or __{rank}.metadata per rank
            with open(Path(self.path) / (".metadata" if rank is None else f"__{rank}.metadata"), "rb") as f:
                metadata = MetadataUnpickler(f).load()
            if not isinstance(metadata, dcp_metadata.Metadata):
                raise pickle.UnpicklingError(f"{self.path}/.metadata holds a {type(metadata).__name__}")
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = dcp_metadata.StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    class Planner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            item = torch.load(value, weights_only=True)  # refuses anything but tensors and plain values
            again = io.BytesIO()
            torch.save(item, again)
            again.seek(0)
            super().load_bytes(read_item, again)

    return Reader(str(path)), Planner()


def is_sharded_checkpoint(path: Path) -> bool:
    return (Path(path) / ".metadata").exists()


# --------------------------------------------------------------------------------------------------
# the final model


def full_state_on_rank0(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every weight (frozen ones too) gathered into CPU tensors on rank 0; {} elsewhere (collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def consolidated_copy(skeleton: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """The meta skeleton materialised on the CPU with the gathered weights: a plain, unsharded model."""
    model = copy.deepcopy(skeleton).to_empty(device="cpu")
    missing, unexpected = model.load_state_dict(state, strict=False)
    aliases = {n for n, p in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()}
    missing = [k for k in missing if k not in aliases]
    if missing or unexpected:
        raise RuntimeError(f"distributed.consolidated_copy: gathered state does not fit the model "
                           f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    return model


def export_final(stage, out_dir: Path, ctx: DistContext) -> None:
    """stage.save_final on rank 0 with an unsharded CPU copy of the trained model standing in for the
    sharded one (every attribute of the stage that is, or sits inside, stage.model is swapped for its
    counterpart in the copy, then put back)."""
    state = full_state_on_rank0(stage.model)
    if ctx.is_main:
        full = consolidated_copy(ctx.skeleton, state)
        del state
        names = {id(m): n for n, m in stage.model.named_modules()}
        saved = {}
        for attr, value in vars(stage).items():
            if isinstance(value, nn.Module) and id(value) in names:
                saved[attr] = value
        try:
            for attr, value in saved.items():
                setattr(stage, attr, full.get_submodule(names[id(value)]))
            stage.save_final(out_dir)
        finally:
            for attr, value in saved.items():
                setattr(stage, attr, value)
    ctx.barrier()
