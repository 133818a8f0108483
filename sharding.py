"""train.py --fsdp: the student and the teachers sharded over the ranks with PyTorch's FSDP2
(`fully_shard`), and their checkpoints through `torch.distributed.checkpoint` (DCP).

Under DDP every rank holds the whole student (fp32 weights, gradients, AdamW's two moments: 16
bytes a parameter) and every teacher. Under FSDP each rank holds 1/world_size of each and gathers
one decoder layer's weights at a time for its forward (and the student's backward):

    per rank = (16 x student params + bytes(teachers)) / world_size + the largest layers gathered
               + activations and logits (as under DDP)

What changes against DDP, and nothing else does (data, losses, logging, checks are train.py's):
  - gradient accumulation: no reduce-scatter before the last micro-step (set_gradient_sync);
  - gradient clipping: the norm over every rank's gradient shards (clip_gradients);
  - checkpoints: each rank writes its shard of the weights and optimizer state (save_sharded);
    the consolidated save_pretrained copy is gathered to rank 0 (full_weights).
The learned W is small: it stays replicated, outside FSDP, and train.py all-reduces its gradient.
"""

from __future__ import annotations

import os
import pickle
from contextlib import nullcontext

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import StorageMeta
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from cli import os_error_line

SHARDED = "sharded"  # step_N/sharded/: the DCP checkpoint, one file per rank + .metadata
PARAM_GROUPS = "param_groups.pt"  # beside them: the optimizer's settings per parameter group


def shard_model(model: torch.nn.Module, cuda: bool, trained: bool) -> None:
    """fully_shard each decoder layer (the classes the model names in _no_split_modules, as
    accelerate does), then the root (embeddings, final norm, output layer: a tied output layer
    stays with its embedding). Each layer's weights are gathered for its forward and freed after
    it. The student trains on GPUs with bf16 weights for compute and fp32 gradient reduction; its
    fp32 master weights and AdamW state stay sharded. A teacher keeps its own dtype."""
    world = torch.distributed.get_world_size()
    mesh = init_device_mesh("cuda" if cuda else "cpu", (world,))
    policy = MixedPrecisionPolicy()
    if cuda and trained:
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    layer_classes = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in layer_classes]
    if not layers:
        raise ValueError(
            f"--fsdp: {type(model).__name__} names no decoder layer class (_no_split_modules): "
            "it cannot be sharded layer by layer; run without --fsdp"
        )
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    # the root too is freed after a teacher's forward (FSDP keeps a root whole for the backward
    # that follows: a teacher has none, so its embeddings and output layer would stay gathered)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=not trained or None)


def load_device(fsdp: bool, device: torch.device) -> torch.device:
    """Where models load: this rank's device; under --fsdp the CPU (shard_model moves each rank's
    shard to its device: no rank ever holds a whole model there)."""
    return torch.device("cpu") if fsdp else device


def forward_model(student: torch.nn.Module, teachers: list, job, args) -> torch.nn.Module:
    """The student as its forward runs: compiled with --compile (the teachers' forwards too: each
    teacher's .model is replaced; the losses run eagerly, blocked.py), and under DDP (not --fsdp)
    wrapped in DistributedDataParallel, which averages gradients over the ranks in backward."""
    model = student
    if args.compile:
        model = torch.compile(student)
        for t in teachers:
            t.model = torch.compile(t.model)
    if job.ddp and not args.fsdp:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[job.local_rank] if job.cuda else None
        )
    return model


def gradient_sync(
    model: torch.nn.Module, student: torch.nn.Module, sync: bool, ddp: bool, fsdp: bool
):
    """Gradient accumulation: gradients are reduced over the ranks once, in the backward of the
    step's last micro-step (sync); the micro-steps before keep them on each rank (FSDP: no
    reduce-scatter; DDP: no_sync). A context for the micro-step's forward and backward."""
    if fsdp:
        student.set_requires_gradient_sync(sync)
        return nullcontext()
    return model.no_sync() if ddp and not sync else nullcontext()


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a sharded tensor (the tensor itself when not sharded)."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def clip_gradients(params: list[torch.nn.Parameter], max_norm: float) -> float:
    """||g||_2 over all of the student's gradients (all ranks' shards under FSDP), and every
    gradient scaled by min(1, max_norm / ||g||) as clip_grad_norm_ does. Returns ||g||."""
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads)
    if isinstance(norm, DTensor):  # the sum of the shards' squares, over the ranks
        norm = norm.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return float(norm)


