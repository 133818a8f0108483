"""Cross-tokenizer knowledge distillation: one student, one or more teachers, one training loop.

    torchrun --nproc_per_node=8 train.py --teacher Qwen/Qwen3-4B --loss pkl
    torchrun --nproc_per_node=8 train.py --teacher microsoft/Phi-4-mini-instruct --loss hkl \\
        --teacher meta-llama/Llama-3.2-3B --loss kl --teacher-weight 0.8 --teacher-weight 0.2
    python train.py --loss ce                                      # continued pre-training baseline
    torchrun --nproc_per_node=2 train.py --preset tiny --max-steps 20   # CPU, gloo, no downloads

Reads top to bottom: settings, DDP, tokenizers and models, one KD loss per teacher (METHOD.md 5),
data, optimizer, the loop, checkpoints. Each teacher sees the same text as the student, tokenized
its own way; data.py aligns the two token streams into chunks and the losses compare chunks.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import NoReturn

import numpy as np
import torch
import torch.distributed as dist

import losses
import run_dir
from build_projection import os_error_line
from tokens import atomic_write, load_tokenizer, tokenizer_hash

# fmt: off
# Run settings that must match to --resume a run (the rest, e.g. --max-steps, may change).
RESUME_KEYS = ("student", "teacher", "loss", "teacher_weight", "learn_projection", "seq_len",
               "batch_size", "grad_accum", "chunk_merge", "kd_scaling", "kd_weight", "ce_weight",
               "preset", "data", "data_config", "split", "pack", "shuffle", "shuffle_buffer",
               "seed", "vocab_topk", "uld_topk", "hkl_threshold", "temperature", "lr")
# Presets build random models with the REAL tokenizers (no downloads). tiny: 2 layers, width 64,
# for CPU tests and the demo. shapes-1b-4b: Llama-3.2-1B and Qwen3-4B shapes, for GPU throughput
# (random weights: the speed of a step does not depend on them); 6 x 2,048 tokens per GPU per step
# as in the public reference run (global batch 96 on 16 GPUs).
PRESETS = {
    "tiny": dict(student="pkg:llama-3.2", teacher=["pkg:qwen3"], seq_len=64, batch_size=2,
                 grad_accum=1, max_steps=20, lr=1e-3, min_lr=1e-4, warmup_steps=2, log_every=1,
                 save_every=10, num_workers=1),
    "shapes-1b-4b": dict(student="pkg:llama-3.2", teacher=["pkg:qwen3"], seq_len=2048,
                         batch_size=2, grad_accum=3, max_steps=20, warmup_steps=2, log_every=1,
                         save_every=0, num_workers=4),
}
# Model shapes of the presets: (llama, qwen3) by preset; vocab is at least the tokenizer's size.
SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16),
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                         vocab_size=128256),
    "qwen3-4b": dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                     vocab_size=151936),
}
PRESET_SHAPES = {"tiny": ("tiny", "tiny"), "shapes-1b-4b": ("llama-3.2-1b", "qwen3-4b")}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    a = p.add_argument
    a("--student", default="meta-llama/Llama-3.2-1B")
    a("--teacher", action="append", help="repeat for several teachers")
    a("--loss", action="append", choices=["auto", "pkl", "hkl", "gold", "uld", "kl", "ce"],
      help="per teacher, in --teacher order (one value applies to all); auto = audit.py")
    a("--teacher-weight", action="append", type=float, help="static alpha_m per teacher")
    a("--projection", action="append", help="W file per teacher (default: a cached build)")
    a("--projection-cache", default=os.path.expanduser("~/.cache/xtoken"))
    a("--learn-projection", action="store_true", help="learn W's weights (P-KL only)")
    a("--kd-scaling", choices=["dynamic", "static"], default="dynamic")
    a("--kd-weight", type=float, default=1.0)
    a("--ce-weight", type=float, default=1.0)
    a("--temperature", type=float, default=1.0)
    a("--vocab-topk", type=int, default=8192)
    a("--uld-topk", type=int, default=8192)
    a("--hkl-threshold", type=float, default=0.6)
    a("--chunk-merge", choices=["mean", "first"], default="mean")
    # data: raw text (the official nvidia/Nemotron-ClimbMix release is GPT-2 token ids)
    a("--data", default="OptimalScale/ClimbMix")
    a("--data-config", help="hub dataset configuration (its subset name)")
    a("--split", default="train", help="hub dataset split")
    a("--text-field", default="text")
    a("--no-pack", dest="pack", action="store_false",
      help="one document per window (default: documents packed into full windows)")
    a("--no-shuffle", dest="shuffle", action="store_false",
      help="read documents in file order (default: seeded shuffle, reseeded per epoch)")
    a("--shuffle-buffer", type=int, default=10_000, help="documents per DataLoader worker "
      "held by the shuffle (default 10000)")
    a("--seq-len", type=int, default=2048)
    a("--teacher-cap", type=int, help="max teacher tokens per window (default 2 x seq-len)")
    a("--num-workers", type=int, default=2)
    # optimizer: the public reference config (the paper states none)
    a("--batch-size", type=int, default=4, help="sequences per rank per micro-step")
    a("--grad-accum", type=int, default=3)
    a("--max-steps", type=int, default=30_000)
    a("--stop-step", type=int, help="end this job after step N (the schedule still follows "
      "--max-steps; --resume continues): for time-limited jobs")
    a("--lr", type=float, default=5e-5)
    a("--min-lr", type=float, default=5e-6)
    a("--warmup-steps", type=int, default=300)
    a("--weight-decay", type=float, default=0.1)
    a("--betas", type=float, nargs=2, default=(0.9, 0.95))
    a("--grad-clip", type=float, default=1.0)
    a("--projection-lr", type=float, default=1e-2)
    a("--max-bad-steps", type=int, default=5, help="non-finite steps in a row before stopping")
    # run
    a("--out-dir", default="out/run")
    a("--resume", action="store_true", help="continue from the latest checkpoint")
    a("--overwrite", action="store_true", help="discard a previous run in --out-dir")
    a("--seed", type=int, default=1337)
    a("--preset", choices=sorted(PRESETS))
    a("--save-every", type=int, default=1000, help="0: no checkpoints (benchmarks)")
    a("--keep-last", type=int, default=3)
    a("--log-every", type=int, default=10)
    a("--compile", action="store_true")
    a("--gradient-checkpointing", action="store_true")
    a("--trust-remote-code", action="store_true")
    a("--wandb", action="store_true")
    a("--tensorboard", action="store_true")
    if argv is None:
        argv = sys.argv[1:]
    preset = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--preset"), None)
    preset = preset or next((a.split("=", 1)[1] for a in argv if a.startswith("--preset=")), None)
    if preset is not None and preset not in PRESETS:
        p.error(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    if preset:
        p.set_defaults(**{k: v for k, v in PRESETS[preset].items() if k != "teacher"})
    args = p.parse_args(argv)
    if preset and args.teacher is None and args.loss != ["ce"]:
        args.teacher = PRESETS[preset]["teacher"]
    return args


# fmt: on


def per_teacher(values: list | None, n: int, default, name: str) -> list:
    """One value per teacher: none -> default, one -> repeated, n -> as given."""
    if not values:
        return [default] * n
    if len(values) == 1:
        return values * n
    if len(values) != n:
        raise ValueError(f"{len(values)} values of --{name} for {n} teachers: give 1 or {n}")
    return values


def drop_padded_columns(W: torch.Tensor, vocab: int, path: str) -> torch.Tensor:
    """W cut to the teacher's tokenizer ids: a W built for a padded output layer has empty
    padded columns (build_projection.py gives padding no entries); anything else is an error."""
    if W.shape[1] <= vocab:
        return W
    W = W.coalesce()
    if bool((W.indices()[1] >= vocab).any()):
        raise ValueError(
            f"{path} maps student ids to teacher ids >= {vocab}, which the teacher's "
            "tokenizer does not have: rebuild W for this teacher"
        )
    return torch.sparse_coo_tensor(W.indices(), W.values(), (W.shape[0], vocab)).coalesce()


@dataclass
class Teacher:
    """One teacher and what its KD term needs (METHOD.md 5.2-5.4)."""

    name: str
    tok: object
    model: torch.nn.Module
    loss: str  # pkl, hkl, gold, uld or kl
    weight: float  # alpha_m
    vocab: int  # its tokenizer's ids: output rows beyond them are padding
    W: torch.Tensor | losses.LearnableProjection | None = None  # P-KL
    w_path: str | None = None  # where W is read from
    pairs: torch.Tensor | None = None  # GOLD, H-KL: the common set


def tiny_model(arch: str, vocab_size: int, seq_len: int, shape: str = "tiny"):
    """A random Llama/Qwen3 of a SHAPES entry, with at least vocab_size output rows."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    config = dict(SHAPES[shape], max_position_embeddings=max(4 * seq_len, 512),
                  tie_word_embeddings=True)  # fmt: skip
    config["vocab_size"] = max(vocab_size, config.get("vocab_size", 0))
    if arch == "qwen3":
        return Qwen3ForCausalLM(Qwen3Config(**config))
    return LlamaForCausalLM(LlamaConfig(**config))


