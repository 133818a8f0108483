"""One GPU check: every GPU figure README lacks, in one command that ends within 8 minutes.

    python bench/gpu_check.py                        # one H100/H200, after `make venv`
    python bench/gpu_check.py --smoke --out /tmp/gc  # CPU plumbing check: tiny shapes, 2 steps

Writes bench/results/gpu_check.json and bench/results/gpu_check.md (--smoke:
bench/results/gpu_check_smoke.*; --out PREFIX writes PREFIX.json and PREFIX.md), rewritten after
every case, so that a window that closes early still leaves what was measured.

train.py is driven through its command line only (one subprocess per case, `--preset
shapes-1b-4b`: random Llama-3.2-1B student and Qwen3-4B teacher shapes, the real tokenizers, the
preset's generated corpus, 2 x 2,048 tokens a micro-step, 3 micro-steps a step) and read through
its metrics.jsonl: step time = tokens / tokens_per_s of each logged step, the median after the
warm-up steps; peak memory = the largest peak_mem_gb. The parts, in order, each with a share of
--budget (480 s; the shares are PARTS):

1. teacher-forward (45 s): a subprocess of this script builds the teachers as the preset does
   (Qwen3-4B shape; Llama-3.2-1B shape for KL) in bf16 and times their forward on the teacher
   windows train.py's data pipeline makes from the same corpus (data.py), one micro-batch at a
   time, CUDA-synchronised; x grad-accum = the teacher's forward time in a step. It also records
   the card, CUDA and library versions and the models' parameter counts.
2. base (165 s): ce, pkl, hkl, gold, kl with the fused head, eager: tokens/s, step time, peak.
3. teacher-cache (35 s): a cached-teacher P-KL step, when train.py --help lists --teacher-cache
   (until then: 'not available'). The flag's use is a guess: two runs sharing one cache
   directory, the second one measured.
4. no-fused-head (55 s): the same losses with --no-fused-head (pkl, ce first).
5. batch-search (60 s): the largest micro-batch that fits, doubling from the preset's 2 with
   --grad-accum 1 and 2 steps a size, until train.py reports CUDA out of memory (pkl first).
6. compile (80 s): --compile (pkl first); the first 3 steps (compilation) are dropped.
7. fsdp (30 s): torchrun --nproc_per_node=1 train.py --fsdp, pkl: whether it runs at these shapes,
   and its step on one GPU.

Three sweeps: each part's PRIMARY cases within its share (a part may use what the parts before it
left), then the primary cases still waiting, then the others, both in whatever time is left. A
case that cannot start with 20 s left waits; one that runs past its part's end is killed (the
steps it logged still count). At the deadline what there is is written and the exit status is 0.

Derived: KD step / (CE step + teacher forward), goal <= 1.25, for each KD loss (base cases); MFU =
(6 x student parameters x student tokens + 2 x teacher parameters x teacher tokens) per step /
step time / the card's dense bf16 peak (attention's own FLOPs are left out: MFU is a lower bound;
an unknown card gets none). Every case ends as ok, failed (the error line), skipped (budget, or
smoke) or not available. --smoke runs the same code on CPU with --preset tiny, 2 steps a case,
fewer cases (the others 'skipped (smoke)'); tests/test_gpu_check.py runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TRAIN = os.path.join(ROOT, "train.py")
RESULTS = os.path.join(HERE, "results")

LOSSES = ("ce", "pkl", "hkl", "gold", "kl")
GOAL_RATIO = 1.25
# Dense bf16 peak (no sparsity), TFLOP/s, by a piece of torch.cuda.get_device_name(): the first
# that matches wins (H100 PCIe and NVL before the SXM part's plain "H100").
PEAK_BF16_TFLOPS = (
    ("H200", 989.0),
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("A100", 312.0),
)
# The teachers: (tokenizer, model architecture) per teacher name; KL's teacher shares the student's
# tokenizer and, under the presets, gets the student's shape.
TEACHERS = {"qwen3": ("pkg:qwen3", "qwen3"), "llama-3.2": ("pkg:llama-3.2", "llama")}
STUDENT_TOKENIZER = "pkg:llama-3.2"


def teacher_of(loss: str) -> str | None:
    return None if loss == "ce" else "llama-3.2" if loss == "kl" else "qwen3"


# What each mode runs. Shares are seconds of a 480-s budget (scaled to --budget).
MODES = {
    "gpu": dict(
        preset="shapes-1b-4b", student_shape="llama-3.2-1b", teacher_shape="qwen3-4b",
        seq_len=2048, batch_size=2, grad_accum=3, steps=5, warmup=2, num_workers=4,
        search_steps=2, search_max=64, compile_steps=6, compile_warmup=3, min_case_s=20.0,
        teacher_micro_batches=6, smoke_cases=None,
    ),
    "smoke": dict(
        preset="tiny", student_shape="tiny", teacher_shape="tiny",
        seq_len=64, batch_size=2, grad_accum=1, steps=2, warmup=1, num_workers=0,
        search_steps=2, search_max=4, compile_steps=2, compile_warmup=1, min_case_s=0.0,
        teacher_micro_batches=2,
        # the cases run on CPU (one of each way of starting a run); the skipped ones differ from
        # them by flags that train.py --help must list (train_flags_missing), and the batch
        # search's loop is tested apart
        smoke_cases={
            "teacher-forward/qwen3", "teacher-forward/llama-3.2", "base/ce", "base/pkl",
            "fsdp/pkl", "teacher-cache/pkl",
        },
    ),
}  # fmt: skip
PARTS = (
    ("teacher-forward", 45),
    ("base", 165),
    ("teacher-cache", 35),
    ("no-fused-head", 55),
    ("batch-search", 60),
    ("compile", 80),
    ("fsdp", 30),
)
# The cases of each part that run first (all of teacher-forward's and base's): the others only
# in the time the parts leave at the end.
PRIMARY = {
    "teacher-cache": ("pkl",),
    "no-fused-head": ("pkl", "ce"),
    "batch-search": ("pkl",),
    "compile": ("pkl",),
    "fsdp": ("pkl",),
}
BUDGET_S = 480.0
# Every flag and choice of train.py this script uses: each must be in train.py --help.
TRAIN_FLAGS = (
    "--preset", "--loss", "--teacher", "--data", "--seq-len", "--batch-size", "--grad-accum",
    "--max-steps", "--num-workers", "--projection-cache", "--out-dir", "--overwrite",
    "--log-every", "--save-every", "--fused-head", "--no-fused-head", "--compile", "--fsdp",
    *LOSSES, "shapes-1b-4b", "tiny",
)  # fmt: skip
RESERVE_S = 10.0  # left at the end for writing the results


class Stop(Exception):
    """SIGTERM/SIGINT: kill the running case, write what there is, exit 0."""


# ----------------------------------------------------------------------------- the plan


def plan_cases() -> list[dict]:
    """Every case, in the order of its part; each starts 'pending'. PRIMARY cases run first."""
    order = ("pkl", "ce", "gold", "hkl", "kl")  # the parts beyond base: most wanted first
    cases = [new_case("teacher-forward", t, None) for t in TEACHERS]
    cases += [new_case("base", loss, loss) for loss in LOSSES]
    cases.append(new_case("teacher-cache", "pkl", "pkl"))
    for part in ("no-fused-head", "batch-search", "compile"):
        cases += [new_case(part, loss, loss) for loss in order]
    cases.append(new_case("fsdp", "pkl", "pkl"))
    return cases


def new_case(part: str, name: str, loss: str | None) -> dict:
    primary = part in ("teacher-forward", "base") or name in PRIMARY.get(part, ())
    return {
        "id": f"{part}/{name}",
        "part": part,
        "loss": loss,
        "primary": primary,
        "status": "pending",
    }


def train_flags(mode: dict, loss: str, corpus: str | None, cache: str, out_dir: str) -> list[str]:
    """train.py's command line for one case, before the case's own flags."""
    flags = ["--preset", mode["preset"], "--loss", loss]
    if loss == "kl":  # a same-tokenizer teacher; under the presets it gets the student's shape
        flags = ["--preset", mode["preset"], "--teacher", STUDENT_TOKENIZER, "--loss", "kl"]
    if corpus:
        flags += ["--data", corpus]
    return flags + [
        "--seq-len", str(mode["seq_len"]), "--batch-size", str(mode["batch_size"]),
        "--grad-accum", str(mode["grad_accum"]), "--max-steps", str(mode["steps"]),
        "--num-workers", str(mode["num_workers"]), "--projection-cache", cache,
        "--out-dir", out_dir, "--overwrite", "--log-every", "1", "--save-every", "0",
    ]  # fmt: skip


def with_flag(flags: list[str], name: str, value) -> list[str]:
    """flags with `name value` replaced (argparse keeps the last: appended)."""
    return [*flags, name, str(value)]


# ----------------------------------------------------------------------------- running train.py


def last_error_line(text: str) -> str:
    """The line that says why a run failed: the last exception or 'error:' line, else the last
    non-empty line (tqdm's carriage returns split lines too)."""
    lines = [x.strip() for x in re.split(r"[\r\n]+", text) if x.strip()]
    pattern = re.compile(r"^([\w.]*(Error|Exception)\b|error:|RuntimeError|torch\.)")
    for line in reversed(lines):
        if pattern.match(line):
            return line[:400]
    return lines[-1][:400] if lines else ""


def is_oom(text: str) -> bool:
    return "out of memory" in text.lower()


def read_metrics(path: str) -> list[dict]:
    """metrics.jsonl's records (a line cut by a kill is skipped)."""
    records = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict) and "step" in record:
                    records.append(record)
    except OSError:
        pass
    return records


