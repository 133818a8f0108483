"""Cross-tokenizer knowledge distillation: one student, one or more teachers, one training loop.

    torchrun --nproc_per_node=8 train.py --teacher Qwen/Qwen3-4B --loss pkl
    torchrun --nproc_per_node=8 train.py --teacher microsoft/Phi-4-mini-instruct --loss hkl \\
        --teacher meta-llama/Llama-3.2-3B --loss kl --teacher-weight 0.8 --teacher-weight 0.2
    python train.py --loss ce                                      # continued pre-training baseline
    torchrun --nproc_per_node=2 train.py --preset tiny --max-steps 20   # CPU, gloo, no downloads

Read it top to bottom: main() is the recipe (settings, DDP, the run directory, the student, the
teachers with their losses and W, data, optimizer), train() the loop, and train_step() one
optimizer step as METHOD.md 5.5 writes it: student forward, teacher forwards, each teacher's KD
term (kd_term, losses.py), the objective (losses.objective), backward. Each teacher sees the same
text as the student, tokenized its own way; data.py aligns the two token streams into chunks that
the losses compare. What is not the method lives beside it: flags.py (settings, presets,
--config), run_dir.py (the process group, run directory, checkpoints, logs), sharding.py (FSDP2),
fused_head.py and blocked.py (the losses in bounded memory). Validate, then act: every flag, the
run directory, the models, W and the data are checked on every rank before anything is written.
"""

from __future__ import annotations

import functools
import math
import os
import random
import signal
import sys
import time
import zlib
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM
from transformers.utils import logging as hf_logging

import blocked
import cache_teacher
import chat
import losses
import run_dir
import sharding
from audit import audit
from build_projection import cached_projection, hkl_pairs, load_projection
from data import REASONS, AlignedWindows, advance_state, collate, issue_counts
from flags import PRESET_SHAPES, Settings, check_settings, make_tiny_corpus, parse_args, tiny_model
from fused_head import FusedHead
from run_dir import STOP_SIGNALS, Job, RunError
from tokens import load_tokenizer, tokenizer_hash

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
        inspect = lambda: job.master and run_dir.inspect_run_dir(args, job)  # noqa: E731
        decision = job.broadcast(job.together(inspect))
        # ---- the student: fp32 weights (bf16 autocast on GPU), the same seed on every rank;
        # under --fsdp the models load on the CPU and only each rank's shard goes to the GPU
        device = sharding.load_device(args.fsdp, job.device)
        student_tok, student = job.together(load_student, args, device)
        # ---- the teachers, each with its loss and, across tokenizers, its W
        teachers = job.together(load_teachers, args, settings, student_tok, student, job)
        job.together(attach_projections, teachers, args, student_tok, student, job.device)
        learned = [t.W for t in teachers if isinstance(t.W, losses.LearnableProjection)]
        if args.fsdp:  # each rank keeps its shard of every model (sharding.py)
            for model in [student, *(t.model for t in teachers if t.model is not None)]:
                job.together(sharding.shard_model, model, job.cuda, model is student)
        source = job.together(data_source, args, job.master)
        # ---- what a --resume must match: the flags, each W (its content), the data's files
        fingerprint = job.together(run_dir.check_fingerprint, args, job, decision, teachers, source)
        resume = {}
        if decision["resume"]:
            resume = job.together(run_dir.load_resume, decision, student, learned, job, args.fsdp)
            if job.master:  # once every rank has loaded it
                for warning in decision["warnings"]:
                    print(f"warning: {warning}", file=sys.stderr)
                print(f"resuming from {decision['resume'][1]}")
        # ---- data: tokenization and alignment run in DataLoader workers
        toks, start = [t.tok for t in teachers], resume.get("data_state")
        dataset = job.together(
            make_dataset, args, source, student_tok, toks, start, job.rank, job.world_size
        )
        job.together(attach_caches, dataset, teachers, source)  # --teacher-cache
        chat.prepare_run(teachers, dataset.chat)  # chat data: W pairs the ends of turn
        job.together(lambda: job.master and run_dir.start_run(args, fingerprint))  # checks passed
        if job.master:
            describe(args, student, teachers, job.world_size)
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            collate_fn=functools.partial(collate, pad_ids=dataset.pad_ids),
            worker_init_fn=run_dir.ignore_stop_signals,
        )
        # ---- optimizer: AdamW, warm-up then cosine; W's weights get their own group
        optimizer = make_optimizer(args, student, learned, resume, job.cuda)
        if "sharded" in resume:  # --fsdp: each rank reads its shard of weights and optimizer
            job.together(sharding.load_sharded, resume["sharded"], student, learned, optimizer)
        # ---- the forward as it runs: compiled (--compile), DDP-wrapped; the fused head
        running = [t.model for t in teachers if t.model is not None]
        model = sharding.forward_model(student, running, job, args)
        head = None  # --fused-head: for a plain output layer, and the blocked losses only
        if args.fused_head and args.loss_impl == "blocked":
            head = FusedHead(student, job.cuda)
            if head.problem and job.master:
                print(f"warning: --fused-head: {head.problem}; its logits are built whole instead")
            head = None if head.problem else head
        m = Models(model, student, student_tok, teachers, learned, optimizer, head)
        # ---- the loop; checkpoints as it goes
        train(args, job, m, iter(loader), resume, fingerprint)
    finally:  # whatever ends the run in this process; a killed process leaves a stale lock
        job.lock.release()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    job.end()


