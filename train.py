"""Cross-tokenizer knowledge distillation: one student, one or more teachers, one training loop.

    torchrun --nproc_per_node=8 train.py --teacher Qwen/Qwen3-4B --loss pkl
    torchrun --nproc_per_node=8 train.py --teacher microsoft/Phi-4-mini-instruct --loss hkl \\
        --teacher meta-llama/Llama-3.2-3B --loss kl --teacher-weight 0.8 --teacher-weight 0.2
    python train.py --loss ce                                      # continued pre-training baseline
    torchrun --nproc_per_node=2 train.py --preset tiny --max-steps 20   # CPU, gloo, no downloads

main() is the recipe, top to bottom: settings, DDP, the run directory, the student, the teachers
with their losses and W, data, optimizer, the loop, checkpoints. Each teacher sees the same text as
the student, tokenized its own way; data.py aligns the two token streams into chunks and the losses
(losses.py, METHOD.md 5) compare chunks. Validate, then act: every flag, the run directory, the
models, W and the data are checked on every rank before anything is written.
"""

from __future__ import annotations

import argparse
import copy
import difflib
import functools
import importlib.metadata
import inspect
import json
import math
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import time
import uuid
from contextlib import nullcontext
from dataclasses import dataclass
from typing import NamedTuple, NoReturn

import numpy as np
import torch
import torch.distributed as dist
import yaml
from safetensors.torch import load_file
from torch.distributed.checkpoint.api import CheckpointException
from tqdm import tqdm
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)
from transformers.utils import logging as hf_logging

import blocked
import curves
import losses
import run_dir
import sharding
from audit import audit
from build_projection import cached_projection, hkl_pairs, load_projection
from cli import ArgumentParser, atomic_write, os_error_line
from data import REASONS, AlignedWindows, advance_state, collate, issue_counts, make_tiny_corpus
from tokens import load_tokenizer, tokenizer_hash

# Run settings that must match to --resume a run (the rest, e.g. --max-steps, may change).
# (The tables below opt out of the formatter: as sentences they read; one value a line, they don't.)
RESUME_KEYS = (
    "student", "teacher", "loss", "teacher_weight", "learn_projection", "seq_len", "batch_size",
    "grad_accum", "chunk_merge", "kd_scaling", "kd_weight", "ce_weight", "preset", "data",
    "data_config", "split", "pack", "shuffle", "shuffle_buffer", "seed", "vocab_topk", "uld_topk",
    "hkl_threshold", "temperature", "lr", "pkl_floor",
)  # fmt: skip
# Settings added since: what a run that predates them did (so that it can still be resumed).
OLDER_DEFAULTS = {"pkl_floor": "clamp"}
# Presets build random models with the REAL tokenizers (no downloads). tiny: 2 layers, width 64,
# for CPU tests and the demo. shapes-1b-4b: Llama-3.2-1B and Qwen3-4B shapes, for GPU throughput
# (random weights: the speed of a step does not depend on them); 6 x 2,048 tokens per GPU per step
# as in the public reference run (global batch 96 on 16 GPUs).
PRESETS = {
    "tiny": dict(
        student="pkg:llama-3.2", teacher=["pkg:qwen3"], seq_len=64, batch_size=2, grad_accum=1,
        max_steps=20, lr=1e-3, min_lr=1e-4, warmup_steps=2, log_every=1, save_every=10,
        num_workers=1,
    ),
    "shapes-1b-4b": dict(
        student="pkg:llama-3.2", teacher=["pkg:qwen3"], seq_len=2048, batch_size=2, grad_accum=3,
        max_steps=20, warmup_steps=2, log_every=1, save_every=0, num_workers=4,
    ),
}  # fmt: skip
# Model shapes of the presets: (student, teacher) by preset; vocab is at least the tokenizer's.
SHAPES = {
    "tiny": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16,
    ),
    "llama-3.2-1b": dict(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, vocab_size=128256,
    ),
    "qwen3-4b": dict(
        hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, vocab_size=151936,
    ),
}  # fmt: skip
PRESET_SHAPES = {"tiny": ("tiny", "tiny"), "shapes-1b-4b": ("llama-3.2-1b", "qwen3-4b")}
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
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
PAD_LOGIT = -1e4  # exp() of it underflows to exactly 0 in any float dtype: out of every softmax


def main(argv: list[str] | None = None) -> None:
    # ---- settings, and this process's place in the torchrun job ------------------------------
    args = parse_args(argv)
    hf_logging.disable_progress_bar()  # transformers' save and load bars: not in the training bar
    job = Job(args.out_dir)  # DDP from torchrun's environment: nccl on GPUs, gloo on CPU
    handlers = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    try:
        # ---- checks first: flags, the run directory, models, W, data; nothing written before
        settings = job.together(check_settings, args)
        # rank 0 inspects the directory (the others get False) and tells every rank what it found
        decision = job.broadcast(job.together(lambda: job.master and inspect_run_dir(args, job)))
        # ---- the student: fp32 weights (bf16 autocast on GPU), the same seed on every rank;
        # under --fsdp the models load on the CPU and only each rank's shard goes to the GPU
        student_tok, student = job.together(load_student, args, load_device(args, job))
        # ---- the teachers, each with its loss and, across tokenizers, its W
        teachers = job.together(load_teachers, args, settings, student_tok, student, job)
        job.together(attach_projections, teachers, args, student_tok, student, job.device)
        learned = [t.W for t in teachers if isinstance(t.W, losses.LearnableProjection)]
        if args.fsdp:  # each rank keeps its shard of every model (sharding.py)
            for model in [student, *(t.model for t in teachers)]:
                job.together(sharding.shard_model, model, job.cuda, model is student)
        resume = {}
        if decision["resume"]:
            resume = job.together(load_resume, decision, student, learned, job, args.fsdp)
            if job.master:  # once every rank has loaded it
                for warning in decision["warnings"]:
                    print(f"warning: {warning}", file=sys.stderr)
                print(f"resuming from {decision['resume'][1]}")
        # ---- data: tokenization and alignment run in DataLoader workers
        source = job.together(data_source, args, job.master)
        toks, start = [t.tok for t in teachers], resume.get("data_state")
        dataset = job.together(
            make_dataset, args, source, student_tok, toks, start, job.rank, job.world_size
        )
        job.together(lambda: job.master and start_run(args))  # every check passed: it starts
        if job.master:
            describe(args, student, teachers, job.world_size)
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            collate_fn=functools.partial(collate, pad_ids=dataset.pad_ids),
            worker_init_fn=ignore_stop_signals,
        )
        # ---- optimizer: AdamW, warm-up then cosine; W's weights get their own group
        optimizer = make_optimizer(args, student, learned, resume, job.cuda)
        if "sharded" in resume:  # --fsdp: each rank reads its shard of weights and optimizer
            job.together(sharding.load_sharded, resume["sharded"], student, learned, optimizer)
        model = student
        if args.compile:  # the forward passes compiled (the losses run eagerly: blocked.py)
            model = torch.compile(student)
            for t in teachers:
                t.model = torch.compile(t.model)
        if job.ddp and not args.fsdp:
            model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[job.local_rank] if job.cuda else None
            )
        # ---- the loop; checkpoints as it goes
        trainer = Trainer(args, job, model, student, student_tok, teachers, learned, optimizer)
        trainer.loop(iter(loader), resume)
    finally:  # whatever ends the run in this process; a killed process leaves a stale lock
        job.lock.release()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    job.end()


# ----------------------------------------------------------------------------- settings


def build_parser() -> ArgumentParser:
    """Every flag, with its help and default (train.py --help), in groups."""
    p = ArgumentParser(
        prog="train.py", description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter
    )
    for add_flags in (_teacher_flags, _objective_flags, _data_flags, _optimizer_flags, _run_flags):
        add_flags(p)
    return p


def _teacher_flags(p: ArgumentParser) -> None:
    a = p.add_argument_group("student and teachers").add_argument
    a("--config", metavar="FILE.yaml", help="settings from a YAML file (configs/); flags win")
    a("--student", default="meta-llama/Llama-3.2-1B", help="hub name or checkpoint directory")
    a("--teacher", action="append", help="a teacher model; repeat for several")
    a(
        "--loss",
        action="append",
        choices=["auto", *KD_LOSSES, "ce"],
        help="per teacher, in --teacher order (one value: all); auto: the audit's choice "
        "(default: auto; ce without --teacher)",
    )
    a(
        "--teacher-weight",
        action="append",
        type=float,
        help="alpha_m per teacher (default: 1 / number of teachers)",
    )
    a("--projection", action="append", help="W file per teacher (default: a cached build)")
    a(
        "--projection-cache",
        default=os.path.expanduser("~/.cache/xtoken"),
        help="where W is built once per tokenizer pair",
    )
    a("--learn-projection", action="store_true", help="learn W's weights (P-KL only)")
    a("--trust-remote-code", action="store_true", help="allow models' own code from the hub")
    a("--preset", choices=sorted(PRESETS), help="random models with the real tokenizers")


