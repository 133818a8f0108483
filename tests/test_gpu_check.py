"""bench/gpu_check.py: its CPU smoke run (the same code a GPU window runs, tiny shapes), the budget
that ends it cleanly, and the pieces that only a GPU would reach (the batch search's out of
memory, MFU against the card's peak) with made-up inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "bench"))
import gpu_check  # noqa: E402

CASES = [
    "teacher-forward/qwen3",
    "teacher-forward/llama-3.2",
    *(f"base/{loss}" for loss in ("ce", "pkl", "hkl", "gold", "kl")),
    "teacher-cache/pkl",
    *(
        f"{part}/{loss}"
        for part in ("no-fused-head", "batch-search", "compile")
        for loss in ("pkl", "ce", "gold", "hkl", "kl")
    ),
    "fsdp/pkl",
]
SMOKE_RUNS = ["teacher-forward/qwen3", "teacher-forward/llama-3.2", "base/ce", "base/pkl"]
SMOKE_RUNS.append("fsdp/pkl")
ENVIRONMENT = ["card", "driver", "cuda", "torch", "transformers", "python", "git_commit"]


def rows(markdown: str) -> list[str]:
    """The case names of the markdown's first table."""
    table = markdown.split("\n\n")[4].splitlines()
    assert table[0].startswith("| case | status | student tokens/s | step s | peak GB | MFU |")
    return [line.split(" | ")[0].removeprefix("| ") for line in table[2:]]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One smoke run (a generous budget: a loaded 2-core machine must not skip a case)."""
    prefix = str(tmp_path_factory.mktemp("gpu_check") / "smoke")
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "bench/gpu_check.py", "--smoke", "--out", prefix, "--budget", "1800"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    print(f"smoke run: {time.monotonic() - started:.0f} s")
    with open(prefix + ".json", encoding="utf-8") as f:
        report = json.load(f)
    with open(prefix + ".md", encoding="utf-8") as f:
        return report, f.read()


def test_smoke_runs_every_case_it_should(smoke):
    report, _ = smoke
    assert report["mode"] == "smoke" and report["finished"] is True
    by_id = {c["id"]: c for c in report["cases"]}
    assert [c["id"] for c in report["cases"]] == CASES
    assert report["train_flags_missing"] == []
    cache = report["teacher_cache_flag"]
    for name, case in by_id.items():
        if name in SMOKE_RUNS:
            assert case["status"] == "ok", case
        elif name == "teacher-cache/pkl":
            if cache:  # once train.py has the flag, the smoke run runs it
                assert case["status"] == "ok", case
            else:
                assert (case["status"], case["why"]) == (
                    "not available",
                    "train.py has no --teacher-cache",
                )
        else:
            assert (case["status"], case["why"]) == ("skipped", "smoke"), case


def test_smoke_figures(smoke):
    report, _ = smoke
    by_id = {c["id"]: c for c in report["cases"]}
    for name in ("base/ce", "base/pkl", "fsdp/pkl"):
        case = by_id[name]
        assert case["tokens_per_s"] > 0 and case["step_s"] > 0, case
        assert case["steps_measured"] == 1 and case["steps_logged"] == 2
        assert case["tokens_per_step"] == 2 * 64  # the tiny preset: 2 windows of 64 tokens
        assert case["mfu"] is None  # no card, no peak
        assert "train.py --preset tiny" in case["command"]
    assert "--fsdp" in by_id["fsdp/pkl"]["command"]
    assert "torch.distributed.run" in by_id["fsdp/pkl"]["command"]
    for name in ("teacher-forward/qwen3", "teacher-forward/llama-3.2"):
        case = by_id[name]
        assert case["step_s"] > 0 and case["teacher_tokens_per_step"] > 0, case
    ratio = report["teacher_tokens_per_student_token"]
    assert ratio["llama-3.2"] == 1.0 and 1.0 < ratio["qwen3"] < 1.6
    assert report["parameters"]["student"] > 0 and report["parameters"]["qwen3"] > 0
    pkl, *others = report["ratios"]
    ce, forward = by_id["base/ce"], by_id["teacher-forward/qwen3"]
    assert pkl["loss"] == "pkl" and pkl["ratio"] == pytest.approx(
        by_id["base/pkl"]["step_s"] / (ce["step_s"] + forward["step_s"])
    )
    assert [(r["loss"], r["ratio"]) for r in others] == [(x, None) for x in ("hkl", "gold", "kl")]
    assert report["ratios"][3]["missing"] == ["base/kl"]


def test_smoke_environment_and_table(smoke):
    report, markdown = smoke
    env = report["environment"]
    assert all(k in env for k in ENVIRONMENT), env
    assert env["torch"] and env["transformers"] and env["python"]
    assert env["cuda_available"] is False and report["peak_bf16_tflops"] is None
    assert rows(markdown) == CASES  # one row per case, in order
    assert "| base/pkl | ok |" in markdown and "| compile/pkl | skipped (smoke) |" in markdown
    assert "| pkl | " in markdown.split("goal <= 1.25")[1]


def test_no_budget_skips_every_case_and_still_writes(tmp_path):
    prefix = str(tmp_path / "none")
    started = time.monotonic()
    assert gpu_check.main(["--smoke", "--budget", "0", "--out", prefix]) == 0
    assert time.monotonic() - started < 30
    with open(prefix + ".json", encoding="utf-8") as f:
        report = json.load(f)
    assert [c["id"] for c in report["cases"]] == CASES
    assert {c["status"] for c in report["cases"]} == {"skipped"}
    assert {c["id"] for c in report["cases"] if c["why"] == "budget"} == {
        *SMOKE_RUNS,
        "teacher-cache/pkl",
    }
    assert all(r["ratio"] is None for r in report["ratios"])
    with open(prefix + ".md", encoding="utf-8") as f:
        assert rows(f.read()) == CASES


def fake_attempt(fits_up_to: int, other_failure_at: int | None = None):
    sizes = []

    def attempt(size: int) -> dict:
        sizes.append(size)
        if size == other_failure_at:
            return {"status": "failed", "error": "ValueError: something else", "oom": False}
        if size > fits_up_to:
            error = "torch.OutOfMemoryError: CUDA out of memory"
            return {"status": "failed", "error": error, "oom": True}
        return {"status": "ok", "tokens_per_s": 100.0 * size, "step_s": 1.0, "peak_mem_gb": size}

    return attempt, sizes


def test_batch_search_stops_at_out_of_memory():
    attempt, sizes = fake_attempt(8)
    found = gpu_check.search_batch(attempt, 2, 64, fits_start=True, time_left=lambda: 100)
    assert sizes == [4, 8, 16]
    assert (found["largest_micro_batch"], found["largest_is"]) == (8, "exact")
    assert [r["status"] for r in found["tried"]] == ["ok", "ok", "out of memory"]
    assert found["tokens_per_s"] == 800.0 and found["peak_mem_gb"] == 8


def test_batch_search_cap_time_and_failures():
    attempt, sizes = fake_attempt(1000)
    found = gpu_check.search_batch(attempt, 2, 8, fits_start=True, time_left=lambda: 100)
    assert (sizes, found["largest_micro_batch"], found["largest_is"]) == ([4, 8], 8, "at least")
    attempt, sizes = fake_attempt(1000)
    found = gpu_check.search_batch(attempt, 2, 64, fits_start=True, time_left=lambda: 0)
    assert (sizes, found["status"], found["why"]) == ([], "skipped", "budget")
    attempt, sizes = fake_attempt(1000, other_failure_at=4)
    found = gpu_check.search_batch(attempt, 2, 64, fits_start=False, time_left=lambda: 100)
    assert (found["status"], found["error"]) == ("failed", "ValueError: something else")
    attempt, sizes = fake_attempt(1000, other_failure_at=8)
    found = gpu_check.search_batch(attempt, 2, 64, fits_start=True, time_left=lambda: 100)
    assert (found["status"], found["largest_micro_batch"], found["largest_is"]) == (
        "ok",
        4,
        "at least",
    )
    assert "other than out of memory at 8" in found["note"]


def test_metrics_and_errors():
    records = [
        {"step": 1, "tokens": 100, "tokens_per_s": 10.0, "peak_mem_gb": 5.0},
        {"step": 2, "tokens": 100, "tokens_per_s": 50.0, "peak_mem_gb": 7.0},
        {"step": 3, "tokens": 100, "tokens_per_s": 20.0, "peak_mem_gb": 6.0},
        {"step": 4, "tokens": 100, "tokens_per_s": 25.0, "peak_mem_gb": 6.0},
    ]
    figures = gpu_check.step_figures(records, warmup=1)
    assert figures["tokens_per_s"] == 25.0 and figures["step_s"] == 4.0
    assert figures["peak_mem_gb"] == 7.0 and figures["steps_measured"] == 3
    assert gpu_check.step_figures(records[:1], warmup=1) is None
    stderr = (
        "train:  50%|#####| 1/2\rtrain: 100%\nTraceback (most recent call last):\n"
        '  File "train.py", line 1\n'
        "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB\n"
        "[rank0]: something after it\n"
    )
    assert gpu_check.last_error_line(stderr).startswith("torch.OutOfMemoryError: CUDA out of")
    assert gpu_check.is_oom(stderr) and not gpu_check.is_oom("ValueError: bad")
    assert gpu_check.last_error_line("error: --seq-len 1: at least 2\n") == (
        "error: --seq-len 1: at least 2"
    )


def test_peak_and_mfu():
    assert gpu_check.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert gpu_check.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert gpu_check.peak_tflops("NVIDIA H200") == 989.0
    assert gpu_check.peak_tflops("Tesla T4") is None and gpu_check.peak_tflops(None) is None
    case = lambda id_, loss, **kw: {
        "id": id_,
        "part": id_.split("/")[0],
        "loss": loss,
        "status": "ok",
        **kw,
    }
    report = {
        "environment": {"card": "NVIDIA H200", "cuda_available": True},
        "parameters": {"student": 1e9, "qwen3": 4e9, "llama-3.2": 1e9},
        "teacher_tokens_per_student_token": {"qwen3": 1.2, "llama-3.2": 1.0},
        "cases": [
            case("teacher-forward/qwen3", None, step_s=0.5),
            case("teacher-forward/llama-3.2", None, step_s=0.2),
            case("base/ce", "ce", step_s=1.0, tokens_per_step=10_000),
            case("base/pkl", "pkl", step_s=2.0, tokens_per_step=10_000),
            case("base/hkl", "hkl", step_s=1.5, tokens_per_step=10_000),
            {"id": "base/gold", "part": "base", "loss": "gold", "status": "failed"},
            case("base/kl", "kl", step_s=1.2, tokens_per_step=10_000),
        ],
    }
    gpu_check.derive(report)
    by_id = {c["id"]: c for c in report["cases"]}
    assert by_id["base/ce"]["mfu"] == pytest.approx(6e13 / 1.0 / 989e12)
    assert by_id["base/pkl"]["mfu"] == pytest.approx((6e13 + 2 * 4e9 * 1.2 * 1e4) / 2.0 / 989e12)
    assert by_id["teacher-forward/qwen3"]["mfu"] is None
    ratios = {r["loss"]: r for r in report["ratios"]}
    assert ratios["pkl"]["ratio"] == pytest.approx(2.0 / 1.5) and not ratios["pkl"]["meets_goal"]
    assert ratios["hkl"]["ratio"] == pytest.approx(1.0) and ratios["hkl"]["meets_goal"]
    assert ratios["kl"]["ratio"] == pytest.approx(1.0)
    assert ratios["gold"]["ratio"] is None and ratios["gold"]["missing"] == ["base/gold"]


class FakeGPU:
    """Runner and clock of a made-up H100 window: each train.py run takes `costs` seconds of the
    budget (by its flags), a micro-batch above `fits` runs out of memory."""

    def __init__(self, fits: int = 8):
        self.now, self.fits, self.commands = 1000.0, fits, []
        self.env = dict(os.environ)

    def monotonic(self) -> float:
        return self.now

    def run(self, cmd: list[str], timeout: float, name: str) -> dict:
        self.commands.append(cmd)
        flag = lambda name, default=None: (
            cmd[len(cmd) - 1 - cmd[::-1].index(name) + 1] if (name in cmd) else default
        )
        cost = 30.0 if "--worker" in cmd else 60.0 if "--compile" in cmd else 25.0
        self.now += min(cost, timeout)
        if cost > timeout:
            return {"rc": -9, "timed_out": True, "wall_s": timeout, "stderr": ""}
        if "--worker" in cmd:
            spec = json.loads(flag("--worker"))
            figures = dict(micro_batch_s=0.1, micro_batches=6, teacher_tokens=4800)
            result = {
                "env": {"card": "NVIDIA H100 80GB HBM3", "cuda_available": True, "cuda": "12.8"},
                "parameters": {"student": 1.24e9, "qwen3": 4.02e9, "llama-3.2": 1.24e9},
                "teacher_ratio": {"qwen3": 1.2, "llama-3.2": 1.0},
                "teacher_forward": {
                    t: dict(figures, step_s=0.3, teacher_tokens_per_step=14_400)
                    for t in spec["teachers"]
                },
            }
            with open(spec["out"], "w", encoding="utf-8") as f:
                json.dump(result, f)
            return {"rc": 0, "timed_out": False, "wall_s": cost, "stderr": ""}
        batch, accum = int(flag("--batch-size")), int(flag("--grad-accum"))
        if batch > self.fits:
            error = "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 8.00 GiB"
            return {"rc": 1, "timed_out": False, "wall_s": cost, "stderr": error}
        tokens = batch * accum * 2048
        os.makedirs(flag("--out-dir"), exist_ok=True)
        with open(os.path.join(flag("--out-dir"), "metrics.jsonl"), "w") as f:
            for step in range(1, int(flag("--max-steps")) + 1):
                record = {"step": step, "tokens": tokens, "tokens_per_s": tokens / 1.5}
                f.write(json.dumps(dict(record, peak_mem_gb=8.0 * batch)) + "\n")
        return {"rc": 0, "timed_out": False, "wall_s": cost, "stderr": ""}


def test_a_gpu_window_with_a_fake_runner(tmp_path, monkeypatch):
    """GPU mode's plan, commands and budgets, on a made-up card whose runs cost 25 s (60 s
    compiled): what a 480-s window covers, and that the rest is skipped, not lost."""
    fake = FakeGPU()
    monkeypatch.setattr(gpu_check, "time", fake)
    monkeypatch.setattr(gpu_check.Check, "start_help", lambda self: None)
    help_text = " ".join(gpu_check.TRAIN_FLAGS[:18]) + " {auto,pkl,hkl,gold,uld,kl,ce}"
    monkeypatch.setattr(
        gpu_check, "finish_help", lambda proc, t: help_text + " {shapes-1b-4b,tiny}"
    )
    check = gpu_check.Check("gpu", 480.0, str(tmp_path / "gpu"), fake, str(tmp_path))
    check.run()
    check.finish(None)
    by_id = {c["id"]: c for c in check.cases}
    status = {k: (c["status"], c.get("why")) for k, c in by_id.items()}
    assert check.report["train_flags_missing"] == []
    assert status["teacher-cache/pkl"] == ("not available", "train.py has no --teacher-cache")
    assert all(status[f"base/{x}"] == ("ok", None) for x in gpu_check.LOSSES)
    assert status["no-fused-head/pkl"] == ("ok", None) and status["compile/pkl"] == ("ok", None)
    assert status["fsdp/pkl"] == ("ok", None)
    assert ("skipped", "budget") in status.values()  # 25-s runs: not everything fits in 480 s
    assert fake.now - 1000.0 <= 480.0
    search = by_id["batch-search/pkl"]
    assert (search["largest_micro_batch"], search["largest_is"]) == (8, "exact")
    assert [r["batch_size"] for r in search["tried"]] == [4, 8, 16]
    # the commands: the preset's shapes, kl's same-tokenizer teacher, compile's longer runs
    base_kl = next(c for c in fake.commands if "kl" in c and "--teacher" in c)
    assert base_kl[base_kl.index("--teacher") + 1] == "pkg:llama-3.2"
    assert all("shapes-1b-4b" in c for c in fake.commands if gpu_check.TRAIN in c)
    compiled = next(c for c in fake.commands if "--compile" in c)
    assert compiled[-1] == "6" and "--fused-head" in compiled
    fsdp = next(c for c in fake.commands if "--fsdp" in c)
    assert fsdp[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    # derived: MFU on an H100's 989 TFLOP/s, the ratio from the base cases
    pkl = by_id["base/pkl"]
    flops = 6 * 1.24e9 * 12_288 + 2 * 4.02e9 * 1.2 * 12_288
    assert pkl["mfu"] == pytest.approx(flops / 1.5 / 989e12)
    ratios = {r["loss"]: r["ratio"] for r in check.report["ratios"]}
    assert ratios["pkl"] == pytest.approx(1.5 / (1.5 + 0.3))
    with open(tmp_path / "gpu.md", encoding="utf-8") as f:
        assert rows(f.read()) == CASES