# ----------------------------------------------------------------------------- the loop


@dataclass
class Models:
    """What a step trains and with what."""

    model: torch.nn.Module  # the student as its forward runs (compiled, DDP-wrapped or itself)
    student: torch.nn.Module  # its weights (what the optimizer and checkpoints hold)
    student_tok: object
    teachers: list[Teacher]
    learned: list[losses.LearnableProjection]  # the W that --learn-projection trains
    optimizer: torch.optim.Optimizer
    head: FusedHead | None  # --fused-head: the losses compute the logits h W^T block by block


def train(args, job: Job, m: Models, batches, resume: dict, fingerprint: dict) -> None:
    """Steps until --max-steps (or --stop-step), each logged, checkpoints (with the run's
    fingerprint) every --save-every. A signal (SIGTERM, SIGINT) finishes the step, saves and
    stops; so many non-finite steps in a row stop the run."""
    step, data_state = resume.get("step", 0), resume.get("data_state")
    skipped, bad_in_a_row, streak_start = resume.get("skipped", 0), 0, None
    last_step = min(args.max_steps, args.stop_step or args.max_steps)
    log = job.together(run_dir.Logger, args, job.master, step, [t.name for t in m.teachers])
    signalled = run_dir.catch_stop_signals()
    try:
        while step < last_step:
            started = time.perf_counter()
            scale = lr_scale(step, args)  # warm-up, then cosine
            for group in m.optimizer.param_groups:
                group["lr"] = group["base_lr"] * scale
            micro_batches, data_state, problem = step_batches(batches, data_state, m.teachers, args)
            sums, counts, grad_norm, bad = train_step(
                args, job, m, micro_batches, signalled, problem
            )
            step += 1
            if step == resume.get("step", 0) + 1:  # AdamW's state exists from here on
                sharding.report_state_bytes(m.student, m.optimizer, job, log.note)
            skipped, bad_in_a_row = skipped + bad, bad_in_a_row + 1 if bad else 0
            streak_start = (streak_start or step) if bad else None
            if bad:
                log.warn(f"non-finite loss or gradient at step {step}, update skipped")
            record = step_record(args, job, m, step, sums, counts, grad_norm, skipped, started)
            stop_asked, stopping = bool(sums[-1] > 0), bad_in_a_row > args.max_bad_steps
            if step % args.log_every == 0 or step == last_step or stopping or stop_asked:
                record["data_issues"] = data_issues(job, data_state)
                log.log(record)
            if stopping:
                raise RunError(
                    f"{bad_in_a_row} non-finite steps in a row (last at step {step}): lower "
                    "--lr, check the data, or resume from an earlier checkpoint"
                )
            log.show(record)
            if args.save_every and (step % args.save_every == 0 or step == last_step) or stop_asked:
                state = (data_state, skipped, streak_start, fingerprint)
                warning = run_dir.save(args, job, m, step, *state)
                if warning:
                    log.warn(warning)
            if stop_asked:
                log.close()
                if job.master:
                    print(
                        f"stopped by a signal after step {step}: checkpoint step_{step} "
                        "written; run again with --resume to continue",
                        file=sys.stderr,
                    )
                job.end(128 + (signalled[0] if signalled else signal.SIGTERM))
    except RunError as e:  # every rank met it together: one line, exit 2
        log.close()
        job.stop(str(e))
    log.close()
    if job.master:
        run_dir.draw_curves(args.out_dir)