def _objective_flags(p: ArgumentParser) -> None:
    a = p.add_argument_group("objective (METHOD.md 5)").add_argument
    a(
        "--kd-scaling",
        choices=["dynamic", "static"],
        default="dynamic",
        help="dynamic: sg(CE/KD) KD + CE; static: --kd-weight KD + --ce-weight CE",
    )
    a("--kd-weight", type=float, default=1.0, help="static scaling's KD weight")
    a("--ce-weight", type=float, default=1.0, help="static scaling's CE weight")
    a("--temperature", type=float, default=1.0, help="tau of every KD softmax")
    a("--vocab-topk", type=int, default=8192, help="P-KL/KL teacher subset (0: all ids)")
    a("--uld-topk", type=int, default=8192, help="ids ULD sorts (0: all)")
    a("--hkl-threshold", type=float, default=0.6, help="W weight that joins H-KL's common set")
    a(
        "--pkl-floor",
        choices=losses.Q_FLOORS,
        default="clamp",
        help="P-KL's log of the renormalized projected q: clamp log(max(q / max(sum q, 1e-10), "
        "1e-10)) (no gradient below the floor) or add log(q / (sum q + 1e-10) + 1e-10) (a damped "
        "one); METHOD.md 5.2",
    )
    a(
        "--chunk-merge",
        choices=["mean", "first"],
        default="mean",
        help="a chunk's distribution: mean over its positions, or its first position",
    )


def _data_flags(p: ArgumentParser) -> None:
    a = p.add_argument_group("data").add_argument
    a(
        "--data",
        default="OptimalScale/ClimbMix",
        help="hub dataset, or local .txt/.jsonl/.parquet files, a directory or a glob",
    )
    a("--data-config", help="hub dataset configuration (its subset name)")
    a("--split", default="train", help="hub dataset split")
    a("--text-field", default="text", help="the field that holds a document's text")
    a(
        "--no-pack",
        dest="pack",
        action="store_false",
        help="one document per window (default: documents packed into full windows)",
    )
    a(
        "--no-shuffle",
        dest="shuffle",
        action="store_false",
        help="documents in file order (default: a seeded shuffle, reseeded per epoch)",
    )
    a("--shuffle-buffer", type=int, default=10_000, help="documents each worker shuffles")
    a("--seq-len", type=int, default=2048, help="student tokens per window")
    a("--teacher-cap", type=int, help="teacher tokens per window (default: 2 x --seq-len)")
    a("--num-workers", type=int, default=2, help="DataLoader workers per rank")


def _optimizer_flags(p: ArgumentParser) -> None:
    a = p.add_argument_group("optimizer (the public reference config)").add_argument
    a("--batch-size", type=int, default=4, help="sequences per rank per micro-step")
    a("--grad-accum", type=int, default=3, help="micro-steps per optimizer step")
    a("--max-steps", type=int, default=30_000, help="optimizer steps; the schedule's length")
    a(
        "--stop-step",
        type=int,
        help="end this job after step N (the schedule follows --max-steps; --resume goes on)",
    )
    a("--lr", type=float, default=5e-5, help="peak learning rate")
    a("--min-lr", type=float, default=5e-6, help="learning rate at the end of the cosine")
    a("--warmup-steps", type=int, default=300, help="linear warm-up steps")
    a("--weight-decay", type=float, default=0.1, help="AdamW's, on matrices only")
    a("--betas", type=float, nargs=2, default=(0.9, 0.95), help="AdamW's")
    a("--grad-clip", type=float, default=1.0, help="clip the student's gradient norm")
    a("--projection-lr", type=float, default=1e-2, help="learning rate of a learned W")
    a("--max-bad-steps", type=int, default=5, help="non-finite steps in a row before stopping")
    a("--seed", type=int, default=1337, help="weights, data order and shuffle")
    a("--compile", action="store_true", help="torch.compile the student's and teachers' forward")
    a(
        "--attn-implementation",
        help="transformers' attention kernel for every model: sdpa, flash_attention_2 (needs the "
        "flash-attn package), eager, ... (default: transformers' choice, sdpa where it can)",
    )
    a(
        "--fused-head",
        action="store_true",
        default=True,
        help="the losses compute the student's logits block by block from its last hidden states "
        "(never [tokens, vocabulary] at once)",
    )
    a(
        "--no-fused-head",
        dest="fused_head",
        action="store_false",
        help="the student's forward builds all its logits (the losses read them)",
    )
    a("--gradient-checkpointing", action="store_true", help="recompute activations")
    a(
        "--fsdp",
        action="store_true",
        help="shard the student and the teachers over the ranks (FSDP2) instead of DDP's copies",
    )


def _run_flags(p: ArgumentParser) -> None:
    a = p.add_argument_group("run directory, checkpoints and logs").add_argument
    a("--out-dir", default="out/run", help="one run per directory")
    a("--resume", action="store_true", help="continue from the latest complete checkpoint")
    a("--overwrite", action="store_true", help="replace a previous run in --out-dir")
    a("--save-every", type=int, default=1000, help="steps between checkpoints (0: none)")
    a("--keep-last", type=int, default=3, help="checkpoints kept")
    a(
        "--save-dtype",
        choices=["bfloat16", "float32"],
        default="bfloat16",
        help="dtype of the checkpoint's model weights (the fp32 master weights are kept beside)",
    )
    a("--log-every", type=int, default=10, help="steps between metrics.jsonl lines")
    a(
        "--report-to",
        nargs="+",
        choices=["none", "wandb", "tensorboard"],
        default=["none"],
        help="trackers besides metrics.jsonl",
    )
    a("--run-name", help="the run's name in the trackers (default: --out-dir's name)")
    a("--wandb-project", default="xtoken", help="Weights & Biases project")
    a("--wandb", action="store_true", help="same as --report-to wandb")
    a("--tensorboard", action="store_true", help="same as --report-to tensorboard")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every flag's default in --help, but where the help says it already, an on/off flag's, and
    None (not set)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        on_off = isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction)
        if on_off or action.default is None or "default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Defaults, then --preset's, then --config's, then the command line: each wins over the
    one before."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    config = last_value(argv, "--config")
    if config is not None:
        argv = config_argv(parser, config, argv) + argv
    preset = last_value(argv, "--preset")
    if preset is not None and preset not in PRESETS:
        parser.error(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    if preset:  # a preset's values are defaults: --config and flags win
        parser.set_defaults(**{k: v for k, v in PRESETS[preset].items() if k != "teacher"})
    args = parser.parse_args(argv)
    if preset and args.teacher is None and args.loss != ["ce"]:
        args.teacher = PRESETS[preset]["teacher"]
    args.report_to = [r for r in dict.fromkeys(args.report_to) if r != "none"]
    args.report_to += [r for r in ("wandb", "tensorboard") if getattr(args, r)]
    args.report_to = list(dict.fromkeys(args.report_to))
    args.run_name = args.run_name or os.path.basename(os.path.abspath(args.out_dir))
    return args


def last_value(argv: list[str], flag: str) -> str | None:
    """The value of the last `flag V` or `flag=V` in argv (argparse keeps the last)."""
    value = None
    for i, x in enumerate(argv):
        if x == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif x.startswith(flag + "="):
            value = x.split("=", 1)[1]
    return value


def config_argv(parser: ArgumentParser, path: str, argv: list[str]) -> list[str]:
    """A config file's settings as flags, so that argparse checks them as it checks the command
    line. Keys are flag names (`teacher-weight` or `teacher_weight`); a list repeats a flag, and a
    repeated flag that the command line also gives is the command line's alone. A run's
    run_config.json is a config too: its "args", less --resume and --overwrite."""
    try:
        with open(path, encoding="utf-8") as f:
            settings = yaml.safe_load(f)
    except OSError as e:
        parser.error(f"--config {path}: {e.strerror}")
    except yaml.YAMLError as e:
        parser.error(f"--config {path} is not valid YAML ({str(e).splitlines()[0]})")
    skip = set()
    if isinstance(settings, dict) and isinstance(settings.get("args"), dict):
        settings, skip = settings["args"], {"config", "resume", "overwrite"}  # a run_config.json
    if not isinstance(settings, dict):
        parser.error(f"--config {path} must map flag names to values")
    actions = {a.dest: a for a in parser._actions if a.option_strings and a.dest != "help"}
    # a key names a setting (pack: false) or its flag (no-pack: true)
    names = {
        **{f.lstrip("-").replace("-", "_"): a for a in actions.values() for f in a.option_strings},
        **actions,
    }
    given = {x.split("=", 1)[0] for x in argv if x.startswith("--")}
    tokens: list[str] = []
    for key, value in settings.items():
        name = str(key).removeprefix("--").replace("-", "_")
        if name in skip:
            continue
        if name not in names or name == "config":
            close = difflib.get_close_matches(name, names, n=1)
            hint = f"; did you mean {close[0].replace('_', '-')}?" if close else ""
            parser.error(f"--config {path}: {key!r} is not a train.py setting{hint}")
        action = names[name]
        repeated = isinstance(action, argparse._AppendAction)
        if value is None or (repeated and given & set(action.option_strings)):
            continue  # the command line's own list of it replaces the config's
        as_flag = name != action.dest  # no-pack: true gives --no-pack
        tokens += flag_tokens(parser, action, value, f"--config {path}: {key}", as_flag)
    return tokens


def flag_tokens(
    parser: ArgumentParser, action: argparse.Action, value, where: str, as_flag: bool = False
) -> list[str]:
    """One config value as command-line tokens for its flag (as_flag: the key was the flag's
    name, so true means "give the flag")."""
    flag = action.option_strings[0]
    if isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction):
        if not isinstance(value, bool):
            parser.error(f"{where}: give true or false, not {value!r}")
        on = as_flag or isinstance(action, argparse._StoreTrueAction)
        return [flag] if value == on else []
    values = value if isinstance(value, list | tuple) else [value]
    if isinstance(action, argparse._AppendAction):
        return [token for v in values for token in (flag, str(v))]
    if action.nargs is None and len(values) != 1:
        parser.error(f"{where}: give one value, not a list")
    return [flag, *(str(v) for v in values)]


