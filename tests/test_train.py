"""train.py with the tiny preset: every loss, several teachers, DDP on CPU, exact resume, errors.

The tiny preset builds small random Llama/Qwen3 models sized to the REAL tokenizers' vocabularies
and a local corpus; W is built once into a shared cache directory for the whole module.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch

import losses
import train
from conftest import ROOT


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("w_cache"))


def tiny_argv(out_dir, cache: str, *extra: str) -> list[str]:
    """train.py's arguments for an in-process tiny run (no DataLoader workers)."""
    return ["--preset", "tiny", "--out-dir", str(out_dir), "--projection-cache", cache,
            "--num-workers", "0", *extra]  # fmt: skip


def run(out_dir, cache: str, *extra: str) -> list[dict]:
    """train.main in this process; returns the metrics.jsonl records."""
    train.main(tiny_argv(out_dir, cache, *extra))
    return read_metrics(out_dir)


def read_metrics(out_dir) -> list[dict]:
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("loss", ["pkl", "hkl", "gold", "uld"])
def test_each_cross_tokenizer_loss_trains_and_logs(tmp_path, cache, loss):
    records = run(tmp_path, cache, "--loss", loss, "--max-steps", "2")
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        assert {"step", "loss", "ce", "kd", "lr", "tokens_per_s", "grad_norm"} <= r.keys()
        assert math.isfinite(r["loss"]) and r["kd"] != 0
        # dynamic scaling: sg(CE/KD) * KD + CE = 2 x CE; a negative KD (GOLD's common-set KL is
        # a KL over some ids only, it can be < 0) keeps scale 1
        expected = 2 * r["ce"] if r["kd"] > 0 else r["ce"] + r["kd"]
        assert r["loss"] == pytest.approx(expected, rel=1e-5)
        assert 0 < r["valid_chunks"] <= 1
    assert os.path.isdir(tmp_path / "step_2")


def test_auto_loss_picks_pkl_for_qwen3_from_the_audit(tmp_path, cache, capsys):
    run(tmp_path, cache, "--loss", "auto", "--max-steps", "1")
    assert "loss pkl" in capsys.readouterr().out


def test_ce_baseline_has_no_teacher(tmp_path, cache):
    records = run(tmp_path, cache, "--loss", "ce", "--max-steps", "2")
    assert [r["kd"] for r in records] == [0.0, 0.0]
    assert records[-1]["loss"] == pytest.approx(records[-1]["ce"])


def test_two_teachers_same_tokenizer_kl_and_cross_tokenizer_hkl(tmp_path, cache):
    records = run(
        tmp_path,
        cache,
        "--teacher",
        "pkg:qwen3",
        "--loss",
        "hkl",
        "--teacher",
        "pkg:llama-3.2",
        "--loss",
        "kl",
        "--teacher-weight",
        "0.8",
        "--teacher-weight",
        "0.2",
        "--max-steps",
        "2",
    )
    last = records[-1]
    kd_q, kd_l = last["kd/pkg:qwen3"], last["kd/pkg:llama-3.2"]
    assert last["kd"] == pytest.approx(0.8 * kd_q + 0.2 * kd_l, rel=1e-5)


def test_static_weights_and_first_chunk_merge(tmp_path, cache):
    records = run(
        tmp_path,
        cache,
        "--loss",
        "pkl",
        "--kd-scaling",
        "static",
        "--kd-weight",
        "0.1",
        "--chunk-merge",
        "first",
        "--max-steps",
        "2",
    )
    r = records[-1]
    assert r["loss"] == pytest.approx(0.1 * r["kd"] + r["ce"], rel=1e-5)


def test_first_positions_only_keeps_each_chunks_first_position():
    chunk = torch.tensor([[-1, 0, 0, 0, 1, 2, 2, -1]])
    expected = torch.tensor([[-1, 0, -1, -1, 1, 2, -1, -1]])
    assert torch.equal(train.first_positions_only(chunk), expected)