N_STEP_SUMS = 4  # loss, ce, kd, kd_scale; then per teacher its KD term, valid and union chunks


def train_step(args, job: Job, m: Models, micro_batches: list[dict], signalled: list, problem=None):
    """One optimizer step over the step's micro-batches on every rank (METHOD.md 5.5). Returns the
    step's sums over all ranks (on the device: loss, CE, KD, the applied scale, each teacher's KD,
    its valid and union chunks, whether a rank was asked to stop), its counts, the gradient norm,
    and whether the update was skipped (a non-finite loss or gradient on some rank)."""
    # The objective is a mean over the whole step (every micro-batch, every rank): each micro-
    # batch's terms enter times their share of the step's targets, counted from the batches alone.
    counts = step_counts(micro_batches, len(m.teachers), job, args, problem)
    weights = [t.weight for t in m.teachers]
    sums = torch.zeros(N_STEP_SUMS + 3 * len(m.teachers) + 1, device=job.device)
    for micro, batch in enumerate(micro_batches):
        last = micro == len(micro_batches) - 1  # gradients are reduced once, after it
        batch = {k: v.to(job.device, non_blocking=True) for k, v in batch.items()}
        with sharding.gradient_sync(m.model, m.student, last, job.ddp, args.fsdp):
            s_logits = student_logits(m, batch, job)
            ce = ce_term(s_logits, batch["labels"], args)  # next-token CE (METHOD.md 5.5)
            kd_terms = []
            for i, t in enumerate(m.teachers):
                t_logits = teacher_logits(t, batch, i, job)  # its forward, or its cache
                kd_terms.append(kd_term(t, s_logits, t_logits, batch, i, args))
            # loss = sg(CE / KD) KD + CE (or static weights), each term times its share
            shares = [share(batch["counts"][1 + j], counts[1 + j]) for j in range(len(weights) + 1)]
            loss, kd_scale = losses.objective(
                ce,
                kd_terms,
                weights,
                shares=shares,
                dynamic=args.kd_scaling == "dynamic",
                kd_weight=args.kd_weight,
                max_scale=args.kd_scale_max or math.inf,
                ce_weight=args.ce_weight,
            )
            (loss * job.world_size).backward()  # DDP averages gradients over ranks; we want the sum
        # the figures logged: each term's part of the step's mean, the scale's mean over micro-steps
        kd_parts = [k * s for k, s in zip(kd_terms, shares[1:])]
        kd_part = sum((w * k for w, k in zip(weights, kd_parts)), ce.new_zeros(()))
        scale_share = kd_scale / (args.grad_accum * job.world_size) * bool(m.teachers)
        parts = [loss, ce * shares[0], kd_part, scale_share.float(), *kd_parts]
        sums[:-1] += torch.stack([*(p.detach() for p in parts), *batch["valid_union"]]).float()
    for p in (p for proj in m.learned for p in proj.parameters()):  # W's weights live outside
        if p.grad is None:  # DDP: their gradients are averaged here (none: no valid chunk here)
            p.grad = torch.zeros_like(p)
        if job.ddp:
            dist.all_reduce(p.grad, op=dist.ReduceOp.AVG)
    sums[-1] = float(bool(signalled))  # the step's sums over all ranks; did any rank get a signal
    if job.ddp:
        dist.all_reduce(sums)
    grad_norm, bad = float("nan"), not bool(torch.isfinite(sums[:N_STEP_SUMS]).all())
    if not bad:  # the norm is over every rank's gradients: so is this decision
        grad_norm = sharding.clip_gradients(list(m.student.parameters()), args.grad_clip)
        bad = not math.isfinite(grad_norm) or any(
            not bool(torch.isfinite(p.grad).all()) for proj in m.learned for p in proj.parameters()
        )
    if not bad:
        m.optimizer.step()
    m.optimizer.zero_grad(set_to_none=True)
    return sums, counts, grad_norm, bad