@dataclass
class Settings:
    """The per-teacher flags, one value per teacher."""

    teachers: list[str]
    losses: list[str]
    weights: list[float]
    projections: list[str | None]


def check_settings(args) -> Settings:
    """The flags on their own, before anything is read or written: ranges, and one loss, weight and
    W file per teacher."""
    for name, (ok, what) in RANGES.items():
        value = getattr(args, name)
        for v in value if isinstance(value, list | tuple) else [value]:
            if v is not None and not (math.isfinite(v) and ok(v)):
                raise ValueError(f"--{name.replace('_', '-')} {v}: must be {what}")
    if args.min_lr > args.lr:
        raise ValueError(f"--min-lr {args.min_lr} is above --lr {args.lr}")
    if args.fsdp and "RANK" not in os.environ:
        raise ValueError(
            "--fsdp shards over the processes of a torchrun job: start it with torchrun "
            "(--nproc_per_node=1 for one process)"
        )
    names = args.teacher or []
    loss_names = per_teacher(args.loss, len(names), "auto", "loss")
    if not names:
        if args.loss not in (None, ["ce"]):
            raise ValueError("--loss other than ce needs a --teacher")
        loss_names = []
    elif "ce" in loss_names:
        raise ValueError("--loss ce is the no-teacher baseline: drop --teacher or pick a KD loss")
    default_weight = 1.0 / max(1, len(names))
    weights = per_teacher(args.teacher_weight, len(names), default_weight, "teacher-weight")
    files = per_teacher(args.projection, len(names), None, "projection")
    if args.learn_projection and not loss_names.count("pkl") and "auto" not in loss_names:
        raise ValueError("--learn-projection learns W for P-KL: use it with --loss pkl")
    for path in files:
        if path and not os.path.isfile(path):
            raise ValueError(f"projection file {path} does not exist")
    return Settings(names, loss_names, weights, files)


def per_teacher(values: list | None, n: int, default, name: str) -> list:
    """One value per teacher: none -> default, one -> repeated, n -> as given."""
    if not values:
        return [default] * n
    if len(values) == 1:
        return values * n
    if len(values) != n:
        raise ValueError(f"{len(values)} values of --{name} for {n} teachers: give 1 or {n}")
    return values


# ----------------------------------------------------------------------------- processes


class Job:
    """This process in the torchrun job: its rank and device, the run directory's lock, and the
    one error path, taken by every rank together: one line on stderr (from rank 0), exit status
    2, no rank left waiting in a collective."""

    def __init__(self, out_dir: str):
        self.ddp = int(os.environ.get("RANK", -1)) != -1
        self.cuda = torch.cuda.is_available()
        if self.ddp:
            dist.init_process_group(backend="nccl" if self.cuda else "gloo")
        self.rank = dist.get_rank() if self.ddp else 0
        self.world_size = dist.get_world_size() if self.ddp else 1
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0)) if self.ddp else 0
        self.master = self.rank == 0
        self.device = torch.device(f"cuda:{self.local_rank}" if self.cuda else "cpu")
        if self.cuda:
            torch.cuda.set_device(self.device)
        self.lock = run_dir.RunLock(out_dir)

    def together(self, fn, *fn_args):
        """fn(*fn_args) on every rank; an expected failure on any rank (bad input: ValueError, the
        OS: OSError) stops every rank with its message. Also a barrier."""
        result, error = None, None
        try:
            result = fn(*fn_args)
        except ValueError as e:
            error = str(e)
        except OSError as e:
            error = os_error_line(e)
        error = self.agree(error)
        if error:
            self.stop(error)
        return result

    def agree(self, error: str | None) -> str | None:
        """The first error any rank met: every rank learns it, so that every rank stops."""
        if not self.ddp:
            return error
        errors = [None] * self.world_size
        dist.all_gather_object(errors, error)
        return next((e for e in errors if e), None)

    def broadcast(self, value):
        """Rank 0's value, on every rank."""
        if not self.ddp:
            return value
        shared = [value]
        dist.broadcast_object_list(shared, src=0)
        return shared[0]

    def stop(self, message: str, code: int = 2) -> NoReturn:
        if self.master:
            print(f"error: {message}", file=sys.stderr)
        self.end(code)

    def end(self, code: int | None = None) -> None:
        """The lock released, the process group destroyed; sys.exit(code) unless code is None.
        Every rank calls it together."""
        self.lock.release()
        if self.ddp and dist.is_initialized():
            # a barrier first: while it waits (without the GIL), gloo's thread finishes freeing the
            # last collective's tensors; freed later, with the group, the two threads deadlock
            dist.barrier()
            dist.destroy_process_group()
        if code is not None:
            sys.exit(code)


