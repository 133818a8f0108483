"""train.py's run plumbing: everything around the training step that is not the method.

- Job: this process in the torchrun job (rank, device) and the one error path every rank takes
  together (one line, exit 2).
- The run directory: one run per directory, held by a lock; the configuration a --resume must
  match; checkpoints written atomically and verified before a resume uses them; an --overwrite
  that deletes nothing until the new run has its first checkpoint.
- Logs: metrics.jsonl, the trackers (wandb, TensorBoard), the progress bar, curves.png; signals.

    out_dir/run.lock         host and pid of the run that holds the directory
    out_dir/run_config.json  every setting, library versions, git commit (written once the run
                             starts); a --resume must match it on flags.RESUME_KEYS
    out_dir/metrics.jsonl    one JSON line per logged step
    out_dir/step_N/          complete checkpoints (a temp directory renamed when complete):
                             save_pretrained weights (bf16 by default) + tokenizer,
                             master_weights.pt (fp32), trainer_state.pt, rank_R.pt;
                             under --fsdp sharded/ (DCP: each rank's shard of the fp32
                             weights and optimizer state) instead of master_weights.pt
    out_dir/.overwritten/    the previous run, moved aside by --overwrite until step_N exists
"""

from __future__ import annotations

import copy
import glob
import hashlib
import importlib.metadata
import json
import math
import os
import platform
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import uuid
from typing import NoReturn

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch.distributed.checkpoint.api import CheckpointException
from tqdm import tqdm

import curves
import sharding
from cli import LOAD_ERRORS, atomic_write, free_space, os_error_line
from data import resolve_files
from flags import OLDER_DEFAULTS, RESUME_KEYS, as_flags

LOCK = "run.lock"
OVERWRITTEN = ".overwritten"
# What --overwrite moves aside besides the checkpoints: the rest of a run (not its lock, not the
# tiny preset's generated corpus, not files the run did not write)
RUN_FILES = ("metrics.jsonl", "run_config.json", "curves.png", "tensorboard", "wandb_run_id")
MASTER_WEIGHTS = "master_weights.pt"  # fp32 weights, beside bf16 model weights: exact resume