def step_figures(records: list[dict], warmup: int) -> dict | None:
    """Median step time and tokens/s of the steps after `warmup`, the largest peak memory."""
    timed = [
        r
        for r in records
        if r["step"] > warmup and r.get("tokens_per_s") and r.get("tokens", 0) > 0
    ]
    if not timed:
        return None
    peaks = [r["peak_mem_gb"] for r in records if r.get("peak_mem_gb") is not None]
    return {
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
        "step_s": statistics.median(r["tokens"] / r["tokens_per_s"] for r in timed),
        "tokens_per_step": statistics.median(r["tokens"] for r in timed),
        "peak_mem_gb": max(peaks) if peaks else None,
        "steps_measured": len(timed),
        "steps_logged": len(records),
    }


class Runner:
    """Runs one subprocess at a time in its own process group, killed at its deadline or on Stop."""

    def __init__(self, tmp: str, env: dict):
        self.tmp, self.env, self.count = tmp, env, 0

    def run(self, cmd: list[str], timeout: float, name: str) -> dict:
        self.count += 1
        log = os.path.join(self.tmp, f"{self.count:02d}-{name.replace('/', '-')}")
        started = time.monotonic()
        with open(log + ".out", "wb") as out, open(log + ".err", "wb") as err:
            proc = subprocess.Popen(
                cmd, stdout=out, stderr=err, cwd=ROOT, env=self.env, start_new_session=True
            )
            timed_out = False
            try:
                proc.wait(timeout=max(timeout, 0.1))
            except subprocess.TimeoutExpired:
                timed_out = True
                kill_group(proc)
            except BaseException:
                kill_group(proc)
                raise
        with open(log + ".err", encoding="utf-8", errors="replace") as f:
            stderr = f.read()
        return {
            "rc": proc.returncode,
            "timed_out": timed_out,
            "wall_s": time.monotonic() - started,
            "stderr": stderr,
            "stdout_path": log + ".out",
        }