def ignore_stop_signals(worker_id: int) -> None:
    """A DataLoader worker ignores Ctrl-C (the terminal sends it to the whole process group: the
    rank's process stops gracefully) and leaves quietly on SIGTERM (the DataLoader's own way to end
    a worker; a scheduler's SIGTERM to every process): the rank already holds the batches of the
    step it finishes, and a worker killed by a signal would abort it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(0))


# ----------------------------------------------------------------------------- run directory


def inspect_run_dir(args, job: Job) -> dict:
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
    problem = job.lock.acquire()
    if problem:
        raise ValueError(problem)
    if not args.overwrite:
        check_same_configuration(args)
    previous = run_dir.checkpoints(out_dir)
    if previous and not args.resume and not args.overwrite:
        raise ValueError(
            f"{out_dir} holds a run (step {previous[-1][0]}): pass --resume to "
            "continue it or --overwrite to replace it"
        )
    decision = {"resume": None, "warnings": [], "created": created}
    if args.resume and not args.overwrite:
        found, decision["warnings"] = run_dir.newest_good_checkpoint(out_dir, job.world_size)
        if found is None:
            damaged = f" ({len(previous)} damaged)" if previous else ""
            raise ValueError(
                f"--resume: {out_dir} holds no complete checkpoint{damaged}: drop "
                "--resume to start a new run"
            )
        decision["resume"] = found
    return decision


def check_same_configuration(args) -> None:
    """A directory holds one run: its run_config.json must agree with these flags on RESUME_KEYS."""
    path = os.path.join(args.out_dir, "run_config.json")
    if not os.path.exists(path):
        return
    try:
        with open(path) as f:
            saved = json.load(f)
    except ValueError:
        raise ValueError(f"{path} is not valid JSON: repair or delete it") from None
    if isinstance(saved.get("args"), dict):  # the whole configuration (older runs: the keys only)
        saved = saved["args"]
    saved = OLDER_DEFAULTS | saved
    if not set(RESUME_KEYS) <= saved.keys():
        raise ValueError(
            f"{args.out_dir} holds a run of an older train.py (its settings lack "
            f"{sorted(set(RESUME_KEYS) - saved.keys())}): it cannot be resumed; "
            "pick another --out-dir, or pass --overwrite to replace it"
        )
    same = lambda k: json.dumps(saved.get(k)) == json.dumps(getattr(args, k))  # noqa: E731
    changed = [k for k in RESUME_KEYS if not same(k)]
    if changed:
        raise ValueError(
            f"{args.out_dir} holds a run with another configuration "
            f"({', '.join(sorted(changed))} differ): pick another --out-dir, or pass "
            "--overwrite to replace it"
        )


def start_run(args) -> None:
    """Rank 0, once every check has passed: --overwrite moves the old run aside (deleted at the
    new run's first checkpoint), and run_config.json is written."""
    if args.overwrite and run_dir.move_aside(args.out_dir):
        print(
            f"--overwrite: the previous run in {args.out_dir} is moved to "
            f"{run_dir.OVERWRITTEN}/ until this run's first checkpoint"
        )
    config = json.dumps(run_config(args), indent=2)
    atomic_write(os.path.join(args.out_dir, "run_config.json"), lambda f: f.write(config.encode()))


LIBRARIES = ("torch", "transformers", "tokenizers", "datasets", "numpy", "safetensors", "lm_eval")


def run_config(args) -> dict:
    """The run's whole configuration: every flag as resolved (defaults, --preset, --config and the
    command line), the libraries' versions and the code's git commit. `--config` reads it back."""
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {"args": vars(args), "versions": versions, "git": git_state()}


def git_state() -> dict | None:
    """This code's git commit and whether files differ from it; None outside a git checkout."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(
            ["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        status = subprocess.run(
            ["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):  # no git here
        return None
    if commit.returncode != 0:
        return None
    return {"commit": commit.stdout.strip(), "modified": bool(status.stdout.strip())}


# ----------------------------------------------------------------------------- models


def load_student(args, device: torch.device):
    """The student's tokenizer and model: fp32 weights, the same seed on every rank (identical
    initial weights; DDP also broadcasts them)."""
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)
    tok = load_tokenizer(args.student, trust_remote_code=args.trust_remote_code)
    student = load_model(args.student, tok, args, torch.float32, device)
    if args.gradient_checkpointing:
        enable = getattr(student, "activation_checkpointing_enable", None)  # transformers >= 5
        (enable or student.gradient_checkpointing_enable)()
    return tok, student


def load_device(args, job: Job) -> torch.device:
    """Where models load: this rank's device; under --fsdp the CPU (sharding moves each rank's
    shard to its device: no rank ever holds a whole model there)."""
    return torch.device("cpu") if args.fsdp else job.device


def load_model(name: str, tok, args, dtype: torch.dtype, device: torch.device):
    """A checkpoint directory or hub model; a random preset model for pkg: names with --preset."""
    if name.startswith("pkg:") and not os.path.isdir(name):
        if not args.preset:
            raise ValueError(f"{name} is a tokenizer, not a model: use it with --preset tiny")
        vocab = -(-len(tok) // 64) * 64  # pad to a multiple of 64, as real models do
        arch = "qwen3" if "qwen" in name else "llama"
        shape = PRESET_SHAPES[args.preset][arch == "qwen3"]
        with torch.device(device):  # initialised where it runs: a 4B model is slow to init on CPU
            model = tiny_model(arch, vocab, args.seq_len, shape, args.attn_implementation)
            return model.to(dtype)
    model = AutoModelForCausalLM.from_pretrained(
        name,
        dtype=dtype,
        trust_remote_code=args.trust_remote_code,
        attn_implementation=args.attn_implementation,
    )
    return model.to(device)


def tiny_model(
    arch: str, vocab_size: int, seq_len: int, shape: str = "tiny", attention: str | None = None
):
    """A random Llama/Qwen3 of a SHAPES entry, with at least vocab_size output rows."""
    config = dict(SHAPES[shape], max_position_embeddings=max(4 * seq_len, 512))
    if attention:
        config.update(attn_implementation=attention)
    config.update(tie_word_embeddings=True, vocab_size=max(vocab_size, config.get("vocab_size", 0)))
    if arch == "qwen3":
        return Qwen3ForCausalLM(Qwen3Config(**config))
    return LlamaForCausalLM(LlamaConfig(**config))


@dataclass
class Teacher:
    """One teacher and what its KD term needs (METHOD.md 5.2-5.4)."""

    name: str
    tok: object
    model: torch.nn.Module
    loss: str  # a key of KD_LOSSES ("auto" until attach_projection asks the audit)
    weight: float  # alpha_m
    vocab: int  # its tokenizer's ids: output rows beyond them are padding
    w_path: str | None = None  # across tokenizers: the W file
    W: torch.Tensor | losses.LearnableProjection | None = None  # P-KL: the projection
    pairs: torch.Tensor | None = None  # GOLD, H-KL: the common set


def load_teachers(args, settings: Settings, student_tok, student, job: Job) -> list[Teacher]:
    """Each teacher's tokenizer and model (eval, no gradients; bf16 on GPU); a same-tokenizer
    teacher's loss is kl; across tokenizers, the W file (each node's first rank builds a missing
    one into the cache). attach_projections then loads W and settles the loss."""
    student_vocab = student.get_output_embeddings().weight.shape[0]
    dtype = torch.bfloat16 if job.cuda else torch.float32
    teachers = []
    for i, name in enumerate(settings.teachers):
        tok = load_tokenizer(name, trust_remote_code=args.trust_remote_code)
        device = load_device(args, job)
        model = load_model(name, tok, args, dtype, device).to(device, dtype).eval()
        model.requires_grad_(False)
        rows = model.get_output_embeddings().weight.shape[0]
        t = Teacher(name, tok, model, settings.losses[i], settings.weights[i], min(len(tok), rows))
        if tokenizer_hash(tok) == tokenizer_hash(student_tok) and t.loss in ("kl", "auto"):
            if rows != student_vocab:
                raise ValueError(
                    f"teacher {name} has {rows} output rows, the student "
                    f"{student_vocab}: KL needs equal vocabularies"
                )
            t.loss = "kl"  # the same tokenizer and ids: position p of both predicts one token
        elif t.loss == "kl":
            raise ValueError(
                f"--loss kl needs the student's tokenizer; teacher {name} has "
                "another: use pkl, hkl or gold"
            )
        else:
            trim_output_vocabulary(model, t.vocab)  # its padded rows: never a target
            # W: the given file, or the cache's, built by each node's first rank if missing
            t.w_path = settings.projections[i] or cached_projection(
                args.projection_cache,
                student_tok,
                tok,
                student_vocab,
                t.vocab,
                build=job.local_rank == 0,
            )
        teachers.append(t)
    return teachers


def attach_projections(teachers: list[Teacher], args, student_tok, student, device) -> None:
    for t in teachers:
        if t.w_path:
            attach_projection(t, student_tok, student, args, device)


def attach_projection(t: Teacher, student_tok, student, args, device) -> None:
    """W from t.w_path (verified against both tokenizers, padded columns cut), the loss it decides
    (auto: the audit's recommendation), and what that loss takes from it."""
    path, student_vocab = t.w_path, student.get_output_embeddings().weight.shape[0]
    projection = load_projection(path, student_tok, t.tok)
    W = drop_padded_columns(projection["W"], t.vocab, path)
    if tuple(W.shape) != (student_vocab, t.vocab):
        raise ValueError(
            f"teacher {t.name}'s vocabulary ({t.vocab} ids; student {student_vocab} "
            f"rows) does not match its W {tuple(W.shape)} in {path}: rebuild W with "
            "--student-vocab-size/--teacher-vocab-size"
        )
    if t.loss == "auto":
        t.loss = audit(student_tok, projection, threshold=args.hkl_threshold)["recommended"]
    if args.learn_projection and t.loss != "pkl":
        raise ValueError(f"--learn-projection is for P-KL; teacher {t.name} uses {t.loss}")
    W = W.to(device)
    if t.loss == "pkl":
        t.W = losses.LearnableProjection(W).to(device) if args.learn_projection else W
    elif t.loss == "hkl":
        exact = projection["exact_pairs"]
        t.pairs = hkl_pairs(W, exact, threshold=args.hkl_threshold).to(device)
    elif t.loss == "gold":
        t.pairs = projection["exact_pairs"].to(device)


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


def trim_output_vocabulary(model: torch.nn.Module, n: int) -> None:
    """Keep the first n output rows of a teacher (its tokenizer's ids): the rest pad the matrix to
    a round size (Qwen3: 151,936 rows for 151,669 ids) and must never enter a softmax, a top-k
    subset or GOLD's uncommon set. The kept rows are a view: no copy, tied embeddings stay."""
    head = model.get_output_embeddings()
    if head.weight.shape[0] <= n:
        return
    bias = head.bias is not None
    trimmed = torch.nn.Linear(head.in_features, n, bias=bias, device="meta")
    trimmed.weight = torch.nn.Parameter(head.weight[:n], requires_grad=False)
    if bias:
        trimmed.bias = torch.nn.Parameter(head.bias[:n], requires_grad=False)
    model.set_output_embeddings(trimmed)


def describe(args, student, teachers: list[Teacher], world_size: int) -> None:
    n_params = sum(p.numel() for p in student.parameters())
    tokens_per_step = args.batch_size * args.grad_accum * world_size * args.seq_len
    print(
        f"student {args.student}: {n_params / 1e6:.1f}M parameters; {world_size} rank(s) "
        f"({'FSDP: each holds a shard' if args.fsdp else 'DDP: each holds a copy'}); "
        f"{tokens_per_step:,} student tokens per step"
    )
    for t in teachers:
        print(f"teacher {t.name}: loss {t.loss}, weight {t.weight}")


# ----------------------------------------------------------------------------- the KD terms
# One KD term per teacher and micro-batch, by loss name (METHOD.md 5.2-5.4): a mean over the
# micro-batch's valid chunks (positions for kl).


def kd_pkl(t: Teacher, s_logits, t_logits, batch: dict, i: int, args) -> torch.Tensor:
    s_chunk, t_chunk = chunks(batch, i)
    return losses.pkl_loss(
        s_logits,
        t_logits,
        s_chunk,
        t_chunk,
        t.W,
        vocab_topk=args.vocab_topk,
        temperature=args.temperature,
        floor=args.pkl_floor,
    )


def kd_gold(t: Teacher, s_logits, t_logits, batch: dict, i: int, args) -> torch.Tensor:
    """GOLD, and H-KL: GOLD with a wider common set (t.pairs)."""
    s_chunk, t_chunk = chunks(batch, i)
    return losses.gold_loss(
        s_logits,
        t_logits,
        s_chunk,
        t_chunk,
        t.pairs,
        uld_topk=args.uld_topk,
        temperature=args.temperature,
    )


def kd_uld(t: Teacher, s_logits, t_logits, batch: dict, i: int, args) -> torch.Tensor:
    s_chunk, t_chunk = chunks(batch, i)
    return losses.uld_loss(
        s_logits, t_logits, s_chunk, t_chunk, uld_topk=args.uld_topk, temperature=args.temperature
    )


def kd_kl(t: Teacher, s_logits, t_logits, batch: dict, i: int, args) -> torch.Tensor:
    """Same tokenizer and ids: position p of both models predicts the same token."""
    if t.vocab < t_logits.shape[-1]:  # equal padded vocabularies: the padding is no target
        t_logits[..., t.vocab :] = PAD_LOGIT
    mask = batch["labels"] != -100
    return losses.kl_loss(
        s_logits, t_logits, mask, vocab_topk=args.vocab_topk, temperature=args.temperature
    )


def chunks(batch: dict, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher i's chunk ids: (student side, teacher side)."""
    return batch[f"student_chunk_{i}"], batch[f"teacher_chunk_{i}"]


KD_LOSSES = {"pkl": kd_pkl, "hkl": kd_gold, "gold": kd_gold, "uld": kd_uld, "kl": kd_kl}


def kd_loss(t: Teacher, s_logits, t_logits, batch: dict, i: int, args) -> torch.Tensor:
    """Teacher i's KD term on this micro-batch, by its loss."""
    if t.loss not in KD_LOSSES:
        raise ValueError(f"unknown loss {t.loss!r}; choose from {', '.join(KD_LOSSES)}")
    if t.loss != "kl" and t_logits.shape[-1] != t.vocab:  # a forward that skips the trimmed layer
        raise ValueError(
            f"its forward gives {t_logits.shape[-1]} logits for {t.vocab} "
            "tokenizer ids: its output layer could not be trimmed"
        )
    return KD_LOSSES[t.loss](t, s_logits, t_logits, batch, i, args)


# ----------------------------------------------------------------------------- data


def data_source(args, master: bool) -> str:
    """--data; with a preset and no --data, a small generated corpus (rank 0 writes it)."""
    if not (args.preset and args.data == "OptimalScale/ClimbMix"):
        return args.data
    source = os.path.join(args.out_dir, "tiny_corpus")
    if master and not os.path.exists(source):
        make_tiny_corpus(source, n_docs=400, seed=0)
    return source


def make_dataset(args, source, student_tok, teacher_toks, start=None, rank=0, world_size=1):
    """Windows of --seq-len student tokens aligned with every teacher (data.py): this rank's
    share, from the resume state `start`."""
    return AlignedWindows(
        source,
        student_tok,
        teacher_toks,
        args.seq_len,
        text_field=args.text_field,
        rank=rank,
        world_size=world_size,
        start=start,
        teacher_cap=args.teacher_cap,
        repeat=True,
        data_config=args.data_config,
        split=args.split,
        pack=args.pack,
        shuffle=args.shuffle,
        shuffle_buffer=args.shuffle_buffer,
        seed=args.seed,
    )


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


# ----------------------------------------------------------------------------- optimizer


def make_optimizer(args, student, learned: list, resume: dict, fused: bool):
    """AdamW: weight decay on matrices only; a learned W has its own group (lr --projection-lr,
    no weight decay; it is not clipped either: METHOD.md 5.2). Each group's base_lr is scaled by
    lr_scale every step."""
    params = [p for p in student.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    for group in groups:
        group["base_lr"] = args.lr
    w_params = [p for proj in learned for p in proj.parameters()]
    if w_params:
        groups.append({"params": w_params, "weight_decay": 0.0, "base_lr": args.projection_lr})
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=tuple(args.betas), fused=fused)
    if "optimizer" in resume:
        optimizer.load_state_dict(resume["optimizer"])
    return optimizer


def lr_scale(step: int, args) -> float:
    """Linear warm-up to 1, then cosine down to min_lr/lr at max_steps."""
    if step < args.warmup_steps:
        return (step + 1) / args.warmup_steps
    progress = min(1.0, (step - args.warmup_steps) / max(1, args.max_steps - args.warmup_steps))
    floor = args.min_lr / args.lr
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------- the loop

N_STEP_SUMS = 4  # loss, ce, kd, kd_scale; then per teacher its KD term, valid and union chunks


class StepResult(NamedTuple):
    sums: torch.Tensor  # on the device: N_STEP_SUMS, per teacher its KD and chunk counts, stop flag
    counts: torch.Tensor  # the step's targets (student tokens, labelled tokens, per teacher)
    data_state: dict  # where the data continues after this step
    bad: bool  # skipped: a non-finite loss or gradient on some rank
    stop_asked: bool  # some rank got SIGTERM or SIGINT


class Trainer:
    """The loop's state: the models, the optimizer, and the counters a checkpoint keeps."""

    def __init__(self, args, job, model, student, student_tok, teachers, learned, optimizer):
        self.args, self.job, self.model, self.student = args, job, model, student
        self.student_tok, self.teachers, self.learned = student_tok, teachers, learned
        self.optimizer = optimizer
        self.w_params = [p for proj in learned for p in proj.parameters()]
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if job.cuda else nullcontext()
        self.signalled: list[int] = []  # SIGTERM / SIGINT: finish the step, save, stop
        self.static_kd_weight = torch.tensor(args.kd_weight, device=job.device)
        # --fused-head: the student's forward stops before its output layer (the logits of one
        # position, checked once against h W^T, then of none); a hook keeps the layer's input,
        # the last hidden states, and the losses compute the logits h W^T block by block
        self.fused, self.hidden, self.head_checked = False, None, False
        if args.fused_head:
            problem = fused_head_problem(student)
            if problem:
                self.warn(f"--fused-head: {problem}; its logits are built whole instead")
            else:
                self.fused = True
                student.get_decoder().register_forward_hook(self.keep_hidden)
        self.lr, self.grad_norm = args.lr, float("nan")  # of the last step
        self.progress, self.logger = None, None  # while the loop runs

    def loop(self, batches, resume: dict) -> None:
        args, job = self.args, self.job
        step, data_state = resume.get("step", 0), resume.get("data_state")
        skipped, bad_in_a_row = resume.get("skipped", 0), 0
        streak_start = None  # the first skipped step of the current run of skipped steps
        last_step = min(args.max_steps, args.stop_step or args.max_steps)
        logger = self.logger = Logger(args, job.master, step)
        progress = self.progress = None
        if job.master:
            progress = self.progress = tqdm(
                total=args.max_steps, initial=step, desc="train", dynamic_ncols=True
            )
        self.catch_stop_signals()
        while step < last_step:
            started = time.perf_counter()
            done = self.step(step, batches, data_state)
            sums, counts, data_state, bad, stop_asked = done
            if bad:
                skipped, bad_in_a_row = skipped + 1, bad_in_a_row + 1
                streak_start = streak_start or step + 1
            else:
                bad_in_a_row, streak_start = 0, None
            step += 1
            if step == resume.get("step", 0) + 1:  # AdamW's state exists from here on
                self.report_state_bytes()
            if bad:
                self.warn(f"non-finite loss or gradient at step {step}, update skipped")
            record = self.record(step, sums, counts, skipped, started)
            stopping = bad_in_a_row > args.max_bad_steps
            logged = step % args.log_every == 0 or step == last_step or stopping
            if logged:
                record["data_issues"] = self.data_issues(data_state)
                logger.log(record)
            if stopping:
                self.stop(
                    f"{bad_in_a_row} non-finite steps in a row (last at step {step}): lower "
                    "--lr, check the data, or resume from an earlier checkpoint"
                )
            if progress:
                progress.update(1)
                progress.set_postfix(self.postfix(record))
            due = args.save_every and (step % args.save_every == 0 or step == last_step)
            if due or stop_asked:
                self.save(step, data_state, skipped, streak_start)
            if stop_asked:
                if not logged:
                    logger.log(record)
                self.finish(progress, logger)
                if job.master:
                    print(
                        f"stopped by a signal after step {step}: checkpoint step_{step} "
                        "written; run again with --resume to continue",
                        file=sys.stderr,
                    )
                job.end(128 + (self.signalled[0] if self.signalled else signal.SIGTERM))
        self.finish(progress, logger)
        if job.master:
            draw_curves(args.out_dir)

    def postfix(self, record: dict) -> dict[str, str]:
        """The progress bar's figures: the loss, CE, each teacher's KD, the applied KD/CE scale."""
        shown = {"loss": record["loss"], "ce": record["ce"]}
        for t in self.teachers:
            shown[f"kd:{short_name(t.name)}"] = record[f"kd/{t.name}"]
        if self.teachers:
            shown["scale"] = record["kd_scale"]
        return {k: f"{v:.3g}" if abs(v) >= 1000 else f"{v:.3f}" for k, v in shown.items()}

    def finish(self, progress, logger: Logger | None) -> None:
        if progress:
            progress.close()
        if logger:
            logger.close()

    def stop(self, message: str) -> NoReturn:
        """The error path (Job.stop), once the progress bar and the trackers are closed: the
        message starts its own line."""
        self.finish(self.progress, self.logger)
        self.job.stop(message)

    def report_state_bytes(self) -> None:
        """Once: how much of the student's weights and optimizer state the fullest rank holds
        (all of it under DDP, about 1/world_size under --fsdp)."""
        mine, whole = sharding.state_bytes(self.student, self.optimizer)
        most = torch.tensor(float(mine), device=self.job.device)
        if self.job.ddp:
            dist.all_reduce(most, op=dist.ReduceOp.MAX)
        if self.job.master:
            mb = float(most) / 2**20
            tqdm.write(
                f"memory: the student's weights and optimizer state: {mb:.2f} MB on the "
                f"fullest rank, {float(most) / whole:.3f} of the whole {whole / 2**20:.2f} MB"
            )

    def keep_hidden(self, module, inputs, out) -> None:
        self.hidden = out[0]

    def fused_logits(self, logits: torch.Tensor) -> blocked.Head:
        """The student's logits as h W^T (--fused-head), from the hidden states the hook kept;
        the first time, h W^T at the first position is checked against the model's own logits
        there (a model that scales or caps its logits would train on wrong ones)."""
        hidden, self.hidden = self.hidden, None
        weight = self.student.get_output_embeddings().weight
        head = blocked.Head(hidden, weight, torch.bfloat16 if self.job.cuda else None)
        if not self.head_checked:
            first = torch.arange(len(hidden), device=hidden.device) * hidden.shape[1]
            mine = head.logits(first).float()
            close = torch.allclose(mine, logits[:, 0].float(), rtol=2e-2, atol=2e-2 * 8)
            if self.job.agree(None if close else "mismatch"):
                self.stop(
                    "--fused-head: the student's logits are not h W^T of its last hidden states "
                    "(its output layer transforms them): run with --no-fused-head"
                )
            self.head_checked = True
        return head

    def warn(self, message: str) -> None:
        """A warning on rank 0, above the progress bar."""
        if self.job.master:
            tqdm.write(f"warning: {message}", file=sys.stderr)

    def catch_stop_signals(self) -> None:
        """SIGTERM (what a scheduler sends before it kills a job) or SIGINT: finish the step,
        write a checkpoint, stop; a second signal stops at once. main() puts the old handlers
        back."""

        def on_signal(signum, frame) -> None:
            self.signalled.append(signum)
            for sig in STOP_SIGNALS:
                signal.signal(sig, signal.SIG_DFL)

        for sig in STOP_SIGNALS:
            signal.signal(sig, on_signal)

    def step(self, step: int, batches, data_state) -> StepResult:
        """One optimizer step over --grad-accum micro-batches on every rank (the record's learning
        rate and gradient norm are kept in self.lr and self.grad_norm)."""
        args, job, teachers = self.args, self.job, self.teachers
        scale = lr_scale(step, args)
        self.lr = args.lr * scale
        for group in self.optimizer.param_groups:
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
        counts = self.step_counts(micro_batches)
        sums = torch.zeros(N_STEP_SUMS + 3 * len(teachers) + 1, device=job.device)
        for micro, batch in enumerate(micro_batches):
            last = micro == len(micro_batches) - 1  # gradients are reduced once, after it
            if args.fsdp:
                sharding.set_gradient_sync(self.student, last)
            with nullcontext() if last or not job.ddp or args.fsdp else self.model.no_sync():
                sums[:-1] += self.micro_step(batch, counts)
        for p in self.w_params:  # W's weights live outside DDP: their gradients are averaged here
            if p.grad is None:  # no valid chunk on this rank in this step
                p.grad = torch.zeros_like(p)
            if job.ddp:
                dist.all_reduce(p.grad, op=dist.ReduceOp.AVG)
        # the step's sums over all ranks, and whether any rank was asked to stop
        sums[-1] = float(bool(self.signalled))
        if job.ddp:
            dist.all_reduce(sums)
        self.grad_norm = float("nan")
        bad = not bool(torch.isfinite(sums[:N_STEP_SUMS]).all())
        if not bad:  # the norm is over every rank's gradients: so is this decision
            self.grad_norm = sharding.clip_gradients(
                list(self.student.parameters()), args.grad_clip
            )
            bad = not math.isfinite(self.grad_norm) or any(
                not bool(torch.isfinite(p.grad).all()) for p in self.w_params
            )
        if not bad:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(sums, counts, data_state, bad, bool(sums[-1] > 0))

    def step_counts(self, micro_batches: list[dict]) -> torch.Tensor:
        """[student tokens, labelled tokens, then per teacher the targets its KD term averages]
        over the whole step: all micro-batches, all ranks (read from the host batches)."""
        n = 2 + len(self.teachers)
        counts = torch.zeros(n + 1, dtype=torch.float64)
        counts[-1] = len(micro_batches) < self.args.grad_accum  # a rank whose data ran out
        counts[:-1] = sum((b["counts"] for b in micro_batches), counts[:-1])
        counts = counts.to(self.job.device)
        if self.job.ddp:
            dist.all_reduce(counts)
        ran_out = int(counts[-1])
        if ran_out:
            self.stop(
                f"{ran_out} rank(s) got no documents: the data has fewer documents than ranks x "
                f"DataLoader workers ({self.job.world_size} x {max(self.args.num_workers, 1)}): "
                "lower --num-workers, use fewer ranks, or add documents"
            )
        return counts[:-1]

    def micro_step(self, batch: dict, counts: torch.Tensor) -> torch.Tensor:
        """Forward, losses and backward of one micro-batch; its share of the step's sums."""
        args, job = self.args, self.job
        batch = {k: v.to(job.device, non_blocking=True) for k, v in batch.items()}
        # use_cache=False: a KV cache would only be built (a host-device sync per layer) and
        # dropped
        keep = {}
        if self.fused:  # the logits of the first position while unchecked, then of none
            positions = int(not self.head_checked)
            keep["logits_to_keep"] = torch.zeros(positions, dtype=torch.long, device=job.device)
        with self.autocast:
            s_logits = self.model(
                input_ids=batch["student_ids"],
                attention_mask=batch["student_mask"],
                use_cache=False,
                **keep,
            ).logits
        if self.fused:  # logits h W^T, block by block in the losses (bf16 matmuls on GPU)
            s_logits = self.fused_logits(s_logits)
        # each term: its mean over this micro-batch x (its count here / the step's count)
        ce_mean = losses.ce_loss(s_logits, batch["labels"])
        ce_part = ce_mean * share(batch["counts"][1], counts[1])
        kd_means, kd_parts = [], []
        for i, t in enumerate(self.teachers):
            with torch.no_grad(), self.autocast:
                t_logits = t.model(
                    input_ids=batch[f"teacher_ids_{i}"],
                    attention_mask=batch[f"teacher_mask_{i}"],
                    use_cache=False,
                ).logits
            try:
                kd_mean = kd_loss(t, s_logits, t_logits, batch, i, args)
            except ValueError as e:
                if str(e) != losses.NON_FINITE:
                    raise SystemExit(f"error: teacher {t.name}: {e}") from None
                # skipped on every rank; backward still runs, as DDP needs
                kd_mean = blocked.zero(s_logits).float() * float("nan")
            kd_means.append(kd_mean)
            kd_parts.append(kd_mean * share(batch["counts"][2 + i], counts[2 + i]))
        weights = [t.weight for t in self.teachers]
        kd_mean = sum((w * k for w, k in zip(weights, kd_means)), ce_mean.new_zeros(()))
        if args.kd_scaling == "dynamic":  # loss = sg(CE / KD) * KD + CE, CE and KD of this
            # micro-batch on this rank: the scale needs no second pass and no communication
            kd_scale = torch.where(
                kd_mean.detach() > 0, ce_mean.detach() / kd_mean.detach(), torch.ones_like(kd_mean)
            )
            ce_scale = 1.0
        else:
            kd_scale, ce_scale = self.static_kd_weight, args.ce_weight
        loss = losses.combine(
            ce_part, kd_parts, weights, dynamic=False, kd_weight=kd_scale, ce_weight=ce_scale
        )
        (loss * job.world_size).backward()  # DDP averages gradients over ranks; we want the sum
        kd_part = sum((w * k for w, k in zip(weights, kd_parts)), ce_part.new_zeros(()))
        n = args.grad_accum * job.world_size
        scale_share = kd_scale / n if self.teachers else kd_scale * 0
        parts = [loss, ce_part, kd_part, scale_share.float(), *kd_parts]
        return torch.stack([*(p.detach() for p in parts), *batch["valid_union"]]).float()

    def record(self, step: int, sums, counts, skipped: int, started: float) -> dict:
        """The step's metrics.jsonl record, from one read of the device."""
        values = torch.cat([sums.double(), counts]).tolist()  # the one read
        n, tokens = len(self.teachers), values[-len(counts)]
        record = {
            "step": step,
            "lr": self.lr,
            "loss": values[0],
            "ce": values[1],
            "kd": values[2],
            "kd_scale": values[3],
            "grad_norm": self.grad_norm,
            "tokens": int(tokens),
            "skipped": skipped,
            "tokens_per_s": tokens / (time.perf_counter() - started),
        }
        valid_union = values[N_STEP_SUMS + n : N_STEP_SUMS + 3 * n]
        record["valid_chunks"] = sum(valid_union[0::2]) / max(sum(valid_union[1::2]), 1)
        if self.job.cuda:
            record["peak_mem_gb"] = torch.cuda.max_memory_allocated(self.job.device) / 2**30
        for t, value in zip(self.teachers, values[N_STEP_SUMS : N_STEP_SUMS + n]):
            record[f"kd/{t.name}"] = value
        return record

    def data_issues(self, data_state) -> dict:
        """Skipped/split documents by reason, over all ranks (every rank logs this step)."""
        issues = torch.tensor(
            [issue_counts(data_state)[r] for r in REASONS], device=self.job.device
        )
        if self.job.ddp:
            dist.all_reduce(issues)
        return {r: n for r, n in zip(REASONS, issues.tolist()) if n}

    def save(self, step: int, data_state, skipped: int, streak_start: int | None) -> None:
        """A checkpoint, never from non-finite weights; rotation keeps the newest checkpoint from
        before the current run of skipped steps. A failed write stops the run in one line."""
        job, out_dir = self.job, self.args.out_dir
        params = self.student.parameters()
        finite = all(bool(torch.isfinite(sharding.local(p)).all()) for p in params)
        if job.agree(None if finite else "non-finite") is not None:  # FSDP: any rank's shard
            self.warn(f"non-finite weights at step {step}: no checkpoint written")
            return
        before = [s for s, _ in run_dir.checkpoints(out_dir) if s < (streak_start or 0)]
        state = {
            "step": step,
            "skipped": skipped,
            "world_size": job.world_size,
            "projections": [p.state_dict() for p in self.learned],
            "args": json.dumps(vars(self.args), default=str),
        }
        if not self.args.fsdp:  # --fsdp: each rank writes its shard of it (save_checkpoint)
            state["optimizer"] = self.optimizer.state_dict()
        error = save_checkpoint(
            out_dir,
            step,
            self,
            state,
            data_state,
            protect=max(before, default=None),
        )
        if error:
            latest = run_dir.checkpoints(out_dir)
            latest = f"step_{latest[-1][0]}" if latest else "none"
            self.stop(
                f"checkpoint step_{step} could not be written ({error}); the latest "
                f"complete checkpoint is {latest}: fix that, then --resume"
            )


# Config fields by which a transformers model changes h W^T into its logits (Gemma 2/3's soft
# cap, Cohere's and Granite's scale): the fused head computes h W^T alone
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def fused_head_problem(student) -> str | None:
    """Why the student's logits cannot be computed as h W^T from its decoder's output, or None."""
    if "logits_to_keep" not in inspect.signature(student.forward).parameters:
        return "its forward takes no logits_to_keep"
    decoder = getattr(student, "get_decoder", lambda: None)()
    if decoder is None or decoder is student:
        return "it has no separate decoder (get_decoder) to take the hidden states from"
    head = student.get_output_embeddings()
    if type(head) is not torch.nn.Linear or head.bias is not None:
        return "its output layer is not a linear map without bias"
    for name in LOGIT_TRANSFORMS:
        if getattr(student.config, name, None) not in (None, 1, 1.0):
            return f"its config sets {name}"
    return None


def short_name(name: str) -> str:
    """A model's name without its organisation or package prefix: Qwen/Qwen3-4B -> Qwen3-4B."""
    return name.rstrip("/").rsplit("/", 1)[-1].removeprefix("pkg:")


def draw_curves(out_dir: str) -> None:
    """out_dir/curves.png from metrics.jsonl (curves.py), when matplotlib is installed."""
    try:
        print(f"training curves: {curves.plot_curves(out_dir)}")
    except ImportError:
        print("no curves.png: pip install matplotlib (then python curves.py OUT_DIR)")


def share(count: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """count / total (0 when total is 0): a micro-batch's weight in the step's mean."""
    return (count / total.clamp_min(1)).float()


# ----------------------------------------------------------------------------- checkpoints


def save_checkpoint(
    out_dir, step, trainer: Trainer, state: dict, data_state, protect=None
) -> str | None:
    """out_dir/step_N/: save_pretrained weights in --save-dtype (bf16: config.json says so) +
    tokenizer, which lm-eval and vLLM load as they are; the fp32 master weights beside them
    (master_weights.pt, for an exact resume) unless they are the model weights; under --fsdp
    instead each rank's shard of the fp32 weights and optimizer state (sharded/); the trainer
    state; each rank's RNG and data position. Written into a temp directory that is
    renamed when complete, so a kill mid-write leaves the previous checkpoint intact; a failed
    write (a full disk) removes the temp directory and returns its reason, on every rank. Then
    the oldest checkpoints beyond --keep-last go (never step `protect`), and so does a run that
    --overwrite moved aside."""
    tmp = os.path.join(out_dir, f".tmp_step_{step}")
    args, job, student = trainer.args, trainer.job, trainer.student
    # --fsdp: the whole weights, gathered to rank 0 for save_pretrained (every rank takes part)
    weights = sharding.full_weights(student) if args.fsdp else untied(student.state_dict())

    def shared() -> None:
        if job.master:
            shutil.rmtree(tmp, ignore_errors=True)
            save_weights(student, weights, tmp, getattr(torch, args.save_dtype), not args.fsdp)
            trainer.student_tok.save_pretrained(tmp)
            torch.save(state, os.path.join(tmp, "trainer_state.pt"))

    def mine() -> None:
        if args.fsdp:
            sharding.save_sharded(
                os.path.join(tmp, sharding.SHARDED), student, trainer.learned, trainer.optimizer
            )
        python_rng = random.getstate()
        rank_state = {
            "torch_rng": torch.get_rng_state(),
            "data_state": data_state,
            "python_rng": [python_rng[0], list(python_rng[1])],
        }
        torch.save(rank_state, os.path.join(tmp, f"rank_{job.rank}.pt"))

    def publish() -> None:
        if job.master:
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
        except CheckpointException as e:  # DCP's save: every rank learns each rank's failure
            error = sharding.failure_line(e)
        error = job.agree(error)
        if error:
            if job.master:
                shutil.rmtree(tmp, ignore_errors=True)
            return error
    return None


def save_weights(student, weights: dict, directory: str, dtype: torch.dtype, master: bool) -> None:
    """The student's fp32 `weights` in save_pretrained format, in `dtype` (config.json says it, so
    `dtype="auto"` loads them as they are), and with `master` the fp32 weights beside them if
    those differ (master_weights.pt, which neither transformers nor vLLM reads)."""
    student.save_pretrained(directory, state_dict={k: v.to(dtype) for k, v in weights.items()})
    config = copy.deepcopy(student.config)  # save_pretrained wrote the fp32 model's dtype
    config.dtype = str(dtype).removeprefix("torch.")
    config.save_pretrained(directory)
    if master and dtype != torch.float32:
        torch.save(weights, os.path.join(directory, run_dir.MASTER_WEIGHTS))


def untied(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict less the tensors that share storage with an earlier one: a tied output
    layer is its embedding (save_pretrained leaves it out too; loading ties it again)."""
    seen, out = set(), {}
    for name, tensor in state.items():
        if tensor.untyped_storage().data_ptr() not in seen:
            seen.add(tensor.untyped_storage().data_ptr())
            out[name] = tensor
    return out


def load_resume(decision: dict, student, learned: list, job: Job, fsdp: bool) -> dict:
    """Weights, W's weights, this rank's RNG and data position from a verified checkpoint; the
    optimizer state and counters are returned for the optimizer built later (--fsdp: the path of
    the shards of both, read once the optimizer exists)."""
    path = decision["resume"][1]
    sharded = os.path.join(path, sharding.SHARDED)
    if fsdp != os.path.isdir(sharded):
        written, needs = ("with", "add") if os.path.isdir(sharded) else ("without", "drop")
        raise ValueError(
            f"{path} was written {written} --fsdp: {needs} --fsdp to resume it (its weights "
            "and optimizer state are stored for that mode)"
        )
    master = os.path.join(path, run_dir.MASTER_WEIGHTS)
    if fsdp:
        weights = None  # in the shards
    elif os.path.exists(master):
        weights = torch.load(master, weights_only=True, mmap=True)
    else:  # the model weights are the fp32 ones (--save-dtype float32, or an older checkpoint)
        weights = load_file(os.path.join(path, "model.safetensors"))
    if weights is not None:
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
    if state["world_size"] != job.world_size:
        raise ValueError(
            f"{path} was written by {state['world_size']} ranks, this run has "
            f"{job.world_size}: resume with the same number of processes"
        )
    for proj, proj_state in zip(learned, state["projections"]):
        proj.load_state_dict(proj_state)
    mine = torch.load(os.path.join(path, f"rank_{job.rank}.pt"), weights_only=True)
    torch.set_rng_state(mine["torch_rng"])
    random.setstate((mine["python_rng"][0], tuple(mine["python_rng"][1]), None))
    return {
        **({"sharded": sharded} if fsdp else {"optimizer": state["optimizer"]}),
        "skipped": state["skipped"],
        "data_state": mine["data_state"],
        "step": state["step"],
    }


# ----------------------------------------------------------------------------- logs


def _logged_step(line: str) -> float:
    """A metrics.jsonl line's step; inf for a line that is not a record (half-written by a
    killed run: dropped on resume)."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


class Logger:
    """metrics.jsonl (one JSON line per logged step) and the trackers of --report-to: Weights &
    Biases (a --resume continues the same wandb run) and TensorBoard. Trackers get scalars only
    (nested values flattened: data_issues/split_document). On resume, lines past the resumed step
    are dropped."""

    def __init__(self, args, master: bool, start_step: int):
        self.master, self.path = master, os.path.join(args.out_dir, "metrics.jsonl")
        self.trackers: list = []
        if not master:
            return
        if os.path.exists(self.path):
            kept = [line for line in open(self.path) if _logged_step(line) <= start_step]
            atomic_write(self.path, lambda f: f.write("".join(kept).encode()))
        for name in args.report_to:
            tracker = {"wandb": WandbTracker, "tensorboard": TensorBoardTracker}[name]
            try:
                self.trackers.append(tracker(args, start_step))
            except ImportError:
                print(
                    f"warning: --report-to {name} needs `pip install {name}`; "
                    "logging to metrics.jsonl only",
                    file=sys.stderr,
                )

    def log(self, record: dict) -> None:
        if not self.master:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        values = scalars({k: v for k, v in record.items() if k != "step"})
        for tracker in self.trackers:
            tracker.log(values, record["step"])

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()


def scalars(record: dict, prefix: str = "") -> dict[str, float]:
    """A record's numbers, nested dicts flattened to "outer/inner"; anything else left out."""
    out = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out.update(scalars(value, f"{prefix}{key}/"))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out[f"{prefix}{key}"] = value
    return out


class WandbTracker:
    """One Weights & Biases run per run directory: its id is kept in out_dir/wandb_run_id, so a
    --resume logs into the same run (from the resumed step on)."""

    def __init__(self, args, start_step: int):
        import wandb  # optional: only --report-to wandb needs it

        id_file = os.path.join(args.out_dir, "wandb_run_id")
        run_id = None
        if start_step and os.path.exists(id_file):
            with open(id_file) as f:
                run_id = f.read().strip()
        if not run_id:  # a new run (an --overwrite's too) gets a new id
            run_id = uuid.uuid4().hex[:8]  # a wandb run id: 8 lowercase letters and digits
            atomic_write(id_file, lambda f: f.write(run_id.encode()))
        self.run = wandb.init(
            project=args.wandb_project,
            name=args.run_name,
            id=run_id,
            resume="allow",
            dir=args.out_dir,
            config=vars(args),
        )

    def log(self, values: dict, step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class TensorBoardTracker:
    """out_dir/tensorboard; a --resume purges the events past the resumed step first."""

    def __init__(self, args, start_step: int):
        from torch.utils.tensorboard import SummaryWriter  # optional: needs tensorboard

        log_dir = os.path.join(args.out_dir, "tensorboard")
        self.writer = SummaryWriter(log_dir, purge_step=start_step + 1 if start_step else None)

    def log(self, values: dict, step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


if __name__ == "__main__":
    main()
