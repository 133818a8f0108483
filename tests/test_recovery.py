"""train.py under bad input and faults: one-line errors before anything is written, no run lost,
damaged checkpoints skipped, graceful stops on signals, a lock per run directory, small data on
several ranks. Real processes and signals where the fault is a process fault."""

from __future__ import annotations

import errno
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import flags
import run_dir
import sharding
import train
from conftest import ROOT
from conftest import tiny_argv as argv


def metrics(out_dir) -> list[dict]:
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def fails(capsys, args: list[str]) -> str:
    """train.main(args) must exit 2 with exactly one line on stderr, and no traceback."""
    with pytest.raises(SystemExit) as stopped:
        train.main(args)
    assert stopped.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(err) == 1, err
    return err[0]


BAD_FLAGS = [
    (["--max-steps", "0"], "--max-steps 0: must be at least 1"),
    (["--max-steps", "-3"], "--max-steps -3: must be at least 1"),
    (["--stop-step", "0"], "--stop-step 0: must be at least 1"),
    (["--lr", "-0.1"], "--lr -0.1: must be positive"),
    (["--lr", "nan"], "--lr nan: must be positive"),
    (["--min-lr", "0.1", "--lr", "0.01"], "--min-lr 0.1 is above --lr 0.01"),
    (["--num-workers", "-1"], "--num-workers -1: must be 0 or more"),
    (["--teacher-weight", "-1"], "--teacher-weight -1.0: must be 0 or more"),
    (["--kd-weight", "-2"], "--kd-weight -2.0: must be 0 or more"),
    (["--temperature", "0"], "--temperature 0.0: must be positive"),
    (["--hkl-threshold", "1.5"], "--hkl-threshold 1.5: must be in (0, 1]"),
    (["--betas", "0.9", "1.0"], "--betas 1.0: must be in [0, 1)"),
    (["--keep-last", "0"], "--keep-last 0: must be at least 1"),
    (["--log-every", "0"], "--log-every 0: must be at least 1"),
    (["--grad-accum", "0"], "--grad-accum 0: must be at least 1"),
    (["--seq-len", "1"], "--seq-len 1: must be at least 2"),
    (["--shuffle-buffer", "-5"], "--shuffle-buffer -5: must be 0 (no buffer) or more"),
    (["--projection", "no/such/W.pt"], "projection file no/such/W.pt does not exist"),
    (["--loss", "pkl", "--loss", "gold"], "2 values of --loss for 1 teachers"),
    (["--resume", "--overwrite"], "--resume and --overwrite together"),
]


@pytest.mark.parametrize("extra, message", BAD_FLAGS, ids=[" ".join(b[0]) for b in BAD_FLAGS])
def test_a_bad_flag_is_one_line_before_anything_is_written(tmp_path, cache, capsys, extra, message):
    out_dir = tmp_path / "run"
    assert message in fails(capsys, argv(out_dir, cache, *extra))
    assert not out_dir.exists()


def test_an_out_dir_that_is_a_file_and_a_resume_without_checkpoint_are_errors(
    tmp_path, cache, capsys
):
    (tmp_path / "file").write_text("not a directory")
    assert "is a file" in fails(capsys, argv(tmp_path / "file", cache))
    message = fails(capsys, argv(tmp_path / "new", cache, "--resume"))
    assert "holds no complete checkpoint" in message and "drop --resume" in message
    assert not (tmp_path / "new" / "run_config.json").exists()
    assert not (tmp_path / "new" / run_dir.LOCK).exists()  # released on the error path