def kill_group(proc: subprocess.Popen) -> None:
    """The case and everything it started (DataLoader workers, torchrun's ranks)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


# ----------------------------------------------------------------------------- the check


class Check:
    def __init__(self, mode_name: str, budget: float, out: str, runner: Runner, tmp: str):
        self.mode_name, self.mode = mode_name, MODES[mode_name]
        self.budget, self.out, self.runner, self.tmp = budget, out, runner, tmp
        self.t0 = time.monotonic()
        self.deadline = self.t0 + max(budget - RESERVE_S * budget / BUDGET_S, 0)
        scale, total = budget / BUDGET_S, 0.0
        self.part_end = {}
        for part, share in PARTS:
            total += share * scale
            self.part_end[part] = min(self.t0 + total, self.deadline)
        self.by_part = True  # left(): to the part's end (the first sweep) or to the deadline
        self.cache = os.path.join(tmp, "projection-cache")
        self.corpus = os.path.join(tmp, "corpus")
        self.cases = plan_cases()
        self.worker: dict = {}
        self.help_text: str | None = None
        self.report = {
            "check": "bench/gpu_check.py",
            "mode": mode_name,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "budget_s": budget,
            "settings": {k: v for k, v in self.mode.items() if k != "smoke_cases"},
            "environment": host_environment(),
            "cases": self.cases,
            "ratios": [],
            "finished": False,
        }

    # -- time

    def left(self, part: str) -> float:
        """Seconds the part has left: to its own end in the first sweep, to the deadline after."""
        end = self.part_end[part] if self.by_part else self.deadline
        return min(end, self.deadline) - time.monotonic()

    def can_start(self, case: dict) -> bool:
        """Whether the case may start now; a smoke run marks the cases it leaves out (one with no
        time left stays pending: a later sweep may run it, or finish() marks it skipped)."""
        smoke = self.mode["smoke_cases"]
        if smoke is not None and case["id"] not in smoke:
            return skip(case, "smoke")
        left = self.left(case["part"])
        return left > 0 and left >= self.mode["min_case_s"]

    # -- the parts

    def run(self) -> None:
        help_proc = self.start_help()
        try:
            self.teacher_forward()
            self.help_text = finish_help(help_proc, max(self.deadline - time.monotonic(), 1))
            help_proc = None
            self.report["teacher_cache_flag"] = (
                None if self.help_text is None else "--teacher-cache" in self.help_text
            )
            self.report["train_flags_missing"] = (
                None if self.help_text is None else missing_flags(self.help_text)
            )
            case = next(c for c in self.cases if c["part"] == "teacher-cache")
            if self.help_text is not None and not self.report["teacher_cache_flag"]:
                case.update(status="not available", why="train.py has no --teacher-cache")
            elif self.help_text is None and self.deadline > time.monotonic():
                case.update(status="not available", why="train.py --help did not answer")
            # three sweeps: the primary cases within their parts' shares (a part may use what
            # the parts before it left), the primary ones still pending, then the others
            for primary, by_part in ((True, True), (True, False), (False, False)):
                self.by_part = by_part
                for part, _ in PARTS[1:]:
                    for case in self.cases:
                        if case["part"] != part or case["status"] != "pending":
                            continue
                        if case["primary"] == primary and self.can_start(case):
                            self.run_case(case)
                            self.save()
        finally:
            if help_proc is not None:
                kill_group(help_proc)

    def run_case(self, case: dict) -> None:
        warmup, part = self.mode["warmup"], case["part"]
        if part == "base":
            self.train_case(case, [], warmup)
        elif part == "teacher-cache":
            self.teacher_cache(case)
        elif part == "no-fused-head":
            self.train_case(case, ["--no-fused-head"], warmup, fused=None)
        elif part == "batch-search":
            self.batch_search(case)
        elif part == "compile":
            extra = ["--compile", "--max-steps", str(self.mode["compile_steps"])]
            self.train_case(case, extra, self.mode["compile_warmup"])
        elif part == "fsdp":
            self.train_case(case, ["--fsdp"], warmup, torchrun=True)

    def start_help(self) -> subprocess.Popen | None:
        """train.py --help, beside the teacher-forward part: does --teacher-cache exist?"""
        if self.deadline <= time.monotonic():
            return None
        path = os.path.join(self.tmp, "help.txt")
        with open(path, "wb") as f:
            proc = subprocess.Popen(
                [sys.executable, TRAIN, "--help"],
                stdout=f,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                env=self.runner.env,
                start_new_session=True,
            )
        proc.help_path = path  # type: ignore[attr-defined]
        return proc

    def teacher_forward(self) -> None:
        cases = [c for c in self.cases if c["part"] == "teacher-forward"]
        runnable = [c for c in cases if self.can_start(c)]
        if not runnable:
            return
        spec = {
            "mode": self.mode_name,
            "corpus": self.corpus,
            "out": os.path.join(self.tmp, "worker.json"),
            "teachers": [c["id"].split("/")[1] for c in runnable],
        }
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]
        done = self.runner.run(cmd, self.left("teacher-forward"), "teacher-forward")
        try:
            with open(spec["out"], encoding="utf-8") as f:
                self.worker = json.load(f)
        except (OSError, ValueError):
            self.worker = {}
        self.report["environment"].update(self.worker.get("env", {}))
        self.report["parameters"] = self.worker.get("parameters", {})
        self.report["teacher_tokens_per_student_token"] = self.worker.get("teacher_ratio", {})
        for case in runnable:
            name = case["id"].split("/")[1]
            figures = self.worker.get("teacher_forward", {}).get(name)
            case["command"] = "python bench/gpu_check.py --worker ... (in-process transformers)"
            case["wall_s"] = round(done["wall_s"], 1)
            if figures:
                case.update(status="ok", **figures)
            else:
                why = self.worker.get("errors", {}).get(name)
                if done["timed_out"]:
                    why = f"timed out after {done['wall_s']:.0f} s (its part's budget)"
                case.update(status="failed", error=why or last_error_line(done["stderr"]))
        if not os.path.isdir(self.corpus):
            self.corpus = None  # train.py then writes its own (the same generator)
        self.save()

    def teacher_cache(self, case: dict) -> None:
        """Two runs that share --teacher-cache DIR: the first fills it, the second is measured."""
        directory = os.path.join(self.tmp, "teacher-cache")
        cmd = [sys.executable, os.path.join(os.path.dirname(TRAIN), "cache_teacher.py"),
               "--preset", self.mode["preset"], "--out", directory]  # fmt: skip
        if self.corpus:
            cmd += ["--data", self.corpus]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            case.update(status="failed", why=(done.stderr or done.stdout)[-500:])
        else:  # the cache pass (cache_teacher.py) ran; the step from the cache is measured
            self.train_case(case, ["--teacher-cache", directory], self.mode["warmup"])
        case["note"] = "cache_teacher.py fills DIR, then train.py --teacher-cache DIR is measured"
        self.save()

    def command(self, case: dict, extra: list[str], torchrun: bool, out_dir: str) -> list[str]:
        flags = train_flags(self.mode, case["loss"], self.corpus, self.cache, out_dir) + extra
        if torchrun:
            launch = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
            return [sys.executable, *launch, TRAIN, *flags]
        return [sys.executable, TRAIN, *flags]

    def train_case(
        self,
        case: dict,
        extra: list[str],
        warmup: int,
        *,
        torchrun: bool = False,
        fused: bool | None = True,
        tag: str = "",
    ) -> None:
        """One train.py run; its figures, or why it failed, into case."""
        if fused:
            extra = ["--fused-head", *extra]
        out_dir = os.path.join(self.tmp, "runs", case["id"].replace("/", "-") + tag)
        cmd = self.command(case, extra, torchrun, out_dir)
        case["command"] = shown_command(cmd, self.tmp)
        done = self.runner.run(cmd, self.left(case["part"]), case["id"] + tag)
        records = read_metrics(os.path.join(out_dir, "metrics.jsonl"))
        figures = step_figures(records, warmup)
        case["wall_s"] = round(done["wall_s"], 1)
        if done["rc"] == 0 and figures:
            case.update(status="ok", **figures)
        elif done["timed_out"] and figures:  # what it measured before its part's time ran out
            case.update(status="ok", **figures)
            case["note"] = f"stopped at its part's budget after {len(records)} steps"
        else:
            if done["timed_out"]:
                why = f"timed out after {done['wall_s']:.0f} s (its part's budget)"
            elif done["rc"] == 0:
                why = f"no step after the {warmup} warm-up step(s) in metrics.jsonl"
            else:
                why = last_error_line(done["stderr"]) or f"exit status {done['rc']}"
            case.update(status="failed", error=why, oom=is_oom(done["stderr"]))
        shutil.rmtree(out_dir, ignore_errors=True)

    def batch_search(self, case: dict) -> None:
        base = next(c for c in self.cases if c["id"] == f"base/{case['loss']}")
        started = time.monotonic()
        start = self.mode["batch_size"]

        def attempt(size: int) -> dict:
            probe = {"id": case["id"], "part": case["part"], "loss": case["loss"]}
            extra = [
                *["--batch-size", str(size), "--grad-accum", "1"],
                *["--max-steps", str(self.mode["search_steps"])],
            ]
            self.train_case(probe, extra, 1, tag=f"-b{size}")
            return probe

        result = search_batch(
            attempt,
            start,
            self.mode["search_max"],
            fits_start=base["status"] == "ok",
            time_left=lambda: self.left(case["part"]) - self.mode["min_case_s"],
        )
        case.update(result, wall_s=round(time.monotonic() - started, 1))
        steps = self.mode["search_steps"]
        case["command"] = f"train.py ... --batch-size B --grad-accum 1 --max-steps {steps}"
        self.save()

    # -- results

    def finish(self, stopped: str | None) -> None:
        for case in self.cases:
            if case["status"] == "pending":
                skip(case, "budget" if stopped is None else stopped)
        self.report["elapsed_s"] = round(time.monotonic() - self.t0, 1)
        self.report["finished"] = stopped is None
        if stopped:
            self.report["stopped"] = stopped
        derive(self.report)
        self.save()

    def save(self) -> None:
        write_results(self.report, self.out)


def skip(case: dict, why: str) -> bool:
    case.update(status="skipped", why=why)
    return False


def search_batch(attempt, start: int, largest: int, *, fits_start: bool, time_left) -> dict:
    """Double the micro-batch from 2 x start while it fits: attempt(size) returns a case dict
    (status ok, or failed with oom). The largest size that ran, 'at least' when the search ended
    before anything failed (its cap or its time), and every size tried."""
    tried, best, bound = [], start if fits_start else None, "at least"
    size = 2 * start
    while size <= largest:
        if time_left() <= 0:
            break
        probe = attempt(size)
        row = {"batch_size": size, "status": probe["status"]}
        for key in ("tokens_per_s", "step_s", "peak_mem_gb", "error"):
            if probe.get(key) is not None:
                row[key] = probe[key]
        tried.append(row)
        if probe["status"] != "ok":
            if probe.get("oom"):
                row["status"], bound = "out of memory", "exact"
            break
        best, size = size, 2 * size
    result = {"tried": tried, "largest_micro_batch": best, "largest_is": bound}
    if not tried:
        return {**result, "status": "skipped", "why": "budget"}
    if best is None:  # nothing is known to fit
        return {**result, "status": "failed", "error": tried[-1].get("error", "out of memory")}
    ok = [r for r in tried if r["status"] == "ok"]
    if ok:  # the figures of the largest size that ran
        result.update({k: ok[-1].get(k) for k in ("tokens_per_s", "step_s", "peak_mem_gb")})
    if tried[-1]["status"] == "failed":
        result["note"] = f"a failure other than out of memory at {tried[-1]['batch_size']}"
    return {**result, "status": "ok"}


def shown_command(cmd: list[str], tmp: str) -> str:
    """The command as a reader would type it: train.py's path short, the temp dir as TMP."""
    parts = ["python" if x == sys.executable else x for x in cmd]
    parts = ["train.py" if x == TRAIN else x.replace(tmp, "TMP") for x in parts]
    return " ".join(parts)