def student_logits(m: Models, batch: dict, job: Job):
    """The student's logits of a micro-batch [B, T, VS]; with the fused head a blocked.Head, the
    last hidden states and the output layer, whose logits h W^T the losses compute block by block
    (no [B, T, VS] tensor at once)."""
    keep = m.head.forward_args(job.device) if m.head else {}
    with autocast(job):  # use_cache=False: a KV cache would only be built and dropped
        logits = m.model(
            input_ids=batch["student_ids"],
            attention_mask=batch["student_mask"],
            use_cache=False,
            **keep,
        ).logits
    return m.head(logits, job.agree) if m.head else logits


def teacher_logits(t: Teacher, batch: dict, i: int, job: Job) -> torch.Tensor:
    """Teacher i's logits of a micro-batch: rebuilt from its cache (cache_teacher.py, METHOD.md
    5.7), or its forward: on rows of its own context (METHOD.md 4.3), packed, the positions
    restarting with each row so that a row attends only to itself; with --teacher-window 0 on
    the student's window."""
    if t.cache is not None:
        return cache_teacher.teacher_logits(batch, i, t.vocab)
    if f"teacher_pos_{i}" in batch:
        inputs = {"position_ids": batch[f"teacher_pos_{i}"]}
    else:
        inputs = {"attention_mask": batch[f"teacher_mask_{i}"]}
    with torch.no_grad(), autocast(job):  # use_cache=False: no KV cache to drop
        return t.model(input_ids=batch[f"teacher_ids_{i}"], use_cache=False, **inputs).logits


def autocast(job: Job):
    """bf16 autocast on GPU (fp32 weights, bf16 matmuls); fp32 on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if job.cuda else nullcontext()


def share(count: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """count / total (0 when total is 0): a micro-batch's weight in the step's mean."""
    return (count / total.clamp_min(1)).float()


# ----------------------------------------------------------------------------- the loss terms


def ce_term(s_logits, labels: torch.Tensor, args) -> torch.Tensor:
    """The student's next-token cross-entropy, a mean over the labelled positions."""
    ce = losses.ce_loss_plain if args.loss_impl == "plain" else losses.ce_loss
    return ce(s_logits, labels)


def kd_term(t: Teacher, s_logits, t_logits, batch: dict, i: int, args) -> torch.Tensor:
    """Teacher i's KD term on this micro-batch (kd_loss); NaN when its logits are not finite (the
    step is then skipped on every rank; backward still runs, as DDP needs)."""
    try:
        return kd_loss(t, s_logits, t_logits, batch, i, args)
    except ValueError as e:
        if str(e) != losses.NON_FINITE:
            raise SystemExit(f"error: teacher {t.name}: {e}") from None
        return blocked.zero(s_logits).float() * float("nan")