def checkpoints(out_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints, oldest first (step_N exists only after its atomic rename)."""
    found = [
        (int(p.rsplit("_", 1)[1]), p)
        for p in glob.glob(os.path.join(out_dir, "step_*"))
        if p.rsplit("_", 1)[1].isdigit()
    ]
    return sorted(found)


def _safetensors_problem(path: str) -> str | None:
    """Why a .safetensors file is unusable (missing, truncated, a bad header), or None: the
    header's byte ranges must end exactly at the end of the file."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size:
                return "model.safetensors is truncated (in its header)"
            header = json.loads(f.read(n))
    except FileNotFoundError:
        return "model.safetensors is missing"
    except (OSError, struct.error, ValueError) as e:
        return f"model.safetensors is unreadable ({type(e).__name__})"
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"]
    if 8 + n + max(ends, default=0) != size:
        return "model.safetensors is truncated"
    return None


def checkpoint_problem(path: str, world_size: int | None = None) -> str | None:
    """Why a checkpoint cannot be resumed from, or None: every file present and loadable, a
    rank_R.pt for each of `world_size` ranks (default: the ranks that wrote it)."""
    problem = _safetensors_problem(os.path.join(path, "model.safetensors"))
    if problem:
        return problem
    try:
        state = torch.load(os.path.join(path, "trainer_state.pt"), weights_only=True, mmap=True)
    except FileNotFoundError:
        return "trainer_state.pt is missing"
    except (OSError, *LOAD_ERRORS) as e:
        return f"trainer_state.pt is unreadable ({type(e).__name__})"
    if not isinstance(state, dict) or not isinstance(state.get("world_size"), int):
        return "trainer_state.pt holds no world_size"
    names = [f"rank_{r}.pt" for r in range(world_size or state["world_size"])]
    sharded = os.path.join(path, sharding.SHARDED)
    if os.path.isdir(sharded):  # --fsdp: the fp32 weights and optimizer state, in shards
        problem = sharding.problem(sharded)
        if problem:
            return problem
    elif saved_dtype(path) != "float32":  # the model weights are not the fp32 ones: the master
        names.append(MASTER_WEIGHTS)
    for name in names:
        try:  # mmap: the zip's directory is checked without reading the optimizer state
            torch.load(os.path.join(path, name), weights_only=True, mmap=True)
        except FileNotFoundError:
            return f"{name} is missing"
        except (OSError, *LOAD_ERRORS) as e:  # no permission, I/O errors, a damaged file
            return f"{name} is unreadable ({type(e).__name__})"
    return None


def saved_dtype(path: str) -> str:
    """The dtype a checkpoint's config.json gives its weights ("float32" when it gives none)."""
    try:
        with open(os.path.join(path, "config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return "float32"  # a missing or damaged config.json: model.safetensors decides alone
    return config.get("dtype") or config.get("torch_dtype") or "float32"


def newest_good_checkpoint(out_dir: str) -> tuple[tuple[int, str] | None, list]:
    """(the newest checkpoint that verifies, or None; warnings about the newer ones that do
    not). Each is verified for the ranks that wrote it: another number of processes is not
    damage (inspect_run_dir says what differs)."""
    warnings = []
    for step, path in reversed(checkpoints(out_dir)):
        problem = checkpoint_problem(path)
        if problem is None:
            return (step, path), warnings
        warnings.append(f"checkpoint {path} is damaged ({problem}): skipped")
    return None, warnings


def rotate(out_dir: str, keep_last: int, protect: int | None = None) -> None:
    """Delete all but the newest keep_last checkpoints, never the one at step `protect`."""
    for step, path in checkpoints(out_dir)[:-keep_last]:
        if step != protect:
            shutil.rmtree(path)


class RunLock:
    """out_dir/run.lock, created exclusively: a second run in the same directory is refused. A
    lock left by a dead process on this host is stale and taken over; one from another host
    cannot be checked and must be removed by hand."""

    def __init__(self, out_dir: str):
        self.path = os.path.join(out_dir, LOCK)
        self.held = False

    def acquire(self) -> str | None:
        """None when held, else a warning-free error message."""
        me = {"host": socket.gethostname(), "pid": os.getpid()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is None or not self._alive(holder, me["host"]):
                    print(f"warning: removing the stale lock {self.path} ({holder})")
                    os.unlink(self.path)
                    continue
                return (
                    f"{os.path.dirname(self.path)} is in use by the run of pid {holder['pid']} on "
                    f"{holder['host']}: wait for it, or pick another --out-dir (if no such run "
                    f"exists, delete {self.path})"
                )
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return None
        return f"cannot take the lock {self.path}: delete it if no run uses the directory"

    def _holder(self) -> dict | None:
        try:
            with open(self.path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None  # half-written by a process that died: stale

    @staticmethod
    def _alive(holder: dict, host: str) -> bool:
        if holder.get("host") != host:
            return True  # cannot tell: assume it runs
        try:
            os.kill(int(holder["pid"]), 0)
        except ProcessLookupError:
            return False
        except (PermissionError, KeyError, ValueError, TypeError):
            return True
        return True

    def release(self) -> None:
        if self.held:
            self.held = False
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


def move_aside(out_dir: str) -> str | None:
    """--overwrite: move the previous run (checkpoints, metrics.jsonl, run_config.json, ...:
    RUN_FILES) into out_dir/.overwritten, deleted once the new run has a checkpoint
    (`drop_overwritten`); returns where, or None if there was none. When .overwritten already
    holds a run (an earlier --overwrite's replacement stopped before its first checkpoint), that
    run stays and this one goes beside it, into .overwritten/later-N: nothing is deleted before
    a new checkpoint exists."""
    old = [p for _, p in checkpoints(out_dir)]
    old += [p for p in (os.path.join(out_dir, name) for name in RUN_FILES) if os.path.lexists(p)]
    if not old:
        return None
    aside = os.path.join(out_dir, OVERWRITTEN)
    n = 1
    while os.path.lexists(aside):
        aside, n = os.path.join(out_dir, OVERWRITTEN, f"later-{n}"), n + 1
    os.makedirs(aside)
    for path in old:
        os.replace(path, os.path.join(aside, os.path.basename(path)))
    return aside


def drop_overwritten(out_dir: str) -> None:
    shutil.rmtree(os.path.join(out_dir, OVERWRITTEN), ignore_errors=True)


# ----------------------------------------------------------------------------- processes


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class RunError(Exception):
    """An error met by every rank together while the loop runs (the ranks have agreed on it): the
    run stops with its one line and exit status 2."""


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
        self.lock = RunLock(out_dir)

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


# ----------------------------------------------------------------------------- the run directory


def inspect_run_dir(args, job: Job) -> dict:
    """Rank 0: take the directory's lock, check that this run may use it (one configuration per
    directory; an existing run needs --resume or --overwrite; a run that an --overwrite moved
    aside is replaced only by another --overwrite) and pick the checkpoint to resume from (the
    newest that verifies), whose record must agree with these flags (the rest of the
    fingerprint, W files and data, is compared by check_fingerprint once they are known).
    Writes nothing but the lock."""
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
    decision = {"resume": None, "warnings": [], "created": created, "records": []}
    config = os.path.join(out_dir, "run_config.json")
    if not args.overwrite and os.path.exists(config):
        decision["records"].append((f"{out_dir} holds a run", recorded_fingerprint(config)))
        compare_fingerprint(fingerprint(args), decision["records"], args.resume, RESUME_KEYS)
    previous = checkpoints(out_dir)
    aside = os.path.join(out_dir, OVERWRITTEN)
    if previous and not args.resume and not args.overwrite:
        raise ValueError(
            f"{out_dir} holds a run (step {previous[-1][0]}): pass --resume to "
            "continue it or --overwrite to replace it"
        )
    if not previous and not args.overwrite and os.path.isdir(aside):
        raise ValueError(
            f"{out_dir} holds no checkpoint, and {aside} the run that an earlier --overwrite "
            "replaced (its replacement stopped before its first checkpoint): pass --overwrite "
            f"to replace it, or move its files back into {out_dir} and --resume it"
        )
    if args.resume:
        found, decision["warnings"] = newest_good_checkpoint(out_dir)
        if found is None and previous:
            step, path = previous[-1]
            raise ValueError(
                f"--resume: {out_dir} holds no complete checkpoint ({len(previous)} damaged; "
                f"step_{step}: {checkpoint_problem(path)}): repair it, or pass --overwrite "
                "instead of --resume to start a new run (it keeps them aside until its first "
                "checkpoint)"
            )
        if found is None:
            raise ValueError(
                f"--resume: {out_dir} holds no complete checkpoint: drop --resume to start a "
                "new run"
            )
        decision["resume"] = found
        decision["records"].append((f"checkpoint {found[1]} was written", saved_record(found[1])))
        compare_fingerprint(fingerprint(args, job.world_size), decision["records"], True)
    return decision


def fingerprint(args, world_size: int | None = None, w_paths=None, source=None) -> dict:
    """The settings a --resume must match, as JSON values: every flags.RESUME_KEYS flag; with
    world_size the number of processes (each rank's data position is saved apart) and of
    DataLoader workers per rank; with w_paths (per teacher; None for a same-tokenizer teacher)
    the sha256 of each W's content, whichever file holds it (--projection or the cache); with
    source (--data as resolved) its local files and their sizes (None for a hub dataset; names
    and sizes, not contents: hashing a corpus of hundreds of GB at every start is not
    affordable, so an edit in place that keeps a file's size goes unseen). Recorded in
    run_config.json and in each checkpoint's trainer_state.pt, so that a copied checkpoint is
    checked against its own record."""
    record = {k: getattr(args, k) for k in RESUME_KEYS}
    if world_size is not None:
        record["processes"] = world_size
        record["data_workers"] = max(args.num_workers, 1)  # 0: the rank itself, one worker too
    if w_paths is not None:
        record["projection_sha256"] = [content_sha256(p) if p else None for p in w_paths]
    if source is not None:
        record["data_files"] = data_files(source)
    return json.loads(json.dumps(record, default=str))  # as read back: tuples are lists


def content_sha256(path: str) -> str:
    """The sha256 of what a torch.save file holds (its keys, values, tensors' dtypes, shapes and
    bytes), not of the file: torch.save writes a random id into each file, so a W rebuilt the same
    is the same W."""
    digest = hashlib.sha256()

    def add(x) -> None:
        if isinstance(x, dict):
            for key in sorted(x, key=str):
                digest.update(repr(key).encode())
                add(x[key])
        elif isinstance(x, list | tuple):
            digest.update(f"[{len(x)}".encode())
            for value in x:
                add(value)
        elif isinstance(x, torch.Tensor):
            x = x.coalesce() if x.layout == torch.sparse_coo else x
            for part in [x.indices(), x.values()] if x.layout == torch.sparse_coo else [x]:
                digest.update(repr((part.dtype, tuple(part.shape))).encode())
                digest.update(part.contiguous().numpy().tobytes())
        else:
            digest.update(repr(x).encode())

    add(torch.load(path, weights_only=True, map_location="cpu"))
    return digest.hexdigest()


def data_files(source: str) -> dict[str, int] | None:
    """{name: size in bytes} of the local files --data reads (names relative to the directory or
    the glob's fixed part, so that the tiny preset's corpus, written into each --out-dir, compares
    equal); None for a hub dataset."""
    files = resolve_files(source)
    if files is None:
        return None
    if os.path.isdir(source):
        root = source
    elif glob.has_magic(source):
        fixed = source.split(os.sep)
        fixed = fixed[: next(i for i, p in enumerate(fixed) if glob.has_magic(p))]
        root = os.sep.join(fixed) or "."
    else:
        root = os.path.dirname(source) or "."
    return {os.path.relpath(f, root): os.path.getsize(f) for f in files}


def recorded_fingerprint(path: str) -> dict:
    """The fingerprint a run_config.json records (runs before it: their flags alone)."""
    try:
        with open(path, "rb") as f:
            saved = json.load(f)
    except ValueError:
        raise ValueError(f"{path} is not valid JSON: repair or delete it") from None
    if not isinstance(saved, dict):
        raise ValueError(f"{path} is not a train.py run_config.json: repair or delete it")
    if isinstance(saved.get("fingerprint"), dict):
        return saved["fingerprint"]
    args = saved.get("args") if isinstance(saved.get("args"), dict) else saved  # older: the keys
    return {k: args[k] for k in RESUME_KEYS if k in args}


def saved_record(path: str) -> dict:
    """The fingerprint a checkpoint records in its trainer_state.pt; for a checkpoint written
    before there was one, what it holds of it: its flags, processes and DataLoader workers."""
    state = torch.load(os.path.join(path, "trainer_state.pt"), weights_only=True, mmap=True)
    if isinstance(state.get("fingerprint"), str):
        return json.loads(state["fingerprint"])
    try:
        args = json.loads(state.get("args") or "{}")
    except ValueError:
        args = {}
    record = {k: args[k] for k in RESUME_KEYS if k in args}
    record["processes"] = state["world_size"]
    rank_0 = torch.load(os.path.join(path, "rank_0.pt"), weights_only=True)
    if isinstance(rank_0.get("data_state"), dict) and "num_workers" in rank_0["data_state"]:
        record["data_workers"] = rank_0["data_state"]["num_workers"]
    return record


def compare_fingerprint(now: dict, records: list, resume: bool, keys=None) -> None:
    """ValueError naming each setting of `now` (on `keys`, default all) that a record (where,
    fingerprint) gives another value, as the flag to change; a record that lacks a setting does
    not decide it (unchecked_settings names those)."""
    for where, saved in records:
        saved = OLDER_DEFAULTS | saved
        differ = [
            difference(k, now[k], saved[k], now)
            for k in keys or now
            if k in saved
            and json.dumps(saved[k], sort_keys=True) != json.dumps(now[k], sort_keys=True)
        ]
        if differ:
            todo = "resume it with its settings, or " if resume else ""
            raise ValueError(
                f"{where} with another configuration ({'; '.join(differ)}): {todo}pass "
                "--overwrite to replace it, or pick another --out-dir"
            )


def difference(key: str, value, was, now: dict) -> str:
    """What differs of one fingerprint setting, as the flag that sets it."""
    if key in RESUME_KEYS:
        return f"{as_flags(key, value)} (the run: {as_flags(key, was)})"
    if key == "processes":
        return (
            f"{value} process{'es' * (value != 1)} (the run: {was}; each rank's data position is "
            f"saved apart: resume with {was}: torchrun --nnodes N --nproc_per_node M, N x M={was})"
        )
    if key == "data_workers":
        return f"--num-workers {value} (the run: --num-workers {was}; 0 and 1 are one worker)"
    if key == "projection_sha256":
        teachers = now.get("teacher") or []
        changed = [
            f"teacher {name}'s W is another (content sha256 {a[:12]}.., the run's {b[:12]}..)"
            for name, a, b in zip(teachers, value, was if isinstance(was, list) else [])
            if a != b and a and b
        ]
        return f"--projection: {', '.join(changed) or 'another W file'}: give the run's W file"
    if key == "data_files":
        if value is None or was is None:
            return "--data: local files here, a hub dataset in the run (or the reverse)"
        added, removed = sorted(set(value) - set(was)), sorted(set(was) - set(value))
        resized = [
            f"{n} {was[n]:,} -> {value[n]:,} bytes"
            for n in sorted(value)
            if n in was and value[n] != was[n]
        ]
        parts = [
            f"{what} {', '.join(names[:3])}{' ...' * (len(names) > 3)}"
            for what, names in (("added", added), ("removed", removed), ("changed", resized))
            if names
        ]
        return (
            f"--data: its files changed since the run read them ({'; '.join(parts)}): restore them"
        )
    return f"{key} {value} (the run: {was})"


def unchecked_settings(now: dict, records: list) -> list[str]:
    """The settings of `now` that no record holds (a run or checkpoint of an older train.py)."""
    held = {k for _, saved in records for k in saved} | set(OLDER_DEFAULTS)
    return [k for k in now if k not in held]


def check_fingerprint(args, job: Job, decision: dict, teachers: list, source: str) -> dict | None:
    """Once train.py's teachers have their W files (t.w_path) and the data is resolved, rank 0
    (the others return None): this run's whole fingerprint, which a --resume must match in every
    record (run_config.json's, the checkpoint's own); what the records predate cannot be checked
    and is a warning. Returns the fingerprint (recorded by start_run and save)."""
    if not job.master:
        return None
    now = fingerprint(args, job.world_size, [t.w_path for t in teachers], source)
    if decision["resume"]:
        compare_fingerprint(now, decision["records"], True)
        missing = unchecked_settings(now, decision["records"])
        if missing:
            decision["warnings"].append(
                f"the run's record predates {', '.join(missing)}: not checked against it"
            )
    return now


def start_run(args, fingerprint: dict) -> None:
    """Rank 0, once every check has passed: the temp directories of saves that never finished
    (a killed run's) go; --overwrite moves the old run aside (deleted at the new run's first
    checkpoint); run_config.json is written, with the run's fingerprint."""
    for tmp in glob.glob(os.path.join(args.out_dir, ".tmp_step_*")):
        shutil.rmtree(tmp, ignore_errors=True)
    aside = move_aside(args.out_dir) if args.overwrite else None
    if aside:
        where = os.path.relpath(aside, args.out_dir)
        earlier = f" (beside the run an earlier --overwrite moved to {OVERWRITTEN}/)" * (
            where != OVERWRITTEN
        )
        print(
            f"--overwrite: the previous run in {args.out_dir} is moved to {where}/{earlier} "
            "until this run's first checkpoint"
        )
    config = json.dumps({**run_config(args), "fingerprint": fingerprint}, indent=2)
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


# ----------------------------------------------------------------------------- checkpoints


def save(args, job: Job, m, step: int, data_state, skipped, streak_start, fingerprint: dict):
    """A checkpoint of the models `m` (train.py's Models) with the run's fingerprint, never from
    non-finite weights; rotation keeps the newest checkpoint from before the current run of
    skipped steps. A failed write stops the run in one line (RunError): the checkpoint, the
    reason, the free space."""
    params = m.student.parameters()
    finite = all(bool(torch.isfinite(sharding.local(p)).all()) for p in params)
    if job.agree(None if finite else "non-finite") is not None:  # FSDP: any rank's shard
        return f"non-finite weights at step {step}: no checkpoint written"
    before = [s for s, _ in checkpoints(args.out_dir) if s < (streak_start or 0)]
    state = {
        "step": step,
        "skipped": skipped,
        "world_size": job.world_size,
        "projections": [p.state_dict() for p in m.learned],
        "args": json.dumps(vars(args), default=str),
        "fingerprint": json.dumps(fingerprint),  # what a --resume must match (rank 0's)
    }
    if not args.fsdp:  # --fsdp: each rank writes its shard of it (save_checkpoint)
        state["optimizer"] = m.optimizer.state_dict()
    error = save_checkpoint(args, job, m, step, state, data_state, max(before, default=None))
    if error:
        latest = checkpoints(args.out_dir)
        then = (
            f"the latest complete checkpoint is step_{latest[-1][0]}: free some space (or fix "
            "the error), then --resume"
            if latest
            else "no checkpoint of this run exists yet: free some space (or fix the error), "
            "then run it again"
        )
        raise RunError(
            f"checkpoint {os.path.join(args.out_dir, f'step_{step}')} could not be written "
            f"({error}; {free_space(args.out_dir)}); {then}"
        )
    return None


def save_checkpoint(args, job: Job, m, step: int, state: dict, data_state, protect=None):
    """out_dir/step_N/: save_pretrained weights in --save-dtype (bf16: config.json says so) +
    tokenizer, which lm-eval and vLLM load as they are; the fp32 master weights beside them
    (master_weights.pt, for an exact resume) unless they are the model weights; under --fsdp
    instead each rank's shard of the fp32 weights and optimizer state (sharded/); the trainer
    state; each rank's RNG and data position. Written into a temp directory that is
    renamed when complete, so a kill mid-write leaves the previous checkpoint intact; a failed
    write (a full disk) removes the temp directory and returns its reason, on every rank. Then
    the oldest checkpoints beyond --keep-last go (never step `protect`), and so does a run that
    --overwrite moved aside."""
    out_dir, student = args.out_dir, m.student
    tmp = os.path.join(out_dir, f".tmp_step_{step}")
    # --fsdp: the whole weights, gathered to rank 0 for save_pretrained (every rank takes part)
    weights = sharding.full_weights(student) if args.fsdp else untied(student.state_dict())

    def shared() -> None:
        if job.master:
            shutil.rmtree(tmp, ignore_errors=True)
            save_weights(student, weights, tmp, getattr(torch, args.save_dtype), not args.fsdp)
            m.student_tok.save_pretrained(tmp)
            torch.save(state, os.path.join(tmp, "trainer_state.pt"))

    def mine() -> None:
        if args.fsdp:
            sharding.save_sharded(
                os.path.join(tmp, sharding.SHARDED), student, m.learned, m.optimizer
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
            rotate(out_dir, args.keep_last, protect)
            drop_overwritten(out_dir)

    for part in (shared, mine, publish):
        error = None
        try:
            part()
        except CheckpointException as e:  # DCP's save: every rank learns each rank's failure
            error = sharding.failure_line(e)
        except Exception as e:  # any failure of a write is a failed save: a full disk is an
            error = write_failure(e)  # OSError, torch.save's RuntimeError, a SafetensorError
        error = job.agree(error)
        if error:
            if job.master:
                shutil.rmtree(tmp, ignore_errors=True)
            return error
    return None


def write_failure(e: Exception) -> str:
    """Why a write failed, in one line (an OS error's hint; another error's type and first
    line)."""
    if isinstance(e, OSError):
        return os_error_line(e)
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"


def save_weights(student, weights: dict, directory: str, dtype: torch.dtype, master: bool) -> None:
    """The student's fp32 `weights` in save_pretrained format, in `dtype` (config.json says it, so
    `dtype="auto"` loads them as they are), and with `master` the fp32 weights beside them if
    those differ (master_weights.pt, which neither transformers nor vLLM reads)."""
    student.save_pretrained(directory, state_dict={k: v.to(dtype) for k, v in weights.items()})
    config = copy.deepcopy(student.config)  # save_pretrained wrote the fp32 model's dtype
    config.dtype = str(dtype).removeprefix("torch.")
    config.save_pretrained(directory)
    if master and dtype != torch.float32:
        torch.save(weights, os.path.join(directory, MASTER_WEIGHTS))


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
    master = os.path.join(path, MASTER_WEIGHTS)
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


def _logged_step(line: bytes) -> float:
    """A metrics.jsonl line's step; inf for a line that is not a record (half-written by a
    killed run: dropped on resume)."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


class Logger:
    """What a run tells, from rank 0: metrics.jsonl (one JSON line per logged step), the trackers of
    --report-to (Weights & Biases, a --resume continuing the same wandb run; TensorBoard), the
    progress bar (the loss, CE, each teacher's KD, the applied KD/CE scale) and warnings above it.
    Trackers get scalars only (nested values flattened: data_issues/split_document). On resume,
    lines past the resumed step are dropped. A tracker that fails (no login, no network) is a
    warning and the run goes on without it; a record that cannot be appended (a full disk)
    waits in memory, with a warning, and goes in with the next one that can."""

    def __init__(self, args, master: bool, start_step: int, teacher_names: list[str]):
        self.master, self.path = master, os.path.join(args.out_dir, "metrics.jsonl")
        self.trackers: list = []
        self.teacher_names, self.bar, self.unwritten = teacher_names, None, []
        if not master:
            return
        if os.path.exists(self.path):
            with open(self.path, "rb") as f:  # a damaged line (a killed run's) is no record
                kept = [
                    line.rstrip(b"\n") + b"\n" for line in f if _logged_step(line) <= start_step
                ]
            atomic_write(self.path, lambda f: f.write(b"".join(kept)))
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
            except Exception as e:  # no login, no network, a full disk: the run goes on
                print(
                    f"warning: --report-to {name} could not start ({write_failure(e)}); "
                    "logging to metrics.jsonl only",
                    file=sys.stderr,
                )
        self.bar = tqdm(total=args.max_steps, initial=start_step, desc="train", dynamic_ncols=True)

    def log(self, record: dict) -> None:
        if not self.master:
            return
        self.unwritten.append(json.dumps(record) + "\n")
        self.write_unwritten()
        values = scalars({k: v for k, v in record.items() if k != "step"})
        for tracker in list(self.trackers):
            try:
                tracker.log(values, record["step"])
            except Exception as e:  # the run goes on; metrics.jsonl has every record
                self.warn(f"--report-to: {tracker.name} failed ({write_failure(e)}): dropped")
                self.trackers.remove(tracker)

    def write_unwritten(self) -> bool:
        """Append the records not written yet to metrics.jsonl; a failure (a full disk) is a
        warning (the first time) and they wait for the next try."""
        try:
            append(self.path, "".join(self.unwritten).encode())
        except OSError as e:
            if len(self.unwritten) == 1:
                self.warn(
                    f"cannot append to {self.path} ({e.strerror or e}; "
                    f"{free_space(self.path)}): records wait in memory until it can be written"
                )
            return False
        self.unwritten = []
        return True

    def show(self, record: dict) -> None:
        """One step more on the progress bar, with the step's figures."""
        if self.bar is None:
            return
        shown = {"loss": record["loss"], "ce": record["ce"]}
        for name in self.teacher_names:
            shown[f"kd:{short_name(name)}"] = record[f"kd/{name}"]
        if self.teacher_names:
            shown["scale"] = record["kd_scale"]
        self.bar.update(1)
        self.bar.set_postfix(
            {k: f"{v:.3g}" if abs(v) >= 1000 else f"{v:.3f}" for k, v in shown.items()}
        )

    def warn(self, message: str) -> None:
        """A warning on rank 0, above the progress bar."""
        if self.master:
            tqdm.write(f"warning: {message}", file=sys.stderr)

    def note(self, message: str) -> None:
        """A line on rank 0's stdout, above the progress bar."""
        if self.master:
            tqdm.write(message)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.unwritten and not self.write_unwritten():
            steps = [json.loads(r)["step"] for r in self.unwritten]
            self.warn(f"steps {steps[0]}-{steps[-1]} never got into {self.path} (no space)")
            self.unwritten = []
        for tracker in self.trackers:
            try:
                tracker.close()
            except Exception as e:
                self.warn(f"--report-to: {tracker.name} did not close ({write_failure(e)})")
        self.trackers = []


def append(path: str, data: bytes) -> None:
    """Append data to path whole or not at all: a failed write (a full disk) cuts the file back
    to where it ended, so no half line is left for the next append to continue."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        size = os.fstat(fd).st_size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        except OSError:
            os.ftruncate(fd, size)
            raise
    finally:
        os.close(fd)


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

    name = "wandb"

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

    name = "tensorboard"

    def __init__(self, args, start_step: int):
        from torch.utils.tensorboard import SummaryWriter  # optional: needs tensorboard

        log_dir = os.path.join(args.out_dir, "tensorboard")
        self.writer = SummaryWriter(log_dir, purge_step=start_step + 1 if start_step else None)

    def log(self, values: dict, step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


def short_name(name: str) -> str:
    """A model's name without its organisation or package prefix: Qwen/Qwen3-4B -> Qwen3-4B."""
    return name.rstrip("/").rsplit("/", 1)[-1].removeprefix("pkg:")


def catch_stop_signals() -> list[int]:
    """SIGTERM (what a scheduler sends before it kills a job) or SIGINT: the list returned gets the
    signal, and the loop finishes the step, writes a checkpoint and stops; a second signal stops at
    once. main() puts the old handlers back."""
    signalled: list[int] = []

    def on_signal(signum, frame) -> None:
        signalled.append(signum)
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)

    for sig in STOP_SIGNALS:
        signal.signal(sig, on_signal)
    return signalled


def draw_curves(out_dir: str) -> None:
    """out_dir/curves.png from metrics.jsonl (curves.py), when matplotlib is installed."""
    try:
        print(f"training curves: {curves.plot_curves(out_dir)}")
    except ImportError:
        print("no curves.png: pip install matplotlib (then python curves.py OUT_DIR)")
    except Exception as e:  # a picture is never worth a traceback at the end of a run
        print(f"warning: no curves.png ({write_failure(e)}): python curves.py {out_dir} draws it")