def test_learned_projection_moves_and_is_checkpointed(tmp_path, cache):
    run(tmp_path, cache, "--loss", "pkl", "--learn-projection", "--max-steps", "2")
    state = torch.load(tmp_path / "step_2" / "trainer_state.pt", weights_only=True)
    (proj,) = state["projections"]
    from build_projection import load_projection

    cached = [f for f in os.listdir(cache) if f.endswith(".pt")]
    W = load_projection(os.path.join(cache, cached[0]))["W"]
    initial = losses.LearnableProjection(W).logits
    assert not torch.allclose(proj["logits"], initial)  # lr 1e-2 moved the weights


def test_gradient_checkpointing_gives_the_same_losses(tmp_path, cache):
    plain = run(tmp_path / "plain", cache, "--loss", "pkl", "--max-steps", "2")
    checkpointed = run(tmp_path / "gc", cache, "--loss", "pkl", "--max-steps", "2",
                       "--gradient-checkpointing")  # fmt: skip
    for a, b in zip(plain, checkpointed):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)


def test_checkpoint_loads_with_transformers(tmp_path, cache):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run(tmp_path, cache, "--loss", "pkl", "--max-steps", "1")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "step_1")
    tok = AutoTokenizer.from_pretrained(tmp_path / "step_1")
    assert model.config.vocab_size >= len(tok) == 128_257


def test_non_finite_loss_skips_the_step_and_too_many_stop_the_run(tmp_path, cache, monkeypatch):
    real = losses.combine
    calls = {"n": 0}

    def sometimes_nan(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 2 else loss

    monkeypatch.setattr(losses, "combine", sometimes_nan)
    records = run(tmp_path / "one", cache, "--loss", "pkl", "--max-steps", "3")
    assert [r["skipped"] for r in records] == [0, 1, 1]
    assert math.isnan(records[1]["grad_norm"])

    monkeypatch.setattr(losses, "combine", lambda *a, **k: real(*a, **k) * float("nan"))
    with pytest.raises(SystemExit) as info:
        run(tmp_path / "many", cache, "--loss", "pkl", "--max-steps", "10", "--max-bad-steps", "2")
    assert info.value.code == 2
    assert len(read_metrics(tmp_path / "many")) == 3  # stopped at the 3rd bad step in a row


def test_kill_during_checkpoint_writing_leaves_the_previous_one(tmp_path, cache, monkeypatch):
    run(tmp_path, cache, "--loss", "pkl", "--max-steps", "2", "--save-every", "1")
    real_save = torch.save

    def crash_on_trainer_state(obj, path, *args, **kwargs):
        if str(path).endswith("trainer_state.pt"):
            raise KeyboardInterrupt  # killed in the middle of writing step_3
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", crash_on_trainer_state)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, cache, "--loss", "pkl", "--max-steps", "3", "--save-every", "1", "--resume")
    monkeypatch.setattr(torch, "save", real_save)
    assert [s for s, _ in train.checkpoints(str(tmp_path))] == [1, 2]
    records = run(tmp_path, cache, "--loss", "pkl", "--max-steps", "3", "--resume")
    assert [r["step"] for r in records] == [1, 2, 3]


# ----------------------------------------------------------------------------- DDP and resume


def torchrun(out_dir, cache: str, *extra: str) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_port",
        str(29500 + os.getpid() % 1000),
        "train.py",
        "--preset",
        "tiny",
        "--out-dir",
        str(out_dir),
        "--projection-cache",
        cache,
        "--loss",
        "pkl",
        "--max-steps",
        "40",
        "--save-every",
        "3",
        "--num-workers",
        "1",
        *extra,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_sigkilled_ddp_run_resumes_with_identical_losses(tmp_path, cache):
    # reference: steps 1..9 of a 40-step schedule, without interruption
    full = torchrun(tmp_path / "full", cache, "--stop-step", "9")
    output = full.communicate(timeout=600)[0]
    assert full.returncode == 0, output[-3000:]
    reference = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "full")}
    assert sorted(reference) == list(range(1, 10))

    # the same run, SIGKILLed once it has passed its step-3 checkpoint (36 steps still to go)
    killed = torchrun(tmp_path / "killed", cache)
    deadline = time.time() + 600
    while max([r["step"] for r in read_metrics(tmp_path / "killed")], default=0) < 4:
        assert killed.poll() is None and time.time() < deadline, "run ended before the kill"
        time.sleep(0.05)
    # torchrun's workers run in sessions of their own: killing the launcher's process group
    # would leave them training. Kill the launcher and every descendant, found before the kill.
    launcher = psutil.Process(killed.pid)
    for process in [launcher, *launcher.children(recursive=True)]:
        process.send_signal(signal.SIGKILL)
    killed.wait(timeout=60)
    reached = max(r["step"] for r in read_metrics(tmp_path / "killed"))
    time.sleep(3)  # a worker that survived the kill would go on training and logging
    assert max(r["step"] for r in read_metrics(tmp_path / "killed")) == reached < 40
    checkpoint = train.checkpoints(str(tmp_path / "killed"))[-1][0]
    assert 3 <= checkpoint < 9

    resumed = torchrun(tmp_path / "killed", cache, "--resume", "--stop-step", "9")
    output = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, output[-3000:]
    records = read_metrics(tmp_path / "killed")
    assert [r["step"] for r in records] == list(range(1, 10))
    for r in records[checkpoint:]:  # the steps the resumed run computed
        assert r["loss"] == pytest.approx(reference[r["step"]], abs=1e-6), r["step"]


