"""The robustness campaign (issue 27): faults, bad files, resumes with changed settings and two
processes, each run as a user would run it (a subprocess of train.py, curves.py or torchrun), its
outcome classified, and one markdown table of counts per class.

    python bench/campaign.py                   # every case (~30 min on 2 CPU cores)
    python bench/campaign.py --only resume     # the cases whose name or class contains "resume"
    python bench/campaign.py --list            # the cases, not run

Outcomes, per case:
- handled: what the case expects happened: an `error` case exits 2 with one `error:` line that
  says what it must (`says`), an `ok` case exits 0 (with the warnings of `says`), and its check,
  if any, passes;
- lost run: the check finds a run (a checkpoint, a record) gone that nothing deleted knowingly;
- traceback: stderr holds a Python traceback with a frame in this repository's own files (a
  DataLoader worker's included; a torchrun summary's frames in torch are not ours);
- silent wrong: the case went on where it must have stopped, or its check finds a wrong result
  (losses that differ from the uninterrupted run's, a warning missing, files left behind);
- hang: no exit within the case's timeout;
- unclear: another exit status or an error that does not say what it must.

Other lists of cases join from bench/campaign_cases_inputs.py (if present) as its CASES: a list of
Case (imported from here) using the same Ctx helpers.

Full-disk cases mount a small tmpfs (root only; otherwise they are reported as skipped). Runs on
CPU, offline, the tiny preset; a base run of 4 steps (checkpoints at 2 and 4) is made first and
copied by the cases (cut back to step 2, it is "a run interrupted at step 2" whose resume must give
the base's steps 3 and 4 to 1e-6).
"""

from __future__ import annotations

import argparse
import datetime
import glob
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
PY = sys.executable
CLASSES = ("handled", "lost run", "traceback", "silent wrong", "hang", "unclear", "skipped")
ERROR_LINE = re.compile(r"(?:[\w.-]+: )?error: ")  # "error: ..." or argparse's "prog: error: ..."
REPO_FRAME = re.compile(
    r'File "(?!' + re.escape(os.path.join(ROOT, ".venv")) + ")" + re.escape(ROOT)
)


@dataclass
class Result:
    code: int | None  # None: timed out
    out: str
    err: str
    seconds: float


@dataclass
class Case:
    """One case: `run(ctx)` does it (usually ctx.train(...): one subprocess) and returns its
    Result; `expect` is "error" (exit 2, one error line) or "ok" (exit 0); `says` the texts the
    error line (error) or the output (ok: warnings) must hold; `check(ctx, result)` returns a
    problem ("lost: ..." for a lost run, anything else is a silent wrong result) or None."""

    name: str
    kind: str  # the class of fault: run lost, full disk, resume, replay, bad input, ...
    run: Callable[[Ctx], Result]
    expect: str = "ok"
    says: tuple[str, ...] = ()
    check: Callable[[Ctx, Result], str | None] | None = None
    needs: str | None = None  # "root": mounts a tmpfs


@dataclass
class Ctx:
    """A case's own directory and the campaign's shared things."""

    dir: str
    base: str  # the base run (steps 1-4, checkpoints step_2 and step_4)
    cache: str  # the W cache every run shares
    reference: list[dict]  # the base run's metrics (the uninterrupted run)
    mounts: list[str] = field(default_factory=list)

    @property
    def out(self) -> str:
        return os.path.join(self.dir, "run")

    def env(self, **extra) -> dict:
        env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
        env.update(TOKENIZERS_PARALLELISM="false", WANDB_MODE="offline", WANDB_SILENT="true")
        env.update(extra)
        return env

    def tiny(self, *args: str, out: str | None = None) -> list[str]:
        return [
            "--preset",
            "tiny",
            "--out-dir",
            out or self.out,
            "--projection-cache",
            self.cache,
            "--num-workers",
            "0",
            *args,
        ]

    def command(self, argv: list[str], timeout: float = 240, env: dict | None = None) -> Result:
        started = time.time()
        process = subprocess.Popen(
            argv,
            cwd=self.dir,
            env=env or self.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            out, err = process.communicate(timeout=timeout)
            return Result(process.returncode, out, err, time.time() - started)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            out, err = process.communicate()
            return Result(None, out, err, time.time() - started)

    def train(self, *args: str, out: str | None = None, **kw) -> Result:
        return self.command([PY, os.path.join(ROOT, "train.py"), *self.tiny(*args, out=out)], **kw)

    def torchrun(self, n: int, *args: str, **kw) -> Result:
        runner = [PY, "-m", "torch.distributed.run", f"--nproc_per_node={n}", "--master_port=29577"]
        return self.command([*runner, os.path.join(ROOT, "train.py"), *self.tiny(*args)], **kw)

    def curves(self, *args: str) -> Result:
        return self.command([PY, os.path.join(ROOT, "curves.py"), *args], timeout=120)

    def prepared(self, name: str, make: Callable[[Ctx], None]) -> None:
        """self.out as make(ctx) leaves a ctx's out: made once per campaign, then copied."""
        made = Ctx(os.path.join(os.path.dirname(self.dir), "prepared", name), *self.shared())
        if not os.path.isdir(made.out):
            shutil.rmtree(made.dir, ignore_errors=True)
            os.makedirs(made.dir)
            make(made)
        shutil.copytree(made.out, self.out, symlinks=True)

    def shared(self) -> tuple:
        return self.base, self.cache, self.reference

    def interrupted(self, at: str | None = None) -> str:
        """A copy of the base run cut back to step 2 (step_4 and metrics' lines 3-4 gone): a run
        interrupted after its checkpoint step_2. Returns its directory."""
        out = at or self.out
        shutil.copytree(self.base, out)
        shutil.rmtree(os.path.join(out, "step_4"))
        lines = open(os.path.join(out, "metrics.jsonl")).readlines()[:2]
        open(os.path.join(out, "metrics.jsonl"), "w").writelines(lines)
        return out

    def tmpfs(self, size: str) -> str:
        """A new directory on a tmpfs of `size` (a disk that fills)."""
        path = os.path.join(self.dir, f"disk-{len(self.mounts)}")
        os.makedirs(path)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path], check=True)
        self.mounts.append(path)
        return path