def test_a_hub_dataset_while_offline_is_one_line(tmp_path, cache, capsys, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    message = fails(capsys, argv(tmp_path, cache, "--data", "someone/no-such-dataset"))
    assert "cannot load this hub dataset" in message


def test_overwrite_with_a_typo_keeps_the_old_run_until_the_new_one_has_a_checkpoint(
    tmp_path, cache, capsys
):
    train.main(argv(tmp_path, cache, "--max-steps", "2", "--save-every", "2"))
    config = (tmp_path / "run_config.json").read_text()
    message = fails(
        capsys,
        argv(
            tmp_path,
            cache,
            "--overwrite",
            "--max-steps",
            "2",
            "--data",
            str(tmp_path / "typo.jsonl"),
        ),
    )
    assert "no such file" in message
    assert (tmp_path / "step_2").is_dir() and len(metrics(tmp_path)) == 2  # nothing lost
    assert (tmp_path / "run_config.json").read_text() == config
    # a good --overwrite: the old run waits aside until the new run's first checkpoint
    train.main(
        argv(tmp_path, cache, "--overwrite", "--max-steps", "1", "--save-every", "1", "--seed", "7")
    )
    assert not (tmp_path / run_dir.OVERWRITTEN).exists()
    assert [s for s, _ in run_dir.checkpoints(tmp_path)] == [1]
    assert json.loads((tmp_path / "run_config.json").read_text())["args"]["seed"] == 7


def test_a_failed_first_start_writes_no_config_and_the_corrected_rerun_starts(
    tmp_path, cache, capsys
):
    fails(capsys, argv(tmp_path, cache, "--max-steps", "1", "--data", str(tmp_path / "x.jsonl")))
    assert not (tmp_path / "run_config.json").exists()
    train.main(argv(tmp_path, cache, "--max-steps", "1", "--save-every", "1"))
    assert [s for s, _ in run_dir.checkpoints(tmp_path)] == [1]


def test_resume_skips_a_damaged_checkpoint_and_a_half_written_metrics_line(tmp_path, cache, capsys):
    train.main(argv(tmp_path, cache, "--max-steps", "4", "--save-every", "2"))
    unbroken = metrics(tmp_path)
    model = tmp_path / "step_4" / "model.safetensors"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])  # a kill mid-copy
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')  # a kill mid-line
    train.main(argv(tmp_path, cache, "--max-steps", "4", "--save-every", "2", "--resume"))
    captured = capsys.readouterr()
    assert "step_4 is damaged (model.safetensors is truncated)" in captured.err
    assert "resuming from" in captured.out and "step_2" in captured.out
    resumed = metrics(tmp_path)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for got, want in zip(resumed[2:], unbroken[2:]):  # steps 3 and 4 again, exactly
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-6)
    assert run_dir.checkpoint_problem(str(tmp_path / "step_4"), 1) is None  # rewritten


def test_checkpoint_problems_are_found_for_each_file(tmp_path, cache):
    train.main(argv(tmp_path / "run", cache, "--max-steps", "1", "--save-every", "1"))
    good = tmp_path / "run" / "step_1"
    assert run_dir.checkpoint_problem(str(good), 1) is None

    def damaged(name: str, how: str) -> str | None:
        copy = tmp_path / f"{name}-{how}"
        shutil.copytree(good, copy)
        target = copy / name
        if how == "missing":
            target.unlink()
        else:
            target.write_bytes(target.read_bytes()[:100])
        return run_dir.checkpoint_problem(str(copy), 1)

    for name in ("model.safetensors", run_dir.MASTER_WEIGHTS, "trainer_state.pt", "rank_0.pt"):
        assert name in damaged(name, "missing") and name in damaged(name, "truncated")
    assert "rank_1.pt is missing" in run_dir.checkpoint_problem(str(good), 2)


def test_a_full_disk_during_a_save_is_one_line_and_leaves_the_previous_checkpoint(
    tmp_path, cache, capsys, monkeypatch
):
    saves = {"n": 0}
    save = torch.save

    def full_on_second_checkpoint(obj, f, *args, **kwargs):
        if str(f).endswith("trainer_state.pt"):
            saves["n"] += 1
            if saves["n"] == 2:
                raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_on_second_checkpoint)
    message = fails(capsys, argv(tmp_path, cache, "--max-steps", "4", "--save-every", "2"))
    assert "No space left on device" in message and "step_2" in message
    assert [s for s, _ in run_dir.checkpoints(tmp_path)] == [2]
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp_step")]
    assert run_dir.checkpoint_problem(str(tmp_path / "step_2"), 1) is None


