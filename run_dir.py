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
from cli import LOAD_ERRORS, atomic_write, os_error_line
from flags import OLDER_DEFAULTS, RESUME_KEYS

LOCK = "run.lock"
OVERWRITTEN = ".overwritten"
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


def checkpoint_problem(path: str, world_size: int) -> str | None:
    """Why a checkpoint cannot be resumed from, or None: every file present and loadable."""
    problem = _safetensors_problem(os.path.join(path, "model.safetensors"))
    if problem:
        return problem
    names = ["trainer_state.pt", *(f"rank_{r}.pt" for r in range(world_size))]
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


def newest_good_checkpoint(out_dir: str, world_size: int) -> tuple[tuple[int, str] | None, list]:
    """(the newest checkpoint that verifies, or None; warnings about the newer ones that do
    not)."""
    warnings = []
    for step, path in reversed(checkpoints(out_dir)):
        problem = checkpoint_problem(path, world_size)
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
    """--overwrite: move the previous run's checkpoints and metrics into out_dir/.overwritten
    (deleted once the new run has a checkpoint: `drop_overwritten`); None if there was none."""
    old = [p for _, p in checkpoints(out_dir)]
    old += [p for p in [os.path.join(out_dir, "metrics.jsonl")] if os.path.exists(p)]
    if not old:
        return None
    aside = os.path.join(out_dir, OVERWRITTEN)
    shutil.rmtree(aside, ignore_errors=True)  # a run overwritten before and never replaced
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
    previous = checkpoints(out_dir)
    if previous and not args.resume and not args.overwrite:
        raise ValueError(
            f"{out_dir} holds a run (step {previous[-1][0]}): pass --resume to "
            "continue it or --overwrite to replace it"
        )
    decision = {"resume": None, "warnings": [], "created": created}
    if args.resume and not args.overwrite:
        found, decision["warnings"] = newest_good_checkpoint(out_dir, job.world_size)
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
    if args.overwrite and move_aside(args.out_dir):
        print(
            f"--overwrite: the previous run in {args.out_dir} is moved to "
            f"{OVERWRITTEN}/ until this run's first checkpoint"
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


# ----------------------------------------------------------------------------- checkpoints


def save(args, job: Job, m, step: int, data_state, skipped: int, streak_start: int | None):
    """A checkpoint of the models `m` (train.py's Models), never from non-finite weights; rotation
    keeps the newest checkpoint from before the current run of skipped steps. A failed write stops
    the run in one line (RunError)."""
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
    }
    if not args.fsdp:  # --fsdp: each rank writes its shard of it (save_checkpoint)
        state["optimizer"] = m.optimizer.state_dict()
    error = save_checkpoint(args, job, m, step, state, data_state, max(before, default=None))
    if error:
        latest = checkpoints(args.out_dir)
        latest = f"step_{latest[-1][0]}" if latest else "none"
        raise RunError(
            f"checkpoint step_{step} could not be written ({error}); the latest "
            f"complete checkpoint is {latest}: fix that, then --resume"
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


def _logged_step(line: str) -> float:
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
    lines past the resumed step are dropped."""

    def __init__(self, args, master: bool, start_step: int, teacher_names: list[str]):
        self.master, self.path = master, os.path.join(args.out_dir, "metrics.jsonl")
        self.trackers: list = []
        self.teacher_names, self.bar = teacher_names, None
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
        self.bar = tqdm(total=args.max_steps, initial=start_step, desc="train", dynamic_ncols=True)

    def log(self, record: dict) -> None:
        if not self.master:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        values = scalars({k: v for k, v in record.items() if k != "step"})
        for tracker in self.trackers:
            tracker.log(values, record["step"])

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
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []


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