# ----------------------------------------------------------------------------- checks


def metrics(out_dir: str) -> list[dict]:
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def same_as_reference(c: Ctx, out: str | None = None, steps=(3, 4)) -> str | None:
    """The run's records of `steps` equal the uninterrupted run's to 1e-6; steps 1..N in order."""
    got = {r["step"]: r for r in metrics(out or c.out)}
    if sorted(got) != list(range(1, max(got) + 1)):
        return f"metrics.jsonl's steps are {sorted(got)}"
    for step in steps:
        want = c.reference[step - 1]
        for key in ("loss", "ce", "kd"):
            if abs(got[step][key] - want[key]) > 1e-6 * max(1.0, abs(want[key])):
                return f"step {step} {key} {got[step][key]} != the uninterrupted {want[key]}"
    return None


def checkpoint_intact(path: str) -> str | None:
    import run_dir

    problem = run_dir.checkpoint_problem(path) if os.path.isdir(path) else "it is gone"
    return f"lost: {path}: {problem}" if problem else None


def no_temp(out: str) -> str | None:
    left = glob.glob(os.path.join(out, ".tmp_step_*"))
    return f"left behind: {left}" if left else None


def first(*checks) -> str | None:
    return next((p for p in checks if p), None)


def classify(case: Case, result: Result, problem: str | None) -> str:
    if result.code is None:
        return "hang"
    if "Traceback (most recent call last)" in result.err and REPO_FRAME.search(result.err):
        return "traceback"
    if problem and problem.startswith("lost"):
        return "lost run"
    if case.expect == "error":
        if result.code == 0:
            return "silent wrong"  # it went on where it had to stop
        errors = [line for line in result.err.splitlines() if ERROR_LINE.match(line)]
        if result.code not in (1, 2) or len(set(errors)) != 1:
            return "unclear"  # (torchrun exits 1 when its ranks exit 2)
        if not all(s in errors[0] for s in case.says):
            return "unclear"
    else:
        if result.code != 0:
            return "unclear"
        if not all(s in result.out + result.err for s in case.says):
            return "silent wrong"  # a warning it owed is missing
    return "silent wrong" if problem else "handled"


# ----------------------------------------------------------------------------- the cases