def kd_loss(t: Teacher, s_logits, t_logits, batch: dict, i: int, args) -> torch.Tensor:
    """Teacher i's KD term on this micro-batch (METHOD.md 5.2-5.4): a mean over its valid chunks
    (positions for kl). --loss-impl plain computes it with losses.py's *_plain references, blocked
    with the same equations block by block."""
    plain, tau = args.loss_impl == "plain", args.temperature
    if t.loss not in ("pkl", "hkl", "gold", "uld", "kl"):
        raise ValueError(f"unknown loss {t.loss!r}; choose from pkl, hkl, gold, uld, kl")
    if t.loss != "kl" and t_logits.shape[-1] != t.vocab:  # a forward that skips the trimmed layer
        raise ValueError(
            f"its forward gives {t_logits.shape[-1]} logits for {t.vocab} "
            "tokenizer ids: its output layer could not be trimmed"
        )
    if t.loss == "kl":  # the same tokenizer and ids: position p of both predicts one token
        if t.vocab < t_logits.shape[-1]:  # equal padded vocabularies: the padding is no target
            t_logits[..., t.vocab :] = PAD_LOGIT
        elif t_logits.shape[-1] < t.rows:  # a cache holds the tokenizer's ids only
            t_logits = torch.nn.functional.pad(t_logits, (0, t.rows - t.vocab), value=PAD_LOGIT)
        kl = losses.kl_loss_plain if plain else losses.kl_loss
        mask = batch["labels"] != -100
        if f"teacher_at_{i}" in batch:  # its own context: the position that predicts the same token
            at = batch[f"teacher_at_{i}"]
            rows = torch.arange(len(at), device=at.device).unsqueeze(1)
            t_logits, mask = t_logits[rows, at.clamp_min(0)], mask & (at >= 0)
        return kl(s_logits, t_logits, mask, vocab_topk=args.vocab_topk, temperature=tau)
    s_chunk, t_chunk = batch[f"student_chunk_{i}"], batch[f"teacher_chunk_{i}"]
    if t.loss == "pkl":
        pkl = losses.pkl_loss_plain if plain else losses.pkl_loss
        return pkl(
            s_logits,
            t_logits,
            s_chunk,
            t_chunk,
            t.W,
            vocab_topk=args.vocab_topk,
            temperature=tau,
            floor=args.pkl_floor,
        )
    if t.loss == "uld":
        uld = losses.uld_loss_plain if plain else losses.uld_loss
        return uld(s_logits, t_logits, s_chunk, t_chunk, uld_topk=args.uld_topk, temperature=tau)
    # gold, and hkl: GOLD with a wider common set (t.pairs)
    gold = losses.gold_loss_plain if plain else losses.gold_loss
    return gold(
        s_logits, t_logits, s_chunk, t_chunk, t.pairs, uld_topk=args.uld_topk, temperature=tau
    )


# ----------------------------------------------------------------------------- a step's batches


def step_batches(batches, data_state, teachers: list[Teacher], args):
    """The step's --grad-accum micro-batches, prepared on the host (fewer where this rank's data
    ran out), where the data continues after them (a checkpoint's resume point), and the line of
    a teacher cache's error (a missing document, a damaged shard), else None."""
    micro_batches = []
    for _ in range(args.grad_accum):
        try:
            batch = next(batches, None)
        except cache_teacher.CacheError as e:  # a worker's error arrives with its traceback
            message = str(e).strip().splitlines()[-1].removeprefix("cache_teacher.CacheError: ")
            return micro_batches, data_state, message
        if batch is None:  # this rank's share of the data is empty
            break
        data_state = advance_state(data_state, batch)  # where to resume after this batch
        micro_batches.append(prepare_batch(batch, teachers, args.chunk_merge))
    return micro_batches, data_state, None


def step_counts(micro_batches: list[dict], n_teachers: int, job: Job, args, problem=None):
    """[student tokens, labelled tokens, then per teacher the targets its KD term averages] over
    the whole step: all micro-batches, all ranks (read from the host batches). A rank's data
    problem (`problem`, one line) stops every rank with it."""
    n = 2 + n_teachers
    counts = torch.zeros(n + 2, dtype=torch.float64)
    counts[-2] = problem is not None
    counts[-1] = len(micro_batches) < args.grad_accum and not problem  # its data ran out
    counts[:-2] = sum((b["counts"] for b in micro_batches), counts[:-2])
    counts = counts.to(job.device)
    if job.ddp:
        dist.all_reduce(counts)
    if int(counts[-2]):  # every rank knows: the one with the problem tells them what it is
        raise RunError(job.agree(problem))
    ran_out = int(counts[-1])
    if ran_out:
        raise RunError(
            f"{ran_out} rank(s) got no documents: the data has fewer documents than ranks x "
            f"DataLoader workers ({job.world_size} x {max(args.num_workers, 1)}): "
            "lower --num-workers, use fewer ranks, or add documents"
        )
    return counts[:-2]