def test_rotation_keeps_the_last_checkpoint_before_a_run_of_skipped_steps(
    tmp_path, cache, monkeypatch
):
    clip, calls = sharding.clip_gradients, {"n": 0}

    def diverges_from_step_3(*args, **kwargs):
        calls["n"] += 1
        norm = clip(*args, **kwargs)
        return norm * float("nan") if calls["n"] >= 3 else norm

    monkeypatch.setattr(sharding, "clip_gradients", diverges_from_step_3)
    train.main(
        argv(
            tmp_path,
            cache,
            "--max-steps",
            "5",
            "--save-every",
            "1",
            "--keep-last",
            "1",
            "--max-bad-steps",
            "10",
        )
    )
    assert [s for s, _ in run_dir.checkpoints(tmp_path)] == [2, 5]  # step_2: the last good one


def test_a_second_run_in_the_same_directory_is_refused_and_a_stale_lock_taken_over(
    tmp_path, cache, capsys
):
    tmp_path.joinpath(run_dir.LOCK).write_text(
        json.dumps({"host": os.uname().nodename, "pid": os.getpid()})
    )
    message = fails(capsys, argv(tmp_path, cache, "--max-steps", "1"))
    assert f"in use by the run of pid {os.getpid()}" in message
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    tmp_path.joinpath(run_dir.LOCK).write_text(
        json.dumps({"host": os.uname().nodename, "pid": dead.pid})
    )
    train.main(argv(tmp_path, cache, "--max-steps", "1"))
    assert "stale lock" in capsys.readouterr().out
    assert not tmp_path.joinpath(run_dir.LOCK).exists() and len(metrics(tmp_path)) == 1


def wait_for_step(out_dir, step: int, process, limit: float = 240) -> None:
    deadline = time.time() + limit
    while time.time() < deadline and process.poll() is None:
        path = os.path.join(out_dir, "metrics.jsonl")
        if os.path.exists(path) and sum(1 for _ in open(path)) >= step:
            return
        time.sleep(0.2)
    raise AssertionError(f"step {step} not reached: {process.poll()}")