def state_bytes(student: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[int, int]:
    """(bytes of the student's weights and optimizer state held by this rank, bytes of the whole).
    The optimizer's per-parameter state (AdamW: two moments and a step) is measured as held."""
    mine = whole = 0
    for p in student.parameters():
        mine += local(p).numel() * p.element_size()
        whole += p.numel() * p.element_size()
        for value in optimizer.state.get(p, {}).values():
            if isinstance(value, torch.Tensor):
                mine += local(value).numel() * value.element_size()
                whole += value.numel() * value.element_size()
    return mine, whole


def report_state_bytes(student: torch.nn.Module, optimizer, job, write) -> None:
    """Once: how much of the student's weights and optimizer state the fullest rank holds (all of
    it under DDP, about 1/world_size under --fsdp), written by rank 0 with `write`."""
    mine, whole = state_bytes(student, optimizer)
    most = torch.tensor(float(mine), device=job.device)
    if job.ddp:
        torch.distributed.all_reduce(most, op=torch.distributed.ReduceOp.MAX)
    if job.master:
        mb = float(most) / 2**20
        write(
            f"memory: the student's weights and optimizer state: {mb:.2f} MB on the fullest rank, "
            f"{float(most) / whole:.3f} of the whole {whole / 2**20:.2f} MB"
        )


def full_weights(student: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The student's whole fp32 weights on rank 0's CPU (empty on the others); every rank calls
    it. A tied output layer is left out, as save_pretrained leaves it out."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(student, options=options)
    if student.config.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    return weights


def holder(student: torch.nn.Module, learned: list[torch.nn.Module]) -> torch.nn.Module:
    """One module over the student and the learned Ws: it names every parameter the optimizer
    has, as DCP's state-dict functions need."""
    return torch.nn.ModuleDict({"student": student, "projections": torch.nn.ModuleList(learned)})


def save_sharded(path: str, student: torch.nn.Module, learned: list, optimizer) -> None:
    """path/: every rank writes its shard of the weights and of the optimizer's tensors (DCP), and
    rank 0 the optimizer's param_groups (plain numbers, in param_groups.pt). Only tensors go into
    DCP's files, so loading them unpickles nothing."""
    model = holder(student, learned)
    fresh = not optimizer.state  # no step taken yet (each one skipped): no state to save
    optim = get_optimizer_state_dict(model, optimizer)
    if fresh:  # get_optimizer_state_dict made one with a step of lr 0: undone, as DDP has none
        optimizer.state.clear()
    tensors = {} if fresh else optim["state"]
    dcp.save({"model": get_model_state_dict(model), "optim": tensors}, checkpoint_id=path)
    if torch.distributed.get_rank() == 0:
        torch.save(optim["param_groups"], os.path.join(path, PARAM_GROUPS))


def load_sharded(path: str, student: torch.nn.Module, learned: list, optimizer) -> None:
    """save_sharded's inverse: each rank reads its shard of the weights and the optimizer state."""
    model = holder(student, learned)
    saved = read_metadata(path).state_dict_metadata
    optim = get_optimizer_state_dict(model, optimizer)  # creates the state to load into
    state = {"model": get_model_state_dict(model)}
    if any(key.startswith("optim.") for key in saved):
        state["optim"] = optim["state"]
    else:  # saved before any step: the optimizer starts fresh, as it did
        optimizer.state.clear()
    try:
        dcp.load(state, storage_reader=SafeReader(path), planner=TensorsOnly())
    except CheckpointException as e:  # a rank's read failed: every rank gets the same line
        raise ValueError(f"{path}: {failure_line(e)}: resume from another checkpoint") from None
    groups = torch.load(os.path.join(path, PARAM_GROUPS), weights_only=True)
    set_model_state_dict(model, state["model"])
    if "optim" in state:
        optim = {"state": state["optim"], "param_groups": groups}
        set_optimizer_state_dict(model, optimizer, optim)


def failure_line(e: CheckpointException) -> str:
    """DCP's exception (a BaseException holding each failed rank's error) as one line."""
    rank, (error, _) = min(e.failures.items())
    line = (
        os_error_line(error) if isinstance(error, OSError) else f"{type(error).__name__}: {error}"
    )
    return f"rank {rank}: {line}"


def problem(path: str) -> str | None:
    """Why a sharded checkpoint cannot be loaded, or None: its metadata reads, every file it names
    holds the bytes it names, and param_groups.pt loads."""
    try:
        metadata = read_metadata(path)
        for info in (metadata.storage_data or {}).values():
            size = os.path.getsize(os.path.join(path, info.relative_path))
            if size < info.offset + info.length:
                return f"{SHARDED}/{info.relative_path} is truncated"
        torch.load(os.path.join(path, PARAM_GROUPS), weights_only=True)
    except FileNotFoundError as e:
        return f"{SHARDED}/{os.path.basename(e.filename or '')} is missing"
    except (OSError, EOFError, pickle.UnpicklingError, AttributeError, RuntimeError) as e:
        return f"{SHARDED}/ is unreadable ({type(e).__name__})"
    return None


# DCP describes a checkpoint in a pickle (.metadata); these are the only things it may name. The
# stock reader unpickles anything: a checkpoint from elsewhere could run code.
_METADATA_CLASSES = {
    *(
        ("torch.distributed.checkpoint.metadata", name)
        for name in (
            "Metadata",
            "MetadataIndex",
            "StorageMeta",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "TensorProperties",
            "_MEM_FORMAT_ENCODING",
        )
    ),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        allowed = (module, name) in _METADATA_CLASSES
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            allowed = True  # a plain name: "." would let pickle walk on to any attribute
        if not allowed:
            raise pickle.UnpicklingError(f"{module}.{name} is not part of DCP's metadata")
        return super().find_class(module, name)


def read_metadata(path: str):
    """A DCP checkpoint's .metadata, unpickled with only DCP's own classes allowed."""
    with open(os.path.join(path, ".metadata"), "rb") as f:
        return _MetadataUnpickler(f).load()


class SafeReader(FileSystemReader):
    """DCP's file reader with a metadata unpickler restricted to DCP's classes (the tensors
    themselves are read with torch.load(weights_only=True) by FileSystemReader)."""

    def read_metadata(self, *args, **kwargs):
        metadata = read_metadata(self.path)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class TensorsOnly(DefaultLoadPlanner):
    """We save only tensors; a value saved as pickled bytes is refused instead of unpickled."""

    def load_bytes(self, read_item, value) -> None:
        raise ValueError(
            f"{read_item.dest_index.fqn} is stored as a pickled value, which train.py never "
            "writes: this checkpoint is not one of ours"
        )