def step_record(args, job, m: Models, step, sums, counts, grad_norm, skipped, started) -> dict:
    """The step's metrics.jsonl record, from one read of the device."""
    values = torch.cat([sums.double(), counts]).tolist()  # the one read
    n, tokens = len(m.teachers), values[-len(counts)]
    record = {
        "step": step,
        "lr": m.optimizer.param_groups[0]["lr"],
        "loss": values[0],
        "ce": values[1],
        "kd": values[2],
        "kd_scale": values[3],
        "grad_norm": grad_norm,
        "tokens": int(tokens),
        "skipped": skipped,
        "tokens_per_s": tokens / (time.perf_counter() - started),
    }
    valid_union = values[N_STEP_SUMS + n : N_STEP_SUMS + 3 * n]
    record["valid_chunks"] = sum(valid_union[0::2]) / max(sum(valid_union[1::2]), 1)
    if job.cuda:
        record["peak_mem_gb"] = torch.cuda.max_memory_allocated(job.device) / 2**30
    for t, value in zip(m.teachers, values[N_STEP_SUMS : N_STEP_SUMS + n]):
        record[f"kd/{t.name}"] = value
    return record


def data_issues(job: Job, data_state) -> dict:
    """Skipped/split documents by reason, over all ranks (every rank logs this step)."""
    issues = torch.tensor([issue_counts(data_state)[r] for r in REASONS], device=job.device)
    if job.ddp:
        dist.all_reduce(issues)
    return {r: n for r, n in zip(REASONS, issues.tolist()) if n}


# ----------------------------------------------------------------------------- models


def load_student(args, device: torch.device):
    """The student's tokenizer and model: fp32 weights, the same seed on every rank (identical
    initial weights; DDP also broadcasts them)."""
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)
    tok = load_tokenizer(args.student, trust_remote_code=args.trust_remote_code)
    student = load_model(args.student, tok, args, torch.float32, device, "student")
    if args.gradient_checkpointing:
        enable = getattr(student, "activation_checkpointing_enable", None)  # transformers >= 5
        (enable or student.gradient_checkpointing_enable)()
    return tok, student