def test_sigint_stops_after_the_step_with_a_checkpoint_and_the_run_resumes(tmp_path, cache):
    command = [
        sys.executable,
        os.path.join(ROOT, "train.py"),
        *argv(tmp_path, cache, "--max-steps", "200", "--save-every", "1000"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for_step(tmp_path, 2, process)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGINT
    last = metrics(tmp_path)[-1]["step"]
    assert f"stopped by a signal after step {last}" in err.decode()
    assert [s for s, _ in run_dir.checkpoints(tmp_path)] == [last]
    assert "Traceback" not in err.decode() and not (tmp_path / run_dir.LOCK).exists()
    train.main(
        argv(tmp_path, cache, "--max-steps", str(last + 1), "--save-every", "1000", "--resume")
    )
    assert metrics(tmp_path)[-1]["step"] == last + 1


def torchrun(tmp_path, cache, *extra) -> subprocess.Popen:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_port=29533",
        os.path.join(ROOT, "train.py"),
        *argv(tmp_path, cache, *extra),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_sigterm_to_one_rank_of_a_ddp_job_stops_every_rank_with_a_checkpoint(tmp_path, cache):
    import psutil

    process = torchrun(tmp_path, cache, "--max-steps", "200", "--save-every", "1000")
    wait_for_step(tmp_path, 2, process)
    ranks = [
        p for p in psutil.Process(process.pid).children() if "train.py" in " ".join(p.cmdline())
    ]
    assert len(ranks) == 2
    ranks[1].send_signal(signal.SIGTERM)  # one rank only, as a node-local kill would
    _, err = process.communicate(timeout=180)
    last = metrics(tmp_path)[-1]["step"]
    assert f"stopped by a signal after step {last}" in err.decode()
    assert [s for s, _ in run_dir.checkpoints(tmp_path)] == [last]
    assert run_dir.checkpoint_problem(str(tmp_path / f"step_{last}"), 2) is None


def test_fewer_documents_than_ranks_is_one_clear_error_on_every_rank(tmp_path, cache):
    (tmp_path / "one.jsonl").write_text(json.dumps({"text": "a single document"}) + "\n")
    process = torchrun(
        tmp_path / "run", cache, "--data", str(tmp_path / "one.jsonl"), "--max-steps", "2"
    )
    _, err = process.communicate(timeout=240)
    err = err.decode()
    assert process.returncode != 0
    assert "got no documents: the data has fewer documents than ranks" in err
    assert 'train.py", line' not in err  # no traceback from a rank (torchrun reports the exit)


def test_a_bug_keeps_its_traceback_and_the_process_ends_with_its_dataloader_workers(
    tmp_path, cache
):
    script = f"""
import sys
sys.path.insert(0, {ROOT!r})
import losses, train
real, calls = losses.pkl_loss, []
def bug_at_step_2(*args, **kwargs):
    calls.append(1)
    if len(calls) == 2:
        raise RuntimeError("an injected bug")
    return real(*args, **kwargs)
losses.pkl_loss = bug_at_step_2
train.main({argv(tmp_path, cache, "--loss", "pkl", "--max-steps", "5", "--num-workers", "1")!r})
"""
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 1 and "RuntimeError: an injected bug" in done.stderr
    assert "Traceback" in done.stderr and not (tmp_path / run_dir.LOCK).exists()


def test_a_run_from_before_pkl_floor_resumes_with_clamp_and_refuses_add(tmp_path):
    """run_config.json written before --pkl-floor existed: those runs used the clamp floor."""
    from types import SimpleNamespace

    settings = {k: f"value of {k}" for k in flags.RESUME_KEYS if k != "pkl_floor"}
    (tmp_path / "run_config.json").write_text(json.dumps({"args": settings}))
    records = [("the run", run_dir.recorded_fingerprint(str(tmp_path / "run_config.json")))]
    now = SimpleNamespace(**settings, pkl_floor="clamp")
    run_dir.compare_fingerprint(run_dir.fingerprint(now), records, resume=True)
    now.pkl_floor = "add"
    with pytest.raises(ValueError, match=r"--pkl-floor add \(the run: --pkl-floor clamp\)"):
        run_dir.compare_fingerprint(run_dir.fingerprint(now), records, resume=True)


def test_kd_pkl_passes_the_floor_to_the_loss(monkeypatch):
    from types import SimpleNamespace

    seen = {}
    monkeypatch.setattr(train.losses, "pkl_loss", lambda *a, **kw: seen.update(kw))
    batch = {"student_chunk_0": None, "teacher_chunk_0": None}
    args = SimpleNamespace(vocab_topk=8, temperature=1.0, pkl_floor="add", loss_impl="blocked")
    teacher = SimpleNamespace(W=None, loss="pkl", vocab=3)
    train.kd_loss(teacher, None, torch.zeros(1, 1, 3), batch, 0, args)
    assert seen == {"vocab_topk": 8, "temperature": 1.0, "floor": "add"}


# ---- issue 27: nothing lost, nothing silent (a run of 2 steps, copied by each test) ------------


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, cache) -> str:
    """A tiny run of 2 steps with its checkpoint step_2, copied by the tests below."""
    out = tmp_path_factory.mktemp("base") / "run"
    train.main(argv(out, cache, "--max-steps", "2", "--save-every", "2"))
    return str(out)


def copy_of(base_run: str, tmp_path) -> str:
    out = str(tmp_path / "run")
    shutil.copytree(base_run, out)
    return out


def test_an_overwrite_that_dies_before_its_first_checkpoint_loses_nothing_to_the_next(
    base_run, tmp_path, cache, capsys
):
    out = copy_of(base_run, tmp_path)
    aside = os.path.join(out, run_dir.OVERWRITTEN)
    # an --overwrite run that ends before its first checkpoint (as one killed before it would)
    no_checkpoint = ("--overwrite", "--max-steps", "1", "--save-every", "0", "--seed", "5")
    train.main(argv(out, cache, *no_checkpoint))
    assert os.path.isdir(os.path.join(aside, "step_2")) and len(metrics(out)) == 1
    # neither a --resume nor a plain start replaces the run waiting aside; both say where it is
    assert aside in fails(capsys, argv(out, cache, "--resume", "--seed", "5"))
    assert "--overwrite" in fails(capsys, argv(out, cache, "--seed", "5"))
    train.main(argv(out, cache, *no_checkpoint))  # the next --overwrite keeps it, and the dead one
    assert "beside the run an earlier --overwrite moved" in capsys.readouterr().out
    assert os.path.isdir(os.path.join(aside, "step_2"))
    assert {"metrics.jsonl", "run_config.json"} <= set(os.listdir(os.path.join(aside, "later-1")))
    assert json.load(open(os.path.join(aside, "run_config.json")))["args"]["seed"] == 1337
    train.main(argv(out, cache, "--overwrite", "--max-steps", "1", "--save-every", "1"))
    assert not os.path.exists(aside) and [s for s, _ in run_dir.checkpoints(out)] == [1]


def test_a_full_disk_in_torch_save_is_one_line_with_the_free_space_and_leaves_no_temp(
    base_run, tmp_path, cache, capsys, monkeypatch
):
    out = copy_of(base_run, tmp_path)
    os.makedirs(os.path.join(out, ".tmp_step_7"))  # a save a kill interrupted: removed at start
    save = torch.save

    def full_disk(obj, f, *args, **kwargs):  # what torch.save raises on a full disk
        if str(f).endswith("rank_0.pt"):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576")
        return save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    message = fails(capsys, argv(out, cache, "--resume", "--max-steps", "3", "--save-every", "1"))
    assert os.path.join(out, "step_3") in message and "RuntimeError: [enforce fail" in message
    assert " free on " in message and "the latest complete checkpoint is step_2" in message
    assert [p for p in os.listdir(out) if p.startswith(".tmp_step")] == []
    assert [s for s, _ in run_dir.checkpoints(out)] == [2]


def test_a_full_disk_while_appending_metrics_is_a_warning_and_the_record_waits(
    base_run, tmp_path, cache, capsys, monkeypatch
):
    out = copy_of(base_run, tmp_path)
    append, calls = run_dir.append, []

    def full_once(path, data):
        calls.append(data)
        if len(calls) == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return append(path, data)

    monkeypatch.setattr(run_dir, "append", full_once)
    train.main(argv(out, cache, "--resume", "--max-steps", "4", "--save-every", "0"))
    err = capsys.readouterr().err
    assert "cannot append to" in err and "No space left on device" in err and " free on " in err
    assert "Traceback" not in err and [r["step"] for r in metrics(out)] == [1, 2, 3, 4]


def test_append_cuts_a_failed_write_back_to_the_last_whole_line(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n')
    write = os.write

    def half_then_full(fd, data):
        if len(data) > 4:
            return write(fd, bytes(data[:4]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(OSError):
        run_dir.append(str(path), b'{"step": 2}\n')
    monkeypatch.undo()
    assert path.read_text() == '{"step": 1}\n'


def test_a_copied_checkpoint_resumes_only_with_its_own_settings(base_run, tmp_path, cache, capsys):
    copied = tmp_path / "copied"  # no run_config.json: the checkpoint's own record decides
    shutil.copytree(os.path.join(base_run, "step_2"), copied / "step_2")
    extra = ("--resume", "--seq-len", "32", "--loss", "hkl", "--text-field", "body")
    message = fails(capsys, argv(copied, cache, *extra))
    assert f"checkpoint {copied / 'step_2'} was written with another configuration" in message
    for flag in ("--seq-len 32 (the run: --seq-len 64)", "--loss hkl", "--text-field body"):
        assert flag in message
    assert "--overwrite" in message
    message = fails(capsys, argv(copied, cache, "--resume", "--num-workers", "2"))
    assert "--num-workers 2 (the run: --num-workers 1" in message


def test_another_w_file_or_changed_data_is_refused_on_resume(base_run, tmp_path, cache, capsys):
    out = copy_of(base_run, tmp_path)
    (w_file,) = glob.glob(os.path.join(cache, "W-*-128320x151669.pt"))  # Llama-3.2 -> Qwen3
    projection = torch.load(w_file, weights_only=True)
    projection["params"] = {**projection["params"], "rebuilt": 1}  # another W, the same shape
    other = str(tmp_path / "W_other.pt")
    torch.save(projection, other)
    message = fails(capsys, argv(out, cache, "--resume", "--projection", other))
    assert "--projection: teacher pkg:qwen3's W is another (content sha256" in message
    with open(os.path.join(out, "tiny_corpus", "more.txt"), "w") as f:
        f.write("a document the run never saw")
    message = fails(capsys, argv(out, cache, "--resume"))
    assert "--data: its files changed since the run read them (added more.txt)" in message


def test_a_run_and_checkpoint_from_before_the_fingerprint_resume_with_a_warning(
    base_run, tmp_path, cache, capsys
):
    out = copy_of(base_run, tmp_path)
    config = json.load(open(os.path.join(out, "run_config.json")))
    del config["fingerprint"]
    json.dump(config, open(os.path.join(out, "run_config.json"), "w"))
    state_path = os.path.join(out, "step_2", "trainer_state.pt")
    state = torch.load(state_path, weights_only=True)
    del state["fingerprint"]
    torch.save(state, state_path)
    message = fails(capsys, argv(out, cache, "--resume", "--seq-len", "32"))  # flags: checked
    assert "--seq-len 32 (the run: --seq-len 64)" in message
    train.main(argv(out, cache, "--resume", "--max-steps", "3", "--save-every", "0"))
    err = capsys.readouterr().err
    assert "predates projection_sha256, data_files: not checked against it" in err
    assert [r["step"] for r in metrics(out)] == [1, 2, 3]
    assert "fingerprint" in json.load(open(os.path.join(out, "run_config.json")))


def test_a_checkpoint_of_another_number_of_processes_is_not_called_damaged(
    base_run, tmp_path, cache, capsys
):
    from types import SimpleNamespace

    out = copy_of(base_run, tmp_path)
    args = train.parse_args(argv(out, cache, "--resume"))
    job = SimpleNamespace(world_size=2, lock=run_dir.RunLock(out))  # a 2-process resume of it
    with pytest.raises(ValueError) as error:
        run_dir.inspect_run_dir(args, job)
    job.lock.release()
    message = str(error.value)
    assert "2 processes (the run: 1;" in message and "--nproc_per_node" in message
    assert "damaged" not in message and "drop --resume" not in message
    # a checkpoint of 2 processes resumed by 1: the same, the other way
    step = os.path.join(out, "step_2")
    shutil.copy(os.path.join(step, "rank_0.pt"), os.path.join(step, "rank_1.pt"))
    state = torch.load(os.path.join(step, "trainer_state.pt"), weights_only=True)
    fingerprint = json.loads(state["fingerprint"])
    state["world_size"], state["fingerprint"] = 2, json.dumps({**fingerprint, "processes": 2})
    torch.save(state, os.path.join(step, "trainer_state.pt"))
    os.remove(os.path.join(out, "run_config.json"))
    message = fails(capsys, argv(out, cache, "--resume"))
    assert "1 process (the run: 2;" in message and "damaged" not in message