# ----------------------------------------------------------------------------- errors


def fails_with(capsys, cache, out_dir, *argv: str) -> str:
    with pytest.raises(SystemExit) as info:
        train.main(tiny_argv(out_dir, cache, "--max-steps", "1", *argv))
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    return err[-1]


def test_kl_with_another_tokenizer_is_an_error(tmp_path, cache, capsys):
    assert "needs the student's tokenizer" in fails_with(capsys, cache, tmp_path, "--loss", "kl")


def test_learn_projection_with_gold_is_an_error(tmp_path, cache, capsys):
    message = fails_with(capsys, cache, tmp_path, "--loss", "gold", "--learn-projection")
    assert "--learn-projection" in message and "P-KL" in message


def test_unknown_preset_is_an_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.main(["--preset", "huge", "--out-dir", str(tmp_path)])
    assert "unknown preset 'huge'" in capsys.readouterr().err


def test_teacher_whose_vocabulary_does_not_match_its_W_is_an_error(tmp_path, cache, capsys):
    from build_projection import build_projection, save_projection
    from conftest import get_tokenizer

    wrong = tmp_path / "W_wrong.pt"  # built for the tokenizer's size, not the model's 151,680 rows
    save_projection(
        build_projection(get_tokenizer("llama-3.2"), get_tokenizer("qwen3")), str(wrong)
    )
    message = fails_with(
        capsys, cache, tmp_path / "run", "--loss", "pkl", "--projection", str(wrong)
    )
    assert "does not match its W" in message and "pkg:qwen3" in message


def test_out_dir_with_another_configuration_is_an_error(tmp_path, cache, capsys):
    run(tmp_path, cache, "--loss", "pkl", "--max-steps", "1")
    message = fails_with(capsys, cache, tmp_path, "--loss", "gold")
    assert "another configuration" in message and "loss" in message
    message = fails_with(capsys, cache, tmp_path, "--loss", "pkl")
    assert "--resume" in message and "--overwrite" in message
    records = run(tmp_path, cache, "--loss", "gold", "--max-steps", "1", "--overwrite")
    assert [r["step"] for r in records] == [1]