def missing_flags(help_text: str) -> list[str]:
    """TRAIN_FLAGS that train.py --help does not list (a flag as a whole word, a choice inside
    braces)."""
    words = set(re.findall(r"(?<![\w-])--[\w-]+", help_text))
    choices = {c for group in re.findall(r"\{([^}]*)\}", help_text) for c in group.split(",")}
    return [f for f in TRAIN_FLAGS if f not in (words if f.startswith("--") else choices)]


def finish_help(proc: subprocess.Popen | None, timeout: float) -> str | None:
    if proc is None:
        return None
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        return None
    with open(proc.help_path, encoding="utf-8", errors="replace") as f:  # type: ignore[attr-defined]
        text = f.read()
    return text if proc.returncode == 0 else None


# ----------------------------------------------------------------------------- derived figures


def peak_tflops(card: str | None) -> float | None:
    for piece, peak in PEAK_BF16_TFLOPS:
        if card and piece in card:
            return peak
    return None


def derive(report: dict) -> None:
    """MFU of every measured train.py case, and KD step / (CE step + teacher forward)."""
    env, params = report["environment"], report.get("parameters") or {}
    peak = peak_tflops(env.get("card")) if env.get("cuda_available") else None
    report["peak_bf16_tflops"] = peak
    ratio = report.get("teacher_tokens_per_student_token") or {}
    for case in report["cases"]:
        case["mfu"] = None
        if case["status"] != "ok" or case["part"] == "teacher-forward" or not case.get("step_s"):
            continue
        teacher = teacher_of(case["loss"])
        tokens = case.get("tokens_per_step")
        if peak is None or not tokens or "student" not in params:
            continue
        flops = 6 * params["student"] * tokens
        if teacher is not None:
            if teacher not in params or teacher not in ratio:
                continue
            flops += 2 * params[teacher] * ratio[teacher] * tokens
        case["mfu"] = flops / case["step_s"] / (peak * 1e12)
    by_id = {c["id"]: c for c in report["cases"]}
    ce = by_id["base/ce"]
    rows = []
    for loss in LOSSES[1:]:
        kd, forward = by_id[f"base/{loss}"], by_id[f"teacher-forward/{teacher_of(loss)}"]
        row = {"loss": loss, "goal": GOAL_RATIO, "ratio": None}
        if all(c["status"] == "ok" for c in (kd, ce, forward)):
            denominator = ce["step_s"] + forward["step_s"]
            row.update(
                kd_step_s=kd["step_s"],
                ce_step_s=ce["step_s"],
                teacher_forward_s=forward["step_s"],
                ratio=kd["step_s"] / denominator,
                meets_goal=kd["step_s"] / denominator <= GOAL_RATIO,
            )
        else:
            missing = [c["id"] for c in (kd, ce, forward) if c["status"] != "ok"]
            row["missing"] = missing
        rows.append(row)
    report["ratios"] = rows


