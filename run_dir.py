"""train.py's run directory: one run per directory, held by a lock; checkpoints verified before a
resume uses them; an --overwrite that deletes nothing until the new run has its first checkpoint.

    out_dir/run.lock         host and pid of the run that holds the directory
    out_dir/run_config.json  every setting, library versions, git commit (written once the run
                             starts); a --resume must match it on train.RESUME_KEYS
    out_dir/metrics.jsonl    one JSON line per logged step
    out_dir/step_N/          complete checkpoints (a temp directory renamed when complete):
                             save_pretrained weights (bf16 by default) + tokenizer,
                             master_weights.pt (fp32), trainer_state.pt, rank_R.pt;
                             under --fsdp sharded/ (DCP: each rank's shard of the fp32
                             weights and optimizer state) instead of master_weights.pt
    out_dir/.overwritten/    the previous run, moved aside by --overwrite until step_N exists
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import socket
import struct

import torch

import sharding
from cli import LOAD_ERRORS

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