def base_cases() -> list[Case]:
    """This file's cases: the run directory, checkpoints, full disks, resumes, replays, trackers,
    curves, config files, two processes, the fused head."""
    cases: list[Case] = []

    def case(name, kind, run, expect="ok", says=(), check=None, needs=None):
        cases.append(Case(name, kind, run, expect, tuple(says), check, needs))

    # ---- runs lost: --overwrite moves the old run aside and deletes it only at a new checkpoint
    def dead_overwrite(c: Ctx) -> None:
        """The base run, overwritten by a run that died before its first checkpoint."""

        def make(c: Ctx) -> None:
            c.interrupted()
            r = c.train("--overwrite", "--max-steps", "1", "--save-every", "0", "--seed", "5")
            assert r.code == 0, r.err[-2000:]

        c.prepared("dead overwrite", make)

    def aside_intact(c: Ctx, r: Result) -> str | None:
        return checkpoint_intact(os.path.join(c.out, ".overwritten", "step_2"))

    def then(setup, *args, **kw):
        def run(c: Ctx) -> Result:
            setup(c)
            return c.train(*args, **kw)

        return run

    no_ckpt = ("--overwrite", "--max-steps", "1", "--save-every", "0")
    case(
        "overwrite after a dead overwrite keeps the original",
        "run lost",
        then(dead_overwrite, *no_ckpt),
        says=["beside the run an earlier --overwrite"],
        check=aside_intact,
    )
    case(
        "resume after a dead overwrite says where the run is",
        "run lost",
        then(dead_overwrite, "--resume", "--seed", "5"),
        "error",
        [".overwritten"],
        aside_intact,
    )
    case(
        "plain start after a dead overwrite is refused",
        "run lost",
        then(dead_overwrite, "--seed", "5"),
        "error",
        ["--overwrite"],
        aside_intact,
    )

    def overwrite_finishes(c: Ctx, r: Result) -> str | None:
        gone = os.path.exists(os.path.join(c.out, ".overwritten"))
        return "the old run was not deleted at the first checkpoint" if gone else None

    def interrupted(c: Ctx) -> None:
        c.interrupted()

    case(
        "overwrite then a checkpoint deletes the old run",
        "run lost",
        then(interrupted, "--overwrite", "--max-steps", "1", "--save-every", "1"),
        check=overwrite_finishes,
    )
    case(
        "overwrite with a typo in --data moves nothing",
        "run lost",
        then(interrupted, "--overwrite", "--data", "no/such/file.jsonl"),
        "error",
        ["no such file"],
        lambda c, r: checkpoint_intact(os.path.join(c.out, "step_2")),
    )

    def killed_overwrite(c: Ctx) -> Result:
        c.interrupted()
        argv = [
            PY,
            os.path.join(ROOT, "train.py"),
            *c.tiny("--overwrite", "--max-steps", "50", "--save-every", "100"),
        ]
        process = subprocess.Popen(
            argv, cwd=c.dir, env=c.env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        started = os.path.join(c.out, ".overwritten", "step_2")  # moved aside: it has started
        wait_for(
            lambda: os.path.isdir(started) and os.path.exists(f"{c.out}/metrics.jsonl"), process
        )
        process.kill()  # SIGKILL before its first checkpoint: the lock is left behind
        process.wait()
        return c.train("--overwrite", *no_ckpt[1:])

    case(
        "overwrite SIGKILLed, then overwrite again",
        "run lost",
        killed_overwrite,
        says=["stale lock"],
        check=aside_intact,
    )

    def killed_mid_save(c: Ctx) -> Result:
        c.interrupted()
        argv = [
            PY,
            os.path.join(ROOT, "train.py"),
            *c.tiny("--resume", "--max-steps", "4", "--save-every", "1"),
        ]
        process = subprocess.Popen(
            argv, cwd=c.dir, env=c.env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_for(lambda: glob.glob(os.path.join(c.out, ".tmp_step_3", "*")), process, poll=0.02)
        process.kill()
        process.wait()
        return c.train("--resume", "--max-steps", "4", "--save-every", "1")

    case(
        "SIGKILL mid-save, then resume",
        "run lost",
        killed_mid_save,
        check=lambda c, r: first(same_as_reference(c), no_temp(c.out)),
    )

    def sigterm_twice(c: Ctx) -> Result:
        c.interrupted()
        argv = [
            PY,
            os.path.join(ROOT, "train.py"),
            *c.tiny("--resume", "--max-steps", "4", "--save-every", "100"),
        ]
        process = subprocess.Popen(
            argv,
            cwd=c.dir,
            env=c.env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        wait_for(lambda: len(open(os.path.join(c.out, "metrics.jsonl")).readlines()) >= 3, process)
        process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        process.send_signal(signal.SIGTERM)  # the second one stops at once
        process.wait()
        return c.train("--resume", "--max-steps", "4", "--save-every", "100")

    case(
        "SIGTERM twice, then resume",
        "run lost",
        sigterm_twice,
        check=lambda c, r: first(same_as_reference(c), no_temp(c.out)),
    )

    def stale_lock(c: Ctx) -> Result:
        c.interrupted()
        dead = subprocess.Popen([PY, "-c", "pass"])
        dead.wait()
        host = os.uname().nodename
        json.dump({"host": host, "pid": dead.pid}, open(os.path.join(c.out, "run.lock"), "w"))
        return c.train("--resume", "--max-steps", "3", "--save-every", "0")

    case(
        "a stale lock is taken over",
        "run lost",
        stale_lock,
        says=["stale lock"],
        check=lambda c, r: same_as_reference(c, steps=(3,)),
    )

    # ---- full disks (a tmpfs that fills)
    def full_disk(size: str, *args: str, prepare=None):
        def run(c: Ctx) -> Result:
            out = os.path.join(c.tmpfs(size), "run")
            if prepare:
                prepare(c, out)
            return c.train(*args, out=out)

        return run

    def on_disk(check):
        return lambda c, r: check(os.path.join(c.mounts[0], "run"))

    case(
        "disk full at the first checkpoint (save_pretrained)",
        "full disk",
        full_disk("10m", "--max-steps", "1", "--save-every", "1"),
        "error",
        ["could not be written", "free on", "step_1"],
        on_disk(no_temp),
        "root",
    )
    case(
        "disk full at the first checkpoint (torch.save)",
        "full disk",
        full_disk("40m", "--max-steps", "1", "--save-every", "1"),
        "error",
        ["could not be written", "free on", "no checkpoint of this run exists yet"],
        on_disk(no_temp),
        "root",
    )

    def second_checkpoint(c: Ctx, out: str) -> None:
        shutil.copytree(c.interrupted(os.path.join(c.dir, "base")), out)

    case(
        "disk full at a later checkpoint keeps the previous one",
        "full disk",
        full_disk(
            "200m", "--resume", "--max-steps", "4", "--save-every", "1", prepare=second_checkpoint
        ),
        "error",
        ["step_3 could not be written", "free on", "latest complete checkpoint is step_2"],
        on_disk(lambda out: first(no_temp(out), checkpoint_intact(os.path.join(out, "step_2")))),
        "root",
    )

    def resume_on_full_disk(c: Ctx) -> Result:
        disk = c.tmpfs("40m")
        out = os.path.join(disk, "run")
        r = c.train("--max-steps", "1", "--save-every", "1", out=out)
        assert r.code == 2, r.err[-2000:]
        return c.train("--resume", "--max-steps", "1", out=out)

    case(
        "resume after a full disk stopped the first checkpoint",
        "full disk",
        resume_on_full_disk,
        "error",
        ["holds no complete checkpoint"],
        None,
        "root",
    )

    def leftover_temp(c: Ctx, out: str) -> None:
        second_checkpoint(c, out)
        filler = os.path.join(out, ".tmp_step_9")  # a killed save's leftovers fill the disk
        os.makedirs(filler)
        subprocess.run(
            ["dd", "if=/dev/zero", f"of={filler}/x", "bs=1M", "count=80"], capture_output=True
        )

    case(
        "a killed save's temp directory is removed at resume",
        "full disk",
        full_disk(
            "300m", "--resume", "--max-steps", "3", "--save-every", "1", prepare=leftover_temp
        ),
        check=on_disk(lambda out: first(no_temp(out), checkpoint_intact(f"{out}/step_3"))),
        needs="root",
    )

    def fills_while_logging(c: Ctx) -> Result:
        disk = c.tmpfs("2m")
        out = os.path.join(disk, "run")
        # a run of 20 steps without checkpoints whose disk fills after step 1 (metrics.jsonl's
        # appends fail once they need a new page, ~step 9) and is freed once train.py has said
        # so: the records in between must not be lost
        argv = [
            PY,
            os.path.join(ROOT, "train.py"),
            *c.tiny("--max-steps", "20", "--save-every", "0", out=out),
        ]
        process = subprocess.Popen(
            argv, cwd=c.dir, env=c.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        err: list[str] = []
        reader = threading.Thread(target=lambda: err.extend(process.stderr), daemon=True)
        reader.start()
        path, filler = os.path.join(out, "metrics.jsonl"), os.path.join(disk, "filler")
        try:
            wait_for(lambda: os.path.exists(path) and os.path.getsize(path) > 0, process)
            subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=4k"], capture_output=True)
            wait_for(lambda: any("cannot append to" in line for line in err), process, limit=120)
        finally:
            if os.path.exists(filler):
                os.remove(filler)
        out_text = process.stdout.read()
        process.wait(timeout=300)
        reader.join(timeout=10)
        return Result(process.returncode, out_text, "".join(err), 0.0)

    def all_steps(c: Ctx, r: Result) -> str | None:
        steps = [x["step"] for x in metrics(os.path.join(c.mounts[0], "run"))]
        return None if steps == list(range(1, 21)) else f"metrics.jsonl holds steps {steps}"

    case(
        "disk fills while metrics.jsonl is appended, then frees",
        "full disk",
        fills_while_logging,
        says=["cannot append to"],
        check=all_steps,
        needs="root",
    )

    def read_only(c: Ctx) -> Result:
        disk = c.tmpfs("300m")
        out = os.path.join(disk, "run")
        shutil.copytree(c.interrupted(os.path.join(c.dir, "base")), out)
        subprocess.run(["mount", "-o", "remount,ro", disk], check=True)
        return c.train("--resume", "--max-steps", "3", out=out)

    case(
        "resume on a read-only file system",
        "full disk",
        read_only,
        "error",
        ["not writable"],
        None,
        "root",
    )

    # ---- resumes that must match the run, or say what differs
    def resume(*args: str, prepare=None):
        def run(c: Ctx) -> Result:
            c.interrupted()
            if prepare:
                prepare(c)
            return c.train("--resume", "--max-steps", "4", "--stop-step", "3", *args)

        return run

    exact = lambda c, r: same_as_reference(c, steps=(3,))  # noqa: E731
    changed = "with another configuration"
    for args, says in [
        (("--seq-len", "32", "--loss", "hkl"), ["--seq-len 32 (the run: --seq-len 64)", "--loss"]),
        (("--text-field", "body"), ["--text-field body (the run: --text-field text)"]),
        (("--seed", "7"), ["--seed 7 (the run: --seed 1337)"]),
        (("--lr", "0.002"), ["--lr 0.002"]),
        (("--num-workers", "2"), ["--num-workers 2 (the run: --num-workers 1"]),
        (("--teacher", "pkg:o200k"), ["--teacher pkg:o200k (the run: --teacher pkg:qwen3)"]),
        (("--no-pack",), ["--no-pack (the run: no --no-pack)"]),
        (("--learn-projection",), ["--learn-projection (the run: no --learn-projection)"]),
        (("--student", "pkg:qwen3"), ["--student pkg:qwen3"]),
        (("--pkl-floor", "add"), ["--pkl-floor add (the run: --pkl-floor clamp)"]),
    ]:
        case(f"resume with {' '.join(args)}", "resume", resume(*args), "error", [changed, *says])
    for args in [("--num-workers", "1"), ("--keep-last", "1", "--log-every", "1"), ()]:
        name = f"resume with {' '.join(args)} (allowed)" if args else "resume, nothing changed"
        case(name, "resume", resume(*args), check=exact)
    case(
        "resume with a longer --max-steps (allowed)",
        "resume",
        resume("--max-steps", "5"),
        check=lambda c, r: None if len(metrics(c.out)) == 3 else "not 3 steps",
    )

    def copied_checkpoint(c: Ctx) -> None:
        os.remove(os.path.join(c.out, "run_config.json"))

    case(
        "copied checkpoint (no run_config.json), other settings",
        "resume",
        resume("--seq-len", "32", "--loss", "hkl", prepare=copied_checkpoint),
        "error",
        ["checkpoint", "--seq-len 32", "--loss hkl"],
    )
    case(
        "copied checkpoint (no run_config.json), same settings",
        "resume",
        resume(prepare=copied_checkpoint),
        check=exact,
    )

    def other_w(c: Ctx) -> None:
        import torch

        (w,) = glob.glob(os.path.join(c.cache, "W-*-128320x151669.pt"))
        projection = torch.load(w, weights_only=True)
        torch.save(projection, os.path.join(c.dir, "W_same.pt"))  # the same W, other bytes
        projection["params"] = {**projection["params"], "rebuilt": True}
        torch.save(projection, os.path.join(c.dir, "W_other.pt"))

    case(
        "resume with another W file",
        "resume",
        resume("--projection", "W_other.pt", prepare=other_w),
        "error",
        ["--projection: teacher pkg:qwen3's W is another"],
    )
    case(
        "resume with the same W saved again (other bytes)",
        "resume",
        resume("--projection", "W_same.pt", prepare=other_w),
        check=exact,
    )

    def corpus(c: Ctx) -> str:
        return os.path.join(c.out, "tiny_corpus")

    def add_file(c: Ctx) -> None:
        open(os.path.join(corpus(c), "more.txt"), "w").write("a document the run never read")

    def grow_file(c: Ctx) -> None:
        with open(os.path.join(corpus(c), "part-000.jsonl"), "a") as f:
            f.write(json.dumps({"text": "one more document"}) + "\n")

    def remove_file(c: Ctx) -> None:
        os.remove(os.path.join(corpus(c), "note.txt"))

    for how, prepare, says in [
        ("gained a file", add_file, "added more.txt"),
        ("grew", grow_file, "changed part-000.jsonl"),
        ("lost a file", remove_file, "removed note.txt"),
    ]:
        case(
            f"resume after the data {how}",
            "resume",
            resume(prepare=prepare),
            "error",
            ["--data: its files changed", says],
        )

    def local_data(c: Ctx) -> None:
        shutil.copytree(corpus(c), os.path.join(c.dir, "docs"))

    case(
        "resume with --data naming a copy of the corpus",
        "resume",
        resume("--data", "docs", prepare=local_data),
        "error",
        ["--data docs (the run: --data OptimalScale/ClimbMix)"],
    )

    def strip_fingerprints(c: Ctx) -> None:
        import torch

        config = json.load(open(os.path.join(c.out, "run_config.json")))
        del config["fingerprint"]
        json.dump(config, open(os.path.join(c.out, "run_config.json"), "w"))
        path = os.path.join(c.out, "step_2", "trainer_state.pt")
        state = torch.load(path, weights_only=True)
        del state["fingerprint"]
        torch.save(state, path)

    case(
        "resume a run older than the fingerprint",
        "resume",
        resume(prepare=strip_fingerprints),
        says=["predates projection_sha256, data_files"],
        check=exact,
    )
    case(
        "resume a run older than the fingerprint, other --seq-len",
        "resume",
        resume("--seq-len", "32", prepare=strip_fingerprints),
        "error",
        ["--seq-len 32 (the run: --seq-len 64)"],
    )

    def garbage(name: str, data: bytes):
        def prepare(c: Ctx) -> None:
            open(os.path.join(c.out, name), "wb").write(data)

        return prepare

    case(
        "resume with trainer_state.pt damaged",
        "bad file",
        resume(prepare=garbage("step_2/trainer_state.pt", b"PK\x03\x04 not a zip")),
        "error",
        [
            "holds no complete checkpoint (1 damaged; step_2: trainer_state.pt is unreadable",
            "--overwrite",
        ],
    )
    case(
        "resume with run_config.json not JSON",
        "bad file",
        resume(prepare=garbage("run_config.json", b"{not json")),
        "error",
        ["run_config.json is not valid JSON"],
    )
    case(
        "resume with run_config.json a list",
        "bad file",
        resume(prepare=garbage("run_config.json", b"[]")),
        "error",
        ["is not a train.py run_config.json"],
    )
    case(
        "resume with run_config.json not UTF-8",
        "bad file",
        resume(prepare=garbage("run_config.json", b'{"args": "caf\xe9"}')),
        "error",
        ["run_config.json is not valid JSON"],
    )

    def damaged_metrics(c: Ctx) -> None:
        lines = open(os.path.join(c.out, "metrics.jsonl"), "rb").readlines()
        lines.insert(1, b"\xff\xfe garbage\n")
        open(os.path.join(c.out, "metrics.jsonl"), "wb").writelines(lines)

    case(
        "resume with a damaged metrics.jsonl line",
        "bad file",
        resume(prepare=damaged_metrics),
        check=exact,
    )

    def metrics_directory(c: Ctx) -> None:
        os.remove(os.path.join(c.out, "metrics.jsonl"))
        os.makedirs(os.path.join(c.out, "metrics.jsonl"))

    case(
        "resume with metrics.jsonl a directory",
        "bad file",
        resume(prepare=metrics_directory),
        "error",
        ["metrics.jsonl"],
    )

    def two_process_checkpoint(c: Ctx) -> None:
        import torch

        step = os.path.join(c.out, "step_2")
        shutil.copy(os.path.join(step, "rank_0.pt"), os.path.join(step, "rank_1.pt"))
        state = torch.load(os.path.join(step, "trainer_state.pt"), weights_only=True)
        fingerprint = {**json.loads(state["fingerprint"]), "processes": 2}
        state.update(world_size=2, fingerprint=json.dumps(fingerprint))
        torch.save(state, os.path.join(step, "trainer_state.pt"))
        os.remove(os.path.join(c.out, "run_config.json"))

    case(
        "resume a 2-process checkpoint with 1 process",
        "two processes",
        resume(prepare=two_process_checkpoint),
        "error",
        ["1 process (the run: 2;", "--nproc_per_node"],
    )

    def torchrun_resume(*args: str):
        def run(c: Ctx) -> Result:
            c.interrupted()
            return c.torchrun(2, "--resume", "--max-steps", "4", *args, timeout=300)

        return run

    case(
        "resume a 1-process checkpoint with 2 processes",
        "two processes",
        torchrun_resume(),
        "error",
        ["2 processes (the run: 1;"],
    )
    case(
        "two processes, --resume and --overwrite",
        "two processes",
        torchrun_resume("--overwrite"),
        "error",
        ["--resume and --overwrite together"],
    )
    case(
        "two processes, resume with a changed --seq-len",
        "two processes",
        torchrun_resume("--seq-len", "32"),
        "error",
        ["--seq-len 32"],
    )

    def fsdp_resume(c: Ctx) -> Result:
        c.interrupted()
        return c.torchrun(1, "--resume", "--max-steps", "4", "--fsdp", timeout=300)

    case(
        "resume a DDP checkpoint with --fsdp",
        "resume",
        fsdp_resume,
        "error",
        ["written without --fsdp: drop --fsdp"],
    )

    def concurrent(c: Ctx) -> Result:
        argv = [
            PY,
            os.path.join(ROOT, "train.py"),
            *c.tiny("--max-steps", "3", "--save-every", "3"),
        ]
        first_run = subprocess.Popen(
            argv,
            cwd=c.dir,
            env=c.env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        wait_for(lambda: os.path.exists(os.path.join(c.out, "run.lock")), first_run)
        second = c.train("--max-steps", "3", "--save-every", "3")
        first_run.communicate(timeout=300)
        if first_run.returncode != 0:
            second.err += f"\n(the first run exited {first_run.returncode})"
        return second

    case(
        "a second run in the same directory while the first runs",
        "two processes",
        concurrent,
        "error",
        ["is in use by the run of pid"],
        lambda c, r: None if len(metrics(c.out)) == 3 else "the first run was disturbed",
    )

    # ---- replaying a run from its run_config.json
    def replay(*args: str, tracked=False):
        def run(c: Ctx) -> Result:  # (--out-dir always: the config names the base run's)
            c.interrupted()
            if tracked:  # a run_config.json of a run with a tracker
                config = json.load(open(os.path.join(c.out, "run_config.json")))
                config["args"]["report_to"] = ["tensorboard"]
                json.dump(config, open(os.path.join(c.out, "run_config.json"), "w"))
            config = os.path.join(c.out, "run_config.json")
            return c.command([PY, os.path.join(ROOT, "train.py"), "--config", config, *args])

        return run

    def replayed_step_1(out: str):
        def check(c: Ctx, r: Result) -> str | None:
            got, want = metrics(os.path.join(c.dir, out))[0], c.reference[0]
            return (
                None
                if abs(got["loss"] - want["loss"]) <= 1e-6 * want["loss"]
                else (f"replayed step 1 loss {got['loss']} != {want['loss']}")
            )

        return check

    case(
        "replay a run from its run_config.json",
        "replay",
        replay("--out-dir", "again", "--max-steps", "1"),
        check=replayed_step_1("again"),
    )
    case(
        "replay with --report-to none",
        "replay",
        replay("--out-dir", "again", "--max-steps", "1", "--report-to", "none"),
        check=replayed_step_1("again"),
    )
    case(
        "replay a tracked run's config",
        "replay",
        replay("--out-dir", "again", "--max-steps", "1", tracked=True),
        check=lambda c, r: None if os.path.isdir(f"{c.dir}/again/tensorboard") else "no events",
    )
    case(
        "replay in place with --resume",
        "replay",
        replay("--out-dir", "run", "--resume", "--max-steps", "4"),
        check=exact,
    )
    case(
        "replay in place without --resume",
        "replay",
        replay("--out-dir", "run", "--max-steps", "4"),
        "error",
        ["pass --resume to continue it or --overwrite"],
    )

    # ---- bad input: config files, flags, trackers, curves
    def config_file(text: bytes, *args: str, **env):
        def run(c: Ctx) -> Result:
            open(os.path.join(c.dir, "c.yaml"), "wb").write(text)
            argv = [PY, os.path.join(ROOT, "train.py"), "--config", "c.yaml", *c.tiny(*args)]
            return c.command(argv, env=c.env(**env))

        return run

    case(
        "config file not UTF-8",
        "bad input",
        config_file(b"run-name: caf\xe9\n"),
        "error",
        ["is not UTF-8 text (byte 0xe9 at offset 13)"],
    )
    case(
        "config file empty",
        "bad input",
        config_file(b""),
        "error",
        ["must map flag names to values"],
    )
    case(
        "config file is a directory",
        "bad input",
        lambda c: c.train("--config", ROOT),
        "error",
        ["Is a directory"],
    )
    case(
        "config: seq-len: true",
        "bad input",
        config_file(b"seq-len: true\n"),
        "error",
        ["--seq-len: invalid int value"],
    )
    case(
        "config: teacher is a mapping",
        "bad input",
        config_file(b"teacher: {a: 1}\n"),
        "error",
        ["teacher"],
    )

    def home_run(c: Ctx) -> Result:
        home = os.path.join(c.dir, "home")
        os.makedirs(home)
        text = f"out-dir: ~/runs/x\nmax-steps: 1\nsave-every: 0\nprojection-cache: {c.cache}\n"
        open(os.path.join(c.dir, "c.yaml"), "w").write(text)
        argv = [
            PY,
            os.path.join(ROOT, "train.py"),
            "--config",
            "c.yaml",
            "--preset",
            "tiny",
            "--num-workers",
            "0",
        ]
        return c.command(argv, env=c.env(HOME=home))

    case(
        "config: out-dir: ~/runs/x",
        "bad input",
        home_run,
        check=lambda c, r: (
            None
            if os.path.exists(f"{c.dir}/home/runs/x/metrics.jsonl")
            and not os.path.exists(f"{c.dir}/~")
            else "not under $HOME"
        ),
    )
    case(
        "--resume --overwrite",
        "bad input",
        lambda c: (c.interrupted(), c.train("--resume", "--overwrite"))[1],
        "error",
        ["--resume and --overwrite together"],
        lambda c, r: checkpoint_intact(os.path.join(c.out, "step_2")),
    )
    case(
        "--resume in an empty directory",
        "bad input",
        lambda c: c.train("--resume"),
        "error",
        ["holds no complete checkpoint: drop --resume"],
    )
    case(
        "--out-dir under a file",
        "bad input",
        lambda c: (open(f"{c.dir}/f", "w").close(), c.train(out=f"{c.dir}/f/run"))[1],
        "error",
        ["Not a directory"],
    )
    case(
        "--projection is a directory",
        "bad input",
        lambda c: c.train("--projection", c.cache),
        "error",
        ["is a directory"],
    )

    def no_wandb_login(c: Ctx) -> Result:
        home = os.path.join(c.dir, "home")
        os.makedirs(home)
        env = {k: v for k, v in c.env(HOME=home).items() if not k.startswith("WANDB")}
        return c.command(
            [
                PY,
                os.path.join(ROOT, "train.py"),
                *c.tiny("--report-to", "wandb", "--max-steps", "2", "--save-every", "0"),
            ],
            env=env,
        )

    case(
        "--report-to wandb without a login or network",
        "bad input",
        no_wandb_login,
        says=["--report-to wandb could not start"],
        check=lambda c, r: None if len(metrics(c.out)) == 2 else "steps missing",
    )

    def metrics_file(data: bytes, *args: str):
        def run(c: Ctx) -> Result:
            os.makedirs(c.out)
            open(os.path.join(c.out, "metrics.jsonl"), "wb").write(data)
            return c.curves(c.out, *args)

        return run

    good = b"".join(json.dumps({"step": s, "loss": 1.0 / s}).encode() + b"\n" for s in (1, 2, 3))
    case(
        "curves.py on malformed metrics lines",
        "bad input",
        metrics_file(good + b'[1]\n{"loss": 2}\n{"step": "x"}\n{"step": 4, "skipped": "a"}\n'),
        says=["3 line(s) not a step's record"],
        check=lambda c, r: None if os.path.exists(f"{c.out}/curves.png") else "no curves.png",
    )
    case(
        "curves.py on binary garbage",
        "bad input",
        metrics_file(b"\x00\xff" * 100),
        "error",
        ["holds no step yet"],
    )
    case(
        "curves.py --out into a directory",
        "bad input",
        metrics_file(good, "--out", "/tmp"),
        "error",
        ["is a directory"],
    )
    case(
        "curves.py on a missing run",
        "bad input",
        lambda c: c.curves("nowhere"),
        "error",
        ["does not exist"],
    )

    # ---- the fused head and a model that scales its logits (Falcon-H1's lm_head_multiplier)
    def falcon(*args: str):
        def run(c: Ctx) -> Result:
            from transformers import FalconH1Config, FalconH1ForCausalLM
            from transformers.utils import logging as hf_logging

            from tokens import load_tokenizer

            tok = load_tokenizer("pkg:llama-3.2")
            config = FalconH1Config(
                vocab_size=128320,
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=1,
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=16,
                mamba_d_ssm=64,
                mamba_n_heads=4,
                mamba_d_head=16,
                mamba_d_state=16,
                mamba_chunk_size=16,
                lm_head_multiplier=0.9,
                tie_word_embeddings=True,
            )
            hf_logging.disable_progress_bar()
            student = os.path.join(c.dir, "falcon")
            FalconH1ForCausalLM(config).save_pretrained(student)
            tok.save_pretrained(student)
            return c.train(
                "--student", student, "--loss", "ce", "--max-steps", "1", "--save-every", "0", *args
            )

        return run

    case(
        "a student with lm_head_multiplier 0.9, fused head",
        "numerics",
        falcon(),
        "error",
        ["--fused-head", "differ by 0.1", "--no-fused-head"],
    )
    case(
        "a student with lm_head_multiplier 0.9, --no-fused-head",
        "numerics",
        falcon("--no-fused-head"),
        check=lambda c, r: None if len(metrics(c.out)) == 1 else "no step",
    )
    return cases


def wait_for(ready: Callable[[], object], process, limit: float = 240, poll: float = 0.2) -> None:
    deadline = time.time() + limit
    while time.time() < deadline and process.poll() is None:
        try:
            if ready():
                return
        except OSError:
            pass
        time.sleep(poll)
    raise RuntimeError(f"the condition never held (process exit {process.poll()})")


def all_cases() -> list[Case]:
    """This file's cases, then bench/campaign_cases_inputs.py's CASES if that file exists."""
    cases = base_cases()
    extra = os.path.join(os.path.dirname(os.path.abspath(__file__)), "campaign_cases_inputs.py")
    if os.path.exists(extra):
        spec = importlib.util.spec_from_file_location("campaign_cases_inputs", extra)
        module = importlib.util.module_from_spec(spec)
        sys.modules["campaign_cases_inputs"] = module
        spec.loader.exec_module(module)
        cases += list(module.CASES)
    return cases


# ----------------------------------------------------------------------------- running


def can_mount() -> bool:
    if os.geteuid() != 0:
        return False
    with tempfile.TemporaryDirectory() as probe:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", probe], capture_output=True
        )
        if done.returncode == 0:
            subprocess.run(["umount", probe], check=True)
        return done.returncode == 0


def make_base(work: str) -> tuple[str, str, list[dict]]:
    cache, base = os.path.join(work, "cache"), os.path.join(work, "base", "run")
    if os.path.isdir(os.path.join(base, "step_4")):  # --work of an earlier campaign: reused
        return base, cache, metrics(base)
    ctx = Ctx(os.path.join(work, "base"), base, cache, [])
    shutil.rmtree(ctx.dir, ignore_errors=True)
    os.makedirs(ctx.dir)
    done = ctx.train("--max-steps", "4", "--save-every", "2", out=base, timeout=900)
    if done.code != 0:
        sys.exit(f"the base run failed:\n{done.err[-3000:]}")
    return base, cache, metrics(base)


def run_case(case: Case, work: str, base: str, cache: str, reference, mount: bool) -> dict:
    c = Ctx(os.path.join(work, re.sub(r"[^\w.-]+", "_", case.name)[:80]), base, cache, reference)
    shutil.rmtree(c.dir, ignore_errors=True)
    os.makedirs(c.dir)
    if case.needs == "root" and not mount:
        return {"outcome": "skipped", "why": "needs root to mount a tmpfs", "seconds": 0.0}
    started = time.time()
    try:
        result = case.run(c)
        problem = case.check(c, result) if case.check else None
    except Exception as e:  # the campaign's own setup failed: report it, do not hide it
        result, problem = Result(-1, "", f"campaign setup: {type(e).__name__}: {e}", 0.0), None
    finally:
        for path in reversed(c.mounts):
            subprocess.run(["umount", "-l", path], capture_output=True)
    outcome = classify(case, result, problem)
    lines = [x for x in result.err.splitlines() if ERROR_LINE.match(x) or x.startswith("warning:")]
    why = problem or next(iter(lines or result.err.strip().splitlines()[-1:]), "")
    return {"outcome": outcome, "why": str(why)[:300], "seconds": time.time() - started}


def table(cases: list[Case], results: list[dict]) -> str:
    kinds = list(dict.fromkeys(c.kind for c in cases))
    head = ["class", "cases", *CLASSES]
    rows = [f"| {' | '.join(head)} |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for kind in [*kinds, "all"]:
        mine = [r for c, r in zip(cases, results) if kind in ("all", c.kind)]
        counts = [sum(r["outcome"] == k for r in mine) for k in CLASSES]
        label = f"**{kind}**" if kind == "all" else kind
        rows.append(f"| {label} | {len(mine)} | {' | '.join(map(str, counts))} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="run the cases whose name or class contains this")
    parser.add_argument("--list", action="store_true", help="list the cases, run nothing")
    parser.add_argument(
        "--work",
        help="where the cases run (default: a temp directory; an earlier one's base run is reused)",
    )
    parser.add_argument("--json", help="write every case's outcome to this file")
    args = parser.parse_args(argv)
    cases = [c for c in all_cases() if not args.only or args.only in f"{c.name} {c.kind}"]
    if args.list:
        for c in cases:
            print(f"{c.kind:14} {c.expect:5} {c.name}")
        return 0
    work = args.work or tempfile.mkdtemp(prefix="xtoken-campaign-")
    mount = can_mount()
    started = time.time()
    base, cache, reference = make_base(work)
    print(f"base run: {time.time() - started:.0f} s", flush=True)
    results = []
    for case in cases:
        results.append(run_case(case, work, base, cache, reference, mount))
        r = results[-1]
        print(
            f"{r['outcome']:12} {r['seconds']:5.0f} s  {case.kind}: {case.name}  [{r['why']}]",
            flush=True,
        )
    when = datetime.date.today().isoformat()
    print(
        f"\n{len(cases)} cases in {(time.time() - started) / 60:.1f} min on {platform.node()}, "
        f"{os.cpu_count()} CPUs, {when}\n"
    )
    print(table(cases, results))
    if args.json:
        rows = [
            {"name": c.name, "class": c.kind, "expect": c.expect, **r}
            for c, r in zip(cases, results)
        ]
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    bad = [r for r in results if r["outcome"] not in ("handled", "skipped")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