# ----------------------------------------------------------------------------- writing


def fmt(value, spec: str, unit: str = "") -> str:
    return "" if value is None else f"{value:{spec}}{unit}"


def status_cell(case: dict) -> str:
    if case["status"] == "failed":
        return "failed" + (" (out of memory)" if case.get("oom") else "")
    if case["status"] in ("skipped", "not available"):
        return f"{case['status']} ({case.get('why', '')})"
    return case["status"]


def notes_cell(case: dict) -> str:
    notes = []
    if case.get("error"):
        notes.append(case["error"].replace("|", "/")[:200])
    if case["part"] == "teacher-forward" and case["status"] == "ok":
        notes.append(
            f"{case['teacher_tokens_per_step']:,.0f} teacher tokens a step "
            f"({case['micro_batches']} micro-batches timed)"
        )
    if case["part"] == "batch-search" and "tried" in case:
        tried = ", ".join(f"{r['batch_size']}: {r['status']}" for r in case["tried"]) or "none"
        best = case.get("largest_micro_batch")
        bound = "" if case.get("largest_is") == "exact" else ">= "
        notes.append(f"largest micro-batch {bound}{best} (tried {tried})")
    if case.get("note"):
        notes.append(case["note"])
    return "; ".join(notes)


def markdown(report: dict) -> str:
    env, s = report["environment"], report["settings"]
    lines = [
        f"# GPU check ({report['mode']}): {env.get('card') or 'no GPU'}, {report['date']}",
        "",
        f"`python bench/gpu_check.py{' --smoke' if report['mode'] == 'smoke' else ''}`: "
        f"train.py --preset {s['preset']}, random weights, {s['batch_size']} x {s['seq_len']} "
        f"tokens a micro-step, {s['grad_accum']} micro-steps a step, {s['steps']} steps a case "
        f"(the first {s['warmup']} dropped); budget {report['budget_s']:.0f} s, used "
        f"{report.get('elapsed_s', 0):.0f} s"
        + ("" if report.get("finished") else f" (stopped: {report.get('stopped', 'running')})")
        + ".",
        "",
        f"compile: {s['compile_steps']} steps, the first {s['compile_warmup']} dropped; batch "
        f"search: --grad-accum 1, {s['search_steps']} steps a size, the first dropped, up to "
        f"{s['search_max']}; teacher forward: a separate process (transformers, the preset's "
        "shapes, the data pipeline's teacher windows) x grad-accum.",
        "",
        "Environment: "
        + ", ".join(
            f"{k} {env.get(k)}"
            for k in (
                "card",
                "driver",
                "cuda",
                "torch",
                "transformers",
                "python",
                "git_commit",
            )
        )
        + f"; peak bf16 {fmt(report.get('peak_bf16_tflops'), '.0f', ' TFLOP/s') or 'unknown'}.",
        "",
        "| case | status | student tokens/s | step s | peak GB | MFU | notes |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for c in report["cases"]:
        tokens = "" if c["part"] == "teacher-forward" else fmt(c.get("tokens_per_s"), ",.0f")
        lines.append(
            f"| {c['id']} | {status_cell(c)} | {tokens} | {fmt(c.get('step_s'), '.3f')} "
            f"| {fmt(c.get('peak_mem_gb'), '.1f')} | {fmt(c.get('mfu'), '.1%')} "
            f"| {notes_cell(c)} |"
        )
    lines += [
        "",
        f"KD step / (CE step + teacher forward), base cases (goal <= {GOAL_RATIO}):",
        "",
        "| loss | KD step s | CE step s | teacher forward s | ratio | goal met |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in report["ratios"]:
        if r["ratio"] is None:
            lines.append(f"| {r['loss']} | | | | | not measured ({', '.join(r['missing'])}) |")
        else:
            lines.append(
                f"| {r['loss']} | {r['kd_step_s']:.3f} | {r['ce_step_s']:.3f} "
                f"| {r['teacher_forward_s']:.3f} | {r['ratio']:.2f} "
                f"| {'yes' if r['meets_goal'] else 'no'} |"
            )
    return "\n".join(lines) + "\n"


def write_results(report: dict, prefix: str) -> None:
    """PREFIX.json and PREFIX.md, each replaced whole (a reader never sees half a file)."""
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    for suffix, text in ((".json", json.dumps(report, indent=1) + "\n"), (".md", markdown(report))):
        path = prefix + suffix
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)


def host_environment() -> dict:
    """What is known without importing torch here (the worker adds CUDA's and the card's)."""
    from importlib import metadata

    env = {"python": platform.python_version(), "platform": platform.platform()}
    for package in ("torch", "transformers"):
        try:
            env[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            env[package] = None
    env["card"] = env["driver"] = env["gpu_memory"] = env["cuda"] = None
    env["cuda_available"] = False
    try:
        smi = subprocess.run(
            [
                "nvidia-smi",
                "--query-gpu=name,driver_version,memory.total",
                "--format=csv,noheader",
            ],
            capture_output=True,
            text=True,
            timeout=20,
        )
        if smi.returncode == 0 and smi.stdout.strip():
            name, driver, memory = [x.strip() for x in smi.stdout.splitlines()[0].split(",")]
            env.update(card=name, driver=driver, gpu_memory=memory, cuda_available=True)
    except (OSError, subprocess.SubprocessError, ValueError):
        pass
    try:
        git = ["git", "-C", ROOT]
        env["git_commit"] = subprocess.run(
            [*git, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=20
        ).stdout.strip()
        dirty = subprocess.run(
            [*git, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=20,
        ).stdout.strip()
        env["git_dirty"] = bool(dirty)
    except (OSError, subprocess.SubprocessError):
        env["git_commit"] = None
    return env


# ----------------------------------------------------------------------------- the worker


def worker(spec: dict) -> None:
    """The teacher-forward part, in its own process: the environment, the parameter counts, the
    teacher windows the data pipeline makes, and each teacher's forward on them. Writes spec's
    'out' after each piece (a kill leaves what was done)."""
    import torch
    import transformers

    result: dict = {"errors": {}}

    def save() -> None:
        tmp = spec["out"] + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(result, f)
        os.replace(tmp, spec["out"])

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    env = {
        "cuda_available": cuda,
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    if cuda:
        props = torch.cuda.get_device_properties(device)
        env.update(
            card=torch.cuda.get_device_name(device),
            capability=f"{props.major}.{props.minor}",
            gpu_memory_gb=round(props.total_memory / 2**30, 1),
        )
    result["env"] = env
    save()

    sys.path.insert(0, ROOT)
    from data import AlignedWindows, collate
    from flags import make_tiny_corpus
    from tokens import load_tokenizer

    mode = MODES[spec["mode"]]
    if not os.path.isdir(spec["corpus"]):  # the corpus a preset without --data writes
        make_tiny_corpus(spec["corpus"], n_docs=400, seed=0)
    student_tok = load_tokenizer(STUDENT_TOKENIZER)
    vocab = lambda tok: -(-len(tok) // 64) * 64  # noqa: E731  (as the presets pad it)
    result["parameters"] = {
        "student": count_parameters("llama", mode["student_shape"], vocab(student_tok), mode)
    }
    result["teacher_forward"], result["teacher_ratio"] = {}, {}
    dtype = torch.bfloat16 if cuda else torch.float32  # train.py's teachers: bf16 on GPU
    for name in spec["teachers"]:
        try:
            tokenizer, arch = TEACHERS[name]
            same = tokenizer == STUDENT_TOKENIZER
            tok = student_tok if same else load_tokenizer(tokenizer)
            batches = teacher_batches(
                AlignedWindows, collate, student_tok, tok, spec["corpus"], mode, same
            )
            shape = mode["student_shape"] if same else mode["teacher_shape"]
            model = build_model(arch, shape, vocab(tok), mode["seq_len"], device, dtype)
            result["parameters"][name] = sum(p.numel() for p in model.parameters())
            figures = time_forward(torch, model, batches, device, cuda)
            figures["step_s"] = figures["micro_batch_s"] * mode["grad_accum"]
            figures["teacher_tokens_per_step"] = figures["teacher_tokens"] * mode["grad_accum"]
            student_tokens = sum(int(b[2]) for b in batches) / len(batches)
            result["teacher_ratio"][name] = figures["teacher_tokens"] / student_tokens
            figures["teacher_tokens_per_student_token"] = result["teacher_ratio"][name]
            result["teacher_forward"][name] = figures
            del model
            if cuda:
                torch.cuda.empty_cache()
        except Exception as e:  # report it in the case, go on with the next teacher
            result["errors"][name] = f"{type(e).__name__}: {e}"[:400]
        save()


def teacher_batches(AlignedWindows, collate, student_tok, tok, corpus, mode, same) -> list:
    """(ids, mask, student tokens) of the first micro-batches, as train.py's loader makes them
    (seed 1337, its default; a same-tokenizer teacher reads the student's ids)."""
    import functools

    import torch

    dataset = AlignedWindows(corpus, student_tok, [tok], mode["seq_len"], repeat=True, seed=1337)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=mode["batch_size"],
        num_workers=0,
        collate_fn=functools.partial(collate, pad_ids=dataset.pad_ids),
    )
    batches = []
    for batch in loader:
        ids = batch["student_ids"] if same else batch["teacher_ids_0"]
        mask = batch["student_mask"] if same else batch["teacher_mask_0"]
        batches.append((ids, mask, batch["student_mask"].sum()))
        if len(batches) == mode["teacher_micro_batches"]:
            break
    return batches


def build_model(arch: str, shape: str, vocab: int, seq_len: int, device, dtype):
    """A random Llama/Qwen3 of a flags.SHAPES entry, as the presets build it (tied embeddings)."""
    import torch

    sys.path.insert(0, ROOT)
    from flags import tiny_model

    with torch.device(device):
        model = tiny_model(arch, vocab, seq_len, shape)
    return model.to(dtype).eval()


def count_parameters(arch: str, shape: str, vocab: int, mode: dict) -> int:
    import torch

    model = build_model(arch, shape, vocab, mode["seq_len"], torch.device("meta"), torch.float32)
    return sum(p.numel() for p in model.parameters())


def time_forward(torch, model, batches, device, cuda: bool) -> dict:
    """One warm-up forward, then each micro-batch's forward, synchronised; as train.py runs a
    teacher: no gradients, bf16 autocast on GPU, the attention mask, no KV cache."""
    import contextlib

    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()

    def forward(ids, mask):
        with torch.no_grad(), autocast:
            return model(input_ids=ids, attention_mask=mask, use_cache=False).logits

    ids, mask, _ = batches[0]
    forward(ids.to(device), mask.to(device))
    times, widths, tokens = [], [], []
    for ids, mask, _ in batches:
        ids, mask = ids.to(device), mask.to(device)
        if cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        forward(ids, mask)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
        widths.append(ids.shape[1])
        tokens.append(int(mask.sum()))
    return {
        "micro_batch_s": statistics.median(times),
        "micro_batches": len(times),
        "teacher_tokens": statistics.mean(tokens),
        "padded_width": statistics.mean(widths),
    }


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU plumbing check: tiny preset")
    p.add_argument("--budget", type=float, default=BUDGET_S, help="seconds in all (default 480)")
    p.add_argument("--out", help="output prefix: writes PREFIX.json and PREFIX.md")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # the teacher-forward part's process
    args = p.parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return 0
    mode = "smoke" if args.smoke else "gpu"
    out = args.out or os.path.join(RESULTS, "gpu_check_smoke" if args.smoke else "gpu_check")
    if os.path.isdir(out):
        out = os.path.join(out, "gpu_check_smoke" if args.smoke else "gpu_check")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.update(TOKENIZERS_PARALLELISM="false", MPLBACKEND="Agg")

    def stop(signum, frame):
        raise Stop(signal.Signals(signum).name)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    tmp = tempfile.mkdtemp(prefix="gpu_check-")
    check = Check(mode, args.budget, out, Runner(tmp, env), tmp)
    stopped = None
    try:
        check.save()
        check.run()
    except Stop as e:
        stopped = f"signal {e}"
    except Exception as e:  # a bug: the results so far are written, then its traceback
        stopped = f"crashed: {type(e).__name__}: {e}"[:300]
        raise
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        check.finish(stopped)
        shutil.rmtree(tmp, ignore_errors=True)
    done = [c for c in check.cases if c["status"] == "ok"]
    print(f"{len(done)}/{len(check.cases)} cases measured -> {out}.json, {out}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