def load_model(name: str, tok, args, dtype: torch.dtype, device: torch.device, role="teacher"):
    """A checkpoint directory or hub model; a random preset model for pkg: names with --preset."""
    if name.startswith("pkg:") and not os.path.isdir(name):
        if not args.preset:
            raise ValueError(f"{name} is a tokenizer, not a model: use it with --preset tiny")
        vocab = -(-len(tok) // 64) * 64  # pad to a multiple of 64, as real models do
        arch = "qwen3" if "qwen" in name else "llama"
        shape = PRESET_SHAPES[args.preset][arch == "qwen3"]
        # initialised where it runs (a 4B model is slow to init on CPU), from its own seed: a
        # teacher's weights do not depend on the student made before it (cache_teacher.py)
        seed = args.seed + zlib.crc32(name.encode()) if role == "teacher" else args.seed
        devices = [device] if device.type == "cuda" else []
        with torch.device(device), torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            model = tiny_model(arch, vocab, args.seq_len, shape, args.attn_implementation)
            return model.to(dtype)
    model = AutoModelForCausalLM.from_pretrained(
        name,
        dtype=dtype,
        trust_remote_code=args.trust_remote_code,
        attn_implementation=args.attn_implementation,
    )
    return model.to(device)


@dataclass
class Teacher:
    """One teacher and what its KD term needs (METHOD.md 5.2-5.4)."""

    name: str
    tok: object
    model: torch.nn.Module
    loss: str  # a key of KD_LOSSES ("auto" until attach_projection asks the audit)
    weight: float  # alpha_m
    vocab: int  # its tokenizer's ids: output rows beyond them are padding
    rows: int = 0  # its output rows
    cache: cache_teacher.TeacherCache | None = None  # --teacher-cache: model is None
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
        model, cache = None, None
        if settings.caches[i]:  # its outputs are on disk: the model is not loaded
            cache = cache_teacher.TeacherCache(settings.caches[i], tok)
            weights = cache_teacher.weights_identity(name, args.preset, args.seed)
            rule = cache_teacher.rule(tok, args.teacher_window)
            cache.check(name, tokenizer_hash(tok), weights, rule)
            rows = cache.manifest["rows"]
        else:
            device = sharding.load_device(args.fsdp, job.device)
            model = load_model(name, tok, args, dtype, device).to(device, dtype).eval()
            model.requires_grad_(False)
            rows = model.get_output_embeddings().weight.shape[0]
        loss, weight = settings.losses[i], settings.weights[i]
        t = Teacher(name, tok, model, loss, weight, min(len(tok), rows), rows, cache)
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
            if model is not None:
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
            f"{path} maps student ids to teacher ids >= {vocab}, where the teacher's tokenizer "
            "or its model's output rows end (fewer rows than ids: the model and its tokenizer "
            "disagree, use the tokenizer saved with the model; else rebuild W for this teacher)"
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
        cached = f", from its cache {t.cache.directory}" if t.cache else ""
        print(f"teacher {t.name}: loss {t.loss}, weight {t.weight}{cached}")


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
    share, from the resume state `start`; conversations in each side's chat template (chat.py)."""
    dataset = AlignedWindows(
        source,
        student_tok,
        teacher_toks,
        args.seq_len,
        text_field=args.text_field,
        rank=rank,
        world_size=world_size,
        start=start,
        teacher_cap=args.teacher_cap,
        teacher_window=args.teacher_window,
        repeat=True,
        data_config=args.data_config,
        split=args.split,
        pack=args.pack,
        shuffle=args.shuffle,
        shuffle_buffer=args.shuffle_buffer,
        seed=args.seed,
    )
    templates = args.student_chat_template, args.teacher_chat_template, args.assistant_only
    dataset.chat = chat.setup(dataset, *templates)  # None: no conversation in the data
    return dataset


def attach_caches(dataset: AlignedWindows, teachers: list[Teacher], source: str) -> None:
    """The cached teachers' outputs, read by the DataLoader workers with the windows: made for
    these documents (the data's files), and documents only (conversations are read online)."""
    if not any(t.cache for t in teachers):
        return
    if dataset.chat is not None:
        raise ValueError("--teacher-cache holds documents; chat data is read with the teacher run")
    for t in teachers:
        if t.cache is not None:
            t.cache.check_data(run_dir.data_files(source))
    dataset.caches = [t.cache for t in teachers]


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
    out = {k: v for k, v in batch.items() if k not in ("position", "issues", "tokens")}
    labelled = int((out["labels"] != -100).sum())
    counts, valid_union = [int(batch["tokens"].sum()), labelled], []  # chat: the trained ones
    for i, t in enumerate(teachers):
        s_chunk, t_chunk = out[f"student_chunk_{i}"], out[f"teacher_chunk_{i}"]
        if chunk_merge == "first":
            s_chunk, t_chunk = first_positions_only(s_chunk), first_positions_only(t_chunk)
            out[f"student_chunk_{i}"], out[f"teacher_chunk_{i}"] = s_chunk, t_chunk
        valid, union = chunk_counts(s_chunk, t_chunk)
        if t.loss == "kl" and f"teacher_at_{i}" in out:  # the positions KL is a mean over
            valid = int(((out[f"teacher_at_{i}"] >= 0) & (out["labels"] != -100)).sum())
        counts.append(labelled if t.loss == "kl" and f"teacher_at_{i}" not in out else valid)
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


if __name__ == "__main__":
    main()