def load_model(name: str, tok, args, dtype: torch.dtype, device: torch.device):
    """A checkpoint directory or hub model; a random preset model for pkg: names with --preset."""
    from transformers import AutoModelForCausalLM

    if name.startswith("pkg:") and not os.path.isdir(name):
        if not args.preset:
            raise ValueError(f"{name} is a tokenizer, not a model: use it with --preset tiny")
        vocab = -(-len(tok) // 64) * 64  # pad to a multiple of 64, as real models do
        arch = "qwen3" if "qwen" in name else "llama"
        shape = PRESET_SHAPES[args.preset][arch == "qwen3"]
        with torch.device(device):  # initialised where it runs: a 4B model is slow to init on CPU
            return tiny_model(arch, vocab, args.seq_len, shape).to(dtype)
    return AutoModelForCausalLM.from_pretrained(
        name, dtype=dtype, trust_remote_code=args.trust_remote_code
    ).to(device)


def first_positions_only(chunk: torch.Tensor) -> torch.Tensor:
    """--chunk-merge first (METHOD.md 5.1): keep each chunk's first predictor position only."""
    previous = torch.nn.functional.pad(chunk[:, :-1], (1, 0), value=-1)
    return torch.where(chunk != previous, chunk, -1)


def chunk_counts(s_chunk: torch.Tensor, t_chunk: torch.Tensor) -> tuple[int, int]:
    """(valid chunks, chunks on either side) of a batch: a chunk is valid when it has a position
    on both sides (METHOD.md 5); the others carry no KD signal. Chunk ids are per row."""
    width = int(max(s_chunk.max(), t_chunk.max(), 0)) + 1
    row = torch.arange(len(s_chunk)).unsqueeze(1) * width  # (row, chunk) as one key
    s_keys = torch.unique((row + s_chunk)[s_chunk >= 0])
    t_keys = torch.unique((row + t_chunk)[t_chunk >= 0])
    valid = int(torch.isin(s_keys, t_keys).sum())
    return valid, len(s_keys) + len(t_keys) - valid


N_STEP_SUMS = 4  # loss, ce, kd, kd_scale; then per teacher its KD term, valid and union chunks


def prepare_batch(batch: dict, teachers: list[Teacher], chunk_merge: str) -> dict:
    """A collated batch as the loop uses it, still on the host: --chunk-merge applied, and
    `counts` = [student tokens, labelled tokens, then per teacher the targets its KD term is a
    mean over (positions for KL, valid chunks otherwise)], `valid_union` for the logs."""
    out = {k: v for k, v in batch.items() if k not in ("position", "issues")}
    labelled = int((out["labels"] != -100).sum())
    counts, valid_union = [int(out["student_mask"].sum()), labelled], []
    for i, t in enumerate(teachers):
        s_chunk, t_chunk = out[f"student_chunk_{i}"], out[f"teacher_chunk_{i}"]
        if chunk_merge == "first":
            s_chunk, t_chunk = first_positions_only(s_chunk), first_positions_only(t_chunk)
            out[f"student_chunk_{i}"], out[f"teacher_chunk_{i}"] = s_chunk, t_chunk
        valid, union = chunk_counts(s_chunk, t_chunk)
        counts.append(labelled if t.loss == "kl" else valid)
        valid_union += [valid, union]
    out["counts"] = torch.tensor(counts, dtype=torch.float64)
    out["valid_union"] = torch.tensor(valid_union, dtype=torch.float64)
    return out


def share(count: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """count / total (0 when total is 0): a micro-batch's weight in the step's mean."""
    return (count / total.clamp_min(1)).float()


def trim_output_vocabulary(model: torch.nn.Module, n: int) -> None:
    """Keep the first n output rows of a teacher (its tokenizer's ids): the rest pad the matrix to
    a round size (Qwen3: 151,936 rows for 151,669 ids) and must never enter a softmax, a top-k
    subset or GOLD's uncommon set. The kept rows are a view: no copy, tied embeddings stay."""
    head = model.get_output_embeddings()
    if head.weight.shape[0] <= n:
        return
    trimmed = torch.nn.Linear(head.in_features, n, bias=head.bias is not None,
                              device="meta")  # fmt: skip
    trimmed.weight = torch.nn.Parameter(head.weight[:n], requires_grad=False)
    if head.bias is not None:
        trimmed.bias = torch.nn.Parameter(head.bias[:n], requires_grad=False)
    model.set_output_embeddings(trimmed)


checkpoints = run_dir.checkpoints  # complete checkpoints, oldest first
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def ignore_stop_signals(worker_id: int) -> None:
    """A DataLoader worker ignores Ctrl-C (the terminal sends it to the whole process group: the
    rank's process stops gracefully) and leaves quietly on SIGTERM (the DataLoader's own way to end
    a worker; a scheduler's SIGTERM to every process): the rank already holds the batches of the
    step it finishes, and a worker killed by a signal would abort it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(0))


# Every numeric flag and what it must be (checked before anything is read or written).
RANGES = {
    "seq_len": (lambda v: v >= 2, "at least 2"),
    "batch_size": (lambda v: v >= 1, "at least 1"),
    "grad_accum": (lambda v: v >= 1, "at least 1"),
    "max_steps": (lambda v: v >= 1, "at least 1"),
    "stop_step": (lambda v: v >= 1, "at least 1"),
    "lr": (lambda v: v > 0, "positive"),
    "min_lr": (lambda v: v >= 0, "0 or more"),
    "warmup_steps": (lambda v: v >= 0, "0 or more"),
    "weight_decay": (lambda v: v >= 0, "0 or more"),
    "betas": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "grad_clip": (lambda v: v > 0, "positive"),
    "projection_lr": (lambda v: v > 0, "positive"),
    "max_bad_steps": (lambda v: v >= 0, "0 or more"),
    "save_every": (lambda v: v >= 0, "0 (no checkpoints) or more"),
    "keep_last": (lambda v: v >= 1, "at least 1"),
    "log_every": (lambda v: v >= 1, "at least 1"),
    "num_workers": (lambda v: v >= 0, "0 or more"),
    "teacher_weight": (lambda v: v >= 0, "0 or more"),
    "kd_weight": (lambda v: v >= 0, "0 or more"),
    "ce_weight": (lambda v: v >= 0, "0 or more"),
    "temperature": (lambda v: v > 0, "positive"),
    "vocab_topk": (lambda v: v >= 0, "0 (all ids) or more"),
    "uld_topk": (lambda v: v >= 0, "0 (all ids) or more"),
    "hkl_threshold": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "teacher_cap": (lambda v: v >= 1, "at least 1"),
    "shuffle_buffer": (lambda v: v >= 0, "0 (no buffer) or more"),
}


def check_settings(args) -> tuple[list[str], list[str], list[float], list]:
    """The flags on their own, before anything is read or written: ranges, and one loss, weight and
    W file per teacher. Returns (teachers, losses, weights, W files)."""
    for name, (ok, what) in RANGES.items():
        value = getattr(args, name)
        for v in value if isinstance(value, list | tuple) else [value]:
            if v is not None and not (math.isfinite(v) and ok(v)):
                raise ValueError(f"--{name.replace('_', '-')} {v}: must be {what}")
    if args.min_lr > args.lr:
        raise ValueError(f"--min-lr {args.min_lr} is above --lr {args.lr}")
    names = args.teacher or []
    loss_names = per_teacher(args.loss, len(names), "auto", "loss")
    if not names:
        if args.loss not in (None, ["ce"]):
            raise ValueError("--loss other than ce needs a --teacher")
        loss_names = []
    elif "ce" in loss_names:
        raise ValueError("--loss ce is the no-teacher baseline: drop --teacher or pick a KD loss")
    weights = per_teacher(args.teacher_weight, len(names), 1.0 / max(1, len(names)),
                          "teacher-weight")  # fmt: skip
    files = per_teacher(args.projection, len(names), None, "projection")
    if args.learn_projection and not loss_names.count("pkl") and "auto" not in loss_names:
        raise ValueError("--learn-projection learns W for P-KL: use it with --loss pkl")
    for path in files:
        if path and not os.path.isfile(path):
            raise ValueError(f"projection file {path} does not exist")
    return names, loss_names, weights, files


def inspect_run_dir(args, lock: run_dir.RunLock, world_size: int) -> dict:
    """Rank 0: take the directory's lock, check that this run may use it (one configuration per
    directory; an existing run needs --resume or --overwrite) and pick the checkpoint to resume
    from (the newest that verifies). Writes nothing but the lock."""
    out_dir = args.out_dir
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"--out-dir {out_dir} is a file: pick a directory")
    created = not os.path.exists(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    if not os.access(out_dir, os.W_OK):
        raise ValueError(f"--out-dir {out_dir} is not writable: pick another directory")
    problem = lock.acquire()
    if problem:
        raise ValueError(problem)
    config_path = os.path.join(out_dir, "run_config.json")
    previous = run_dir.checkpoints(out_dir)
    if os.path.exists(config_path) and not args.overwrite:
        try:
            with open(config_path) as f:
                saved = json.load(f)
        except ValueError:
            raise ValueError(f"{config_path} is not valid JSON: repair or delete it") from None
        if not set(RESUME_KEYS) <= saved.keys():
            raise ValueError(
                f"{out_dir} holds a run of an older train.py (its settings lack "
                f"{sorted(set(RESUME_KEYS) - saved.keys())}): it cannot be resumed; "
                "pick another --out-dir, or pass --overwrite to replace it"
            )
        changed = sorted(k for k in RESUME_KEYS if json.dumps(saved.get(k)) !=
                         json.dumps(getattr(args, k)))  # fmt: skip
        if changed:
            raise ValueError(f"{out_dir} holds a run with another configuration "
                             f"({', '.join(changed)} differ): pick another --out-dir, or pass "
                             "--overwrite to replace it")  # fmt: skip
    if previous and not args.resume and not args.overwrite:
        raise ValueError(f"{out_dir} holds a run (step {previous[-1][0]}): pass --resume to "
                         "continue it or --overwrite to replace it")  # fmt: skip
    decision = {"resume": None, "warnings": [], "created": created}
    if args.resume and not args.overwrite:
        decision["resume"], decision["warnings"] = run_dir.newest_good_checkpoint(
            out_dir, world_size
        )
        if decision["resume"] is None:
            found = f" ({len(previous)} damaged)" if previous else ""
            raise ValueError(f"--resume: {out_dir} holds no complete checkpoint{found}: drop "
                             "--resume to start a new run")  # fmt: skip
    return decision


def load_student(args, device):
    """The student's tokenizer and model (fp32 weights; bf16 autocast on GPU), same seed on
    every rank (identical initial weights; DDP also broadcasts them)."""
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)
    student_tok = load_tokenizer(args.student, trust_remote_code=args.trust_remote_code)
    student = load_model(args.student, student_tok, args, torch.float32, device)
    if args.gradient_checkpointing:
        enable = getattr(student, "activation_checkpointing_enable", None)  # transformers >= 5
        (enable or student.gradient_checkpointing_enable)()
    return student_tok, student


def load_teachers(args, settings, student_tok, student_vocab, teacher_dtype, device,
                  local_master: bool) -> list[Teacher]:  # fmt: skip
    """Each teacher's tokenizer and model (eval, no gradients, padded rows trimmed) and the path
    of its W; each node's first rank builds a W that is not cached yet (atomic writes)."""
    from build_projection import FORMAT_VERSION, build_projection, save_projection

    names, loss_names, weights, files = settings
    teachers = []
    for i, name in enumerate(names):
        tok = load_tokenizer(name, trust_remote_code=args.trust_remote_code)
        model = load_model(name, tok, args, teacher_dtype, device).to(device, teacher_dtype).eval()
        model.requires_grad_(False)
        rows = model.get_output_embeddings().weight.shape[0]
        t = Teacher(name, tok, model, loss_names[i], weights[i], vocab=min(len(tok), rows))
        same_tokenizer = tokenizer_hash(tok) == tokenizer_hash(student_tok)
        if t.loss == "kl" or (t.loss == "auto" and same_tokenizer):
            if not same_tokenizer:
                raise ValueError(f"--loss kl needs the student's tokenizer; teacher {name} has "
                                 "another: use pkl, hkl or gold")  # fmt: skip
            if rows != student_vocab:
                raise ValueError(f"teacher {name} has {rows} output rows, the student "
                                 f"{student_vocab}: KL needs equal vocabularies")  # fmt: skip
            t.loss = "kl"
            teachers.append(t)
            continue
        trim_output_vocabulary(model, t.vocab)  # its padded rows: never a target
        # W: the given file, or a cached build keyed by the W format, both tokenizer hashes and
        # the vocabulary sizes
        key = f"{tokenizer_hash(student_tok)[:16]}-{tokenizer_hash(tok)[:16]}"
        t.w_path = files[i] or os.path.join(
            args.projection_cache, f"W-v{FORMAT_VERSION}-{key}-{student_vocab}x{t.vocab}.pt"
        )
        if local_master and not os.path.exists(t.w_path):
            print(f"building W for {args.student} -> {name} into {t.w_path}")
            save_projection(build_projection(student_tok, tok, student_vocab_size=student_vocab,
                                             teacher_vocab_size=t.vocab), t.w_path)  # fmt: skip
        teachers.append(t)
    return teachers


def prepare_losses(args, teachers: list[Teacher], student_tok, student_vocab, device) -> list:
    """Each cross-tokenizer teacher's W (loaded and verified against both tokenizers), its loss
    (auto: audit.py's choice) and what the loss needs. Returns the learnable projections."""
    from build_projection import load_projection

    projections = []
    for t in teachers:
        if t.loss == "kl":
            continue
        path = t.w_path
        projection = load_projection(path, student_tok, t.tok)
        projection["W"] = drop_padded_columns(projection["W"], t.vocab, path)
        if tuple(projection["W"].shape) != (student_vocab, t.vocab):
            raise ValueError(f"teacher {t.name}'s vocabulary ({t.vocab} ids; student "
                             f"{student_vocab} rows) does not match its W "
                             f"{tuple(projection['W'].shape)} in {path}: rebuild W with "
                             "--student-vocab-size/--teacher-vocab-size")  # fmt: skip
        if t.loss == "auto":
            from audit import audit

            t.loss = audit(student_tok, projection, threshold=args.hkl_threshold)["recommended"]
        if args.learn_projection and t.loss != "pkl":
            raise ValueError(f"--learn-projection is for P-KL; teacher {t.name} uses {t.loss}")
        W = projection["W"].to(device)
        if t.loss == "pkl":
            t.W = losses.LearnableProjection(W).to(device) if args.learn_projection else W
            if args.learn_projection:
                projections.append(t.W)
        elif t.loss == "hkl":
            t.pairs = losses.hkl_pairs(W, projection["exact_pairs"],
                                       threshold=args.hkl_threshold).to(device)  # fmt: skip
        elif t.loss == "gold":
            t.pairs = projection["exact_pairs"].to(device)
    return projections


def load_resume(path: str, student, projections, rank: int, world_size: int) -> dict:
    """Weights, W's weights, this rank's RNG and data position from a verified checkpoint; the
    optimizer state and counters are returned for the optimizer built later."""
    from safetensors.torch import load_file

    weights = load_file(os.path.join(path, "model.safetensors"))
    missing, unexpected = student.load_state_dict(weights, strict=False)
    tied = {"lm_head.weight"} if student.config.tie_word_embeddings else set()
    if unexpected or set(missing) - tied:  # only a tied output layer may be absent
        raise ValueError(
            f"{path} does not match the student ({len(missing)} missing, "
            f"{len(unexpected)} unexpected weights): resume with the same model"
        )
    if tied:
        student.tie_weights()
    state = torch.load(os.path.join(path, "trainer_state.pt"), weights_only=True)
    if state["world_size"] != world_size:
        raise ValueError(
            f"{path} was written by {state['world_size']} ranks, this run has "
            f"{world_size}: resume with the same number of processes"
        )
    for proj, proj_state in zip(projections, state["projections"]):
        proj.load_state_dict(proj_state)
    mine = torch.load(os.path.join(path, f"rank_{rank}.pt"), weights_only=True)
    torch.set_rng_state(mine["torch_rng"])
    random.setstate((mine["python_rng"][0], tuple(mine["python_rng"][1]), None))
    return {"optimizer": state["optimizer"], "skipped": state["skipped"],
            "data_state": mine["data_state"], "step": state["step"]}  # fmt: skip


def start_run(args) -> None:
    """Rank 0, once every check has passed: --overwrite moves the old run aside (deleted at the
    new run's first checkpoint), and run_config.json is written."""
    if args.overwrite and run_dir.move_aside(args.out_dir):
        print(f"--overwrite: the previous run in {args.out_dir} is moved to "
              f"{run_dir.OVERWRITTEN}/ until this run's first checkpoint")  # fmt: skip
    config = {k: getattr(args, k) for k in RESUME_KEYS}
    atomic_write(os.path.join(args.out_dir, "run_config.json"),
                 lambda f: f.write(json.dumps(config, indent=2).encode()))  # fmt: skip


def first_error(error: str | None) -> str | None:
    """The first error any rank met: every rank learns it, so that every rank stops (none is left
    waiting in a collective)."""
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    return next((e for e in errors if e), None)


# fmt: off
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    lock = run_dir.RunLock(args.out_dir)
    handlers = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    try:
        train(args, lock)
    finally:  # whatever ends the run in this process; a killed process leaves a stale lock
        lock.release()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def train(args: argparse.Namespace, lock: run_dir.RunLock) -> None:
    """The recipe: settings, DDP, checks, models, data, optimizer, the loop, checkpoints."""

    # ---- DDP: torchrun sets RANK/WORLD_SIZE; nccl on GPUs, gloo on CPU -------------------------
    ddp = int(os.environ.get("RANK", -1)) != -1
    cuda = torch.cuda.is_available()
    if ddp:
        dist.init_process_group(backend="nccl" if cuda else "gloo")
        rank, world_size = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
    else:
        rank, world_size, local_rank = 0, 1, 0
    master = rank == 0
    device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()
    teacher_dtype = torch.bfloat16 if cuda else torch.float32

    def stop(message: str, code: int = 2) -> NoReturn:
        """The one error path: one line on stderr (from rank 0), the lock released, and every
        rank exits with status 2 (they all call this together)."""
        if master:
            print(f"error: {message}", file=sys.stderr)
        lock.release()
        if ddp:
            dist.destroy_process_group()
        sys.exit(code)

    def together(fn, *fn_args):
        """fn(*fn_args) on every rank; an expected failure on any rank (bad input: ValueError, the
        OS: OSError) stops every rank with its message. Also a barrier."""
        result, error = None, None
        try:
            result = fn(*fn_args)
        except ValueError as e:
            error = str(e)
        except OSError as e:
            error = os_error_line(e)
        error = agree(error, ddp)
        if error:
            stop(error)
        return result

    # ---- checks first: flags, the run directory, models, W, data; nothing is written before ----
    settings = together(check_settings, args)
    decision = together(lambda: inspect_run_dir(args, lock, world_size) if master else None)
    if ddp:
        shared = [decision]
        dist.broadcast_object_list(shared, src=0)
        decision = shared[0]
    student_tok, student = together(load_student, args, device)
    student_vocab = student.get_output_embeddings().weight.shape[0]
    local_master = local_rank == 0
    teachers = together(load_teachers, args, settings, student_tok, student_vocab, teacher_dtype,
                        device, local_master)
    projections = together(prepare_losses, args, teachers, student_tok, student_vocab, device)
    resume_state, start_step = {}, 0
    if decision["resume"]:
        start_step, path = decision["resume"]
        resume_state = together(load_resume, path, student, projections, rank, world_size)
        if master:
            for warning in decision["warnings"]:
                print(f"warning: {warning}", file=sys.stderr)
            print(f"resuming from {path}")

    # ---- data: tokenization and alignment run in DataLoader workers ---------------------------
    from data import REASONS, AlignedWindows, advance_state, collate, issue_counts, make_tiny_corpus

    out_dir = args.out_dir
    data_source = args.data
    if args.preset and args.data == "OptimalScale/ClimbMix":
        data_source = os.path.join(out_dir, "tiny_corpus")
        together(lambda: master and not os.path.exists(data_source)
                 and make_tiny_corpus(data_source, n_docs=400, seed=0))
    dataset = together(lambda: AlignedWindows(
        data_source, student_tok, [t.tok for t in teachers], args.seq_len,
        text_field=args.text_field, rank=rank, world_size=world_size,
        start=resume_state.get("data_state"), teacher_cap=args.teacher_cap, repeat=True,
        data_config=args.data_config, split=args.split, pack=args.pack, shuffle=args.shuffle,
        shuffle_buffer=args.shuffle_buffer, seed=args.seed))
    together(lambda: master and start_run(args))  # every check passed: the run starts here
    if master:
        n_params = sum(p.numel() for p in student.parameters())
        tokens_per_step = args.batch_size * args.grad_accum * world_size * args.seq_len
        print(f"student {args.student}: {n_params / 1e6:.1f}M parameters; {world_size} rank(s); "
              f"{tokens_per_step:,} student tokens per step")
        for t in teachers:
            print(f"teacher {t.name}: loss {t.loss}, weight {t.weight}")
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size, num_workers=args.num_workers,
        collate_fn=functools.partial(collate, pad_ids=dataset.pad_ids),
        worker_init_fn=ignore_stop_signals)
    batches = iter(loader)

    # ---- optimizer: AdamW, warm-up then cosine; W's weights get their own group ---------------
    decay = [p for p in student.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in student.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay, "base_lr": args.lr},
              {"params": no_decay, "weight_decay": 0.0, "base_lr": args.lr}]
    w_params = [p for proj in projections for p in proj.parameters()]
    if w_params:  # lr 1e-2, no weight decay, no clipping (METHOD.md 5.2)
        groups.append({"params": w_params, "weight_decay": 0.0, "base_lr": args.projection_lr})
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=tuple(args.betas), fused=cuda)
    if "optimizer" in resume_state:
        optimizer.load_state_dict(resume_state["optimizer"])

    def lr_scale(step: int) -> float:
        """Linear warm-up to 1, then cosine down to min_lr/lr at max_steps."""
        if step < args.warmup_steps:
            return (step + 1) / args.warmup_steps
        progress = min(1.0, (step - args.warmup_steps) / max(1, args.max_steps - args.warmup_steps))
        floor = args.min_lr / args.lr
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    model = student
    if args.compile:
        model = torch.compile(model)
    if ddp:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[local_rank] if cuda else None)
    logger = Logger(args, out_dir, master, start_step)

    # ---- the loop ------------------------------------------------------------------------------
    step, bad_in_a_row, skipped = start_step, 0, resume_state.get("skipped", 0)
    data_state = resume_state.get("data_state")
    progress = None
    if master:
        from tqdm import tqdm

        progress = tqdm(total=args.max_steps, initial=step, desc="train", dynamic_ncols=True)
    last_step = min(args.max_steps, args.stop_step or args.max_steps)
    static_kd_weight = torch.tensor(args.kd_weight, device=device)
    streak_start = None  # the first skipped step of the current run of skipped steps
    # SIGTERM (what a scheduler sends before it kills a job) or SIGINT: finish the step, write a
    # checkpoint, stop; a second signal stops at once
    signalled: list[int] = []

    def on_signal(signum, frame) -> None:
        signalled.append(signum)
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)

    for sig in STOP_SIGNALS:  # main() puts the previous handlers back
        signal.signal(sig, on_signal)
    while step < last_step:
        started = time.perf_counter()
        scale = lr_scale(step)
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * scale
        # The step's batches first: the objective divides by the step's counts over all
        # micro-steps and ranks (METHOD.md 5.5), and those come from the batches alone.
        micro_batches = []
        for _ in range(args.grad_accum):
            batch = next(batches, None)
            if batch is None:  # this rank's share of the data is empty
                break
            data_state = advance_state(data_state, batch)  # where to resume after this batch
            micro_batches.append(prepare_batch(batch, teachers, args.chunk_merge))
        # [student tokens, labelled tokens, then per teacher the targets its KD term averages],
        # and the number of ranks whose data ran out
        counts = torch.zeros(3 + len(teachers), dtype=torch.float64)
        counts[-1] = len(micro_batches) < args.grad_accum
        counts[:-1] = sum((b["counts"] for b in micro_batches), counts[:-1])
        counts = counts.to(device)
        if ddp:
            dist.all_reduce(counts)
        counts, ran_out = counts[:-1], int(counts[-1])
        if ran_out:
            stop(f"{ran_out} rank(s) got no documents: the data has fewer documents than ranks x "
                 f"DataLoader workers ({world_size} x {max(args.num_workers, 1)}): lower "
                 "--num-workers, use fewer ranks, or add documents")
        step_sums = torch.zeros(N_STEP_SUMS + 3 * len(teachers) + 1, device=device)
        for micro, batch in enumerate(micro_batches):
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            if ddp:  # sync gradients on the last micro-step only
                model.require_backward_grad_sync = micro == args.grad_accum - 1
            with autocast:
                s_logits = model(input_ids=batch["student_ids"],
                                 attention_mask=batch["student_mask"]).logits
            # each term: its mean over this micro-batch x (its count here / the step's count)
            ce_mean = losses.ce_loss(s_logits, batch["labels"])
            ce_part = ce_mean * share(batch["counts"][1], counts[1])
            kd_means, kd_parts = [], []
            for i, t in enumerate(teachers):
                with torch.no_grad(), autocast:
                    t_logits = t.model(input_ids=batch[f"teacher_ids_{i}"],
                                       attention_mask=batch[f"teacher_mask_{i}"]).logits
                try:
                    kd_mean = kd_loss(t, s_logits, t_logits, batch[f"student_chunk_{i}"],
                                      batch[f"teacher_chunk_{i}"], batch, args)
                except ValueError as e:
                    if str(e) != losses.NON_FINITE:
                        raise SystemExit(f"error: teacher {t.name}: {e}") from None
                    # skipped on every rank below; backward still runs, as DDP needs
                    kd_mean = s_logits.float().sum() * float("nan")
                kd_means.append(kd_mean)
                kd_parts.append(kd_mean * share(batch["counts"][2 + i], counts[2 + i]))
            weights = [t.weight for t in teachers]
            kd_mean = sum((w * k for w, k in zip(weights, kd_means)), ce_mean.new_zeros(()))
            if args.kd_scaling == "dynamic":  # loss = sg(CE / KD) * KD + CE, CE and KD of this
                # micro-batch (on this rank): the scale needs no second pass and no communication
                kd_scale = torch.where(kd_mean.detach() > 0, ce_mean.detach() / kd_mean.detach(),
                                       torch.ones_like(kd_mean))
                ce_scale = 1.0
            else:
                kd_scale, ce_scale = static_kd_weight, args.ce_weight
            loss = losses.combine(ce_part, kd_parts, weights, dynamic=False,
                                  kd_weight=kd_scale, ce_weight=ce_scale)
            # DDP averages gradients over ranks; the objective is their sum
            (loss * world_size).backward()
            kd_part = sum((w * k for w, k in zip(weights, kd_parts)), ce_part.new_zeros(()))
            scale_share = kd_scale / (args.grad_accum * world_size) if teachers else kd_scale * 0
            step_sums[:-1] += torch.stack([loss.detach(), ce_part.detach(), kd_part.detach(),
                                      scale_share.detach().float(), *(k.detach() for k in kd_parts),
                                      *batch["valid_union"]]).float()
        if w_params:  # W's weights live outside DDP: their gradients are averaged by hand
            for p in w_params:
                if p.grad is None:  # no valid chunk on this rank in this step
                    p.grad = torch.zeros_like(p)
                if ddp:
                    dist.all_reduce(p.grad, op=dist.ReduceOp.AVG)
        # the step's values over all ranks, whether any rank saw a non-finite loss, and
        # whether any rank was asked to stop
        step_sums[-1] = float(bool(signalled))
        if ddp:
            dist.all_reduce(step_sums)
        asked_to_stop = bool(step_sums[-1] > 0)
        bad = not bool(torch.isfinite(step_sums[:N_STEP_SUMS]).all())
        grad_norm = float("nan")
        if not bad:  # gradients are equal on every rank here: so is this decision
            grad_norm = float(torch.nn.utils.clip_grad_norm_(student.parameters(), args.grad_clip))
            bad = not math.isfinite(grad_norm) or any(
                not bool(torch.isfinite(p.grad).all()) for p in w_params)
        if not bad:
            optimizer.step()
            bad_in_a_row, streak_start = 0, None
        else:
            skipped += 1
            bad_in_a_row += 1
            streak_start = streak_start or step + 1
            if master:
                print(f"warning: non-finite loss or gradient at step {step + 1}, update skipped",
                      file=sys.stderr)
        optimizer.zero_grad(set_to_none=True)
        step += 1

        # ---- log and save ----------------------------------------------------------------------
        values = torch.cat([step_sums.double(), counts]).tolist()  # one read of the device
        n_tokens = values[-len(counts)]
        n_teachers = len(teachers)
        record = {"step": step, "lr": args.lr * scale, "loss": values[0], "ce": values[1],
                  "kd": values[2], "kd_scale": values[3], "grad_norm": grad_norm,
                  "tokens": int(n_tokens), "skipped": skipped,
                  "tokens_per_s": n_tokens / (time.perf_counter() - started)}
        valid_union = values[N_STEP_SUMS + n_teachers : N_STEP_SUMS + 3 * n_teachers]
        record["valid_chunks"] = sum(valid_union[0::2]) / max(sum(valid_union[1::2]), 1)
        if cuda:
            record["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        for t, value in zip(teachers, values[N_STEP_SUMS:N_STEP_SUMS + n_teachers]):
            record[f"kd/{t.name}"] = value
        if step % args.log_every == 0 or step == last_step or bad_in_a_row > args.max_bad_steps:
            # skipped/split documents by reason, over all ranks (every rank logs this step)
            issues = torch.tensor([issue_counts(data_state)[r] for r in REASONS], device=device)
            if ddp:
                dist.all_reduce(issues)
            record["data_issues"] = {r: n for r, n in zip(REASONS, issues.tolist()) if n}
        stopping = bad_in_a_row > args.max_bad_steps
        if step % args.log_every == 0 or step == last_step or stopping:
            logger.log(record)
        if stopping:
            if progress:
                progress.close()
            stop(f"{bad_in_a_row} non-finite steps in a row (last at step {step}): lower --lr, "
                 "check the data, or resume from an earlier checkpoint")
        if progress:
            progress.update(1)
            progress.set_postfix(loss=f"{record['loss']:.3f}", ce=f"{record['ce']:.3f}")
        due = args.save_every and (step % args.save_every == 0 or step == last_step)
        if due or asked_to_stop:
            # never from non-finite weights; rotation keeps the newest checkpoint from before
            # the current run of skipped steps
            if not all(bool(torch.isfinite(p).all()) for p in student.parameters()):
                if master:
                    print(f"warning: non-finite weights at step {step}: no checkpoint written",
                          file=sys.stderr)
            else:
                before = [s for s, _ in run_dir.checkpoints(out_dir) if s < (streak_start or 0)]
                error = save_checkpoint(out_dir, step, student, student_tok, optimizer,
                                        projections, data_state, skipped, args, rank, world_size,
                                        ddp, protect=max(before, default=None))
                if error:
                    latest = run_dir.checkpoints(out_dir)
                    latest = f"step_{latest[-1][0]}" if latest else "none"
                    stop(f"checkpoint step_{step} could not be written ({error}); the latest "
                         f"complete checkpoint is {latest}: fix that, then --resume")
        if asked_to_stop:
            if progress:
                progress.close()
            logger.log(record)
            if master:
                print(f"stopped by a signal after step {step}: checkpoint step_{step} written; "
                      "run again with --resume to continue", file=sys.stderr)
            stop_code = 128 + (signalled[0] if signalled else signal.SIGTERM)
            lock.release()
            if ddp:
                dist.destroy_process_group()
            sys.exit(stop_code)
    if progress:
        progress.close()
    logger.close()
    lock.release()
    if ddp:
        dist.destroy_process_group()


PAD_LOGIT = -1e4  # exp() of it underflows to exactly 0 in any float dtype: out of every softmax


def kd_loss(t: Teacher, s_logits, t_logits, s_chunk, t_chunk, batch, args) -> torch.Tensor:
    """The KD term of one teacher, by its loss (METHOD.md 5.2-5.4): a mean over this batch."""
    tau = args.temperature
    if t.loss == "kl":  # same tokenizer and ids: position p of both models predicts the same token
        if t.vocab < t_logits.shape[-1]:  # equal padded vocabularies: the padding is no target
            t_logits[..., t.vocab :] = PAD_LOGIT
        mask = batch["labels"] != -100
        return losses.kl_loss(s_logits, t_logits, mask, vocab_topk=args.vocab_topk, temperature=tau)
    if t_logits.shape[-1] != t.vocab:  # a forward that bypasses the trimmed output layer
        raise ValueError(f"its forward gives {t_logits.shape[-1]} logits for {t.vocab} "
                         "tokenizer ids: its output layer could not be trimmed")  # fmt: skip
    if t.loss == "pkl":
        return losses.pkl_loss(s_logits, t_logits, s_chunk, t_chunk, t.W,
                               vocab_topk=args.vocab_topk, temperature=tau)
    if t.loss == "uld":
        return losses.uld_loss(s_logits, t_logits, s_chunk, t_chunk, uld_topk=args.uld_topk,
                               temperature=tau)
    if t.loss in ("gold", "hkl"):  # H-KL is GOLD with a wider common set
        return losses.gold_loss(s_logits, t_logits, s_chunk, t_chunk, t.pairs,
                                uld_topk=args.uld_topk, temperature=tau)
    raise ValueError(f"unknown loss {t.loss!r}")


def agree(error: str | None, ddp: bool) -> str | None:
    return first_error(error) if ddp else error


def save_checkpoint(out_dir, step, student, tok, optimizer, projections, data_state, skipped,
                    args, rank, world_size, ddp, protect=None) -> str | None:
    """out_dir/step_N/: save_pretrained weights + tokenizer (lm-eval/vLLM load it as it is), the
    trainer state, and each rank's RNG and data position. Written into a temp directory that is
    renamed when complete, so a kill mid-write leaves the previous checkpoint intact; a failed
    write (a full disk) removes the temp directory and returns its reason, on every rank. Then
    the oldest checkpoints beyond --keep-last go (never step `protect`), and so does a run that
    --overwrite moved aside."""
    tmp = os.path.join(out_dir, f".tmp_step_{step}")

    def shared() -> None:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            student.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
            torch.save({"optimizer": optimizer.state_dict(), "step": step, "skipped": skipped,
                        "world_size": world_size,
                        "projections": [p.state_dict() for p in projections],
                        "args": json.dumps(vars(args), default=str)},
                       os.path.join(tmp, "trainer_state.pt"))  # fmt: skip

    def mine() -> None:
        python_rng = random.getstate()
        torch.save({"torch_rng": torch.get_rng_state(), "data_state": data_state,
                    "python_rng": [python_rng[0], list(python_rng[1])]},
                   os.path.join(tmp, f"rank_{rank}.pt"))  # fmt: skip

    def publish() -> None:
        if rank == 0:
            final = os.path.join(out_dir, f"step_{step}")
            if os.path.exists(final):  # a damaged one that the resume skipped: replaced
                shutil.rmtree(final)
            os.replace(tmp, final)
            run_dir.rotate(out_dir, args.keep_last, protect)
            run_dir.drop_overwritten(out_dir)

    for part in (shared, mine, publish):
        error = None
        try:
            part()
        except OSError as e:
            error = os_error_line(e)
        error = agree(error, ddp)
        if error:
            if rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            return error
    return None


def _logged_step(line: str) -> float:
    """A metrics.jsonl line's step; inf for a line that is not a record (half-written by a
    killed run: dropped on resume)."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


class Logger:
    """metrics.jsonl (one JSON line per logged step) and, when installed and asked for,
    Weights & Biases or TensorBoard. On resume, lines past the resumed step are dropped."""

    def __init__(self, args, out_dir: str, master: bool, start_step: int):
        self.master, self.path = master, os.path.join(out_dir, "metrics.jsonl")
        self.wandb = self.tensorboard = None
        if not master:
            return
        if os.path.exists(self.path):
            kept = [line for line in open(self.path) if _logged_step(line) <= start_step]
            atomic_write(self.path, lambda f: f.write("".join(kept).encode()))
        if args.wandb:
            try:
                import wandb

                self.wandb = wandb.init(project="xtoken", config=vars(args), resume="allow")
            except ImportError:
                print("warning: --wandb needs `pip install wandb`; logging to metrics.jsonl only")
        if args.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tensorboard = SummaryWriter(os.path.join(out_dir, "tensorboard"))
            except ImportError:
                print("warning: --tensorboard needs `pip install tensorboard`; metrics.jsonl only")

    def log(self, record: dict) -> None:
        if not self.master:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb:
            self.wandb.log(record, step=record["step"])
        if self.tensorboard:
            for key, value in record.items():
                self.tensorboard.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.tensorboard:
            self.tensorboard.close()


if __name__ == "__main__":
    main()
