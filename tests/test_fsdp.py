"""2-process torchrun jobs of the tiny preset on CPU (gloo, fp32), DDP and --fsdp, each SIGKILLed
while it writes its last checkpoint and then resumed.

One configuration covers every KD family: three teachers, P-KL (Qwen3), H-KL (o200k) and
same-tokenizer KL (Llama-3.2), 2 micro-steps a step, 6 steps, checkpoints at steps 3 and 6. A
job killed while writing step 6 has logged all 6 steps: those records are the unbroken run's,
and the resumed job recomputes steps 4..6 from step 3.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch
from transformers import AutoModelForCausalLM

import run_dir
import sharding
from conftest import ROOT, read_metrics

TEACHERS = [
    *("--teacher", "pkg:qwen3", "--loss", "pkl", "--teacher-weight", "0.5"),
    *("--teacher", "pkg:o200k", "--loss", "hkl", "--teacher-weight", "0.3"),
    *("--teacher", "pkg:llama-3.2", "--loss", "kl", "--teacher-weight", "0.2"),
]


def torchrun(out_dir, cache: str, *extra: str) -> subprocess.Popen:
    cmd = [
        *(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"),
        *("--master_port", str(30000 + os.getpid() % 500 + 500 * ("--fsdp" in extra))),
        *("train.py", "--preset", "tiny", "--out-dir", str(out_dir)),
        *("--projection-cache", cache, "--num-workers", "1", *TEACHERS),
        *("--grad-accum", "2", "--max-steps", "6", "--save-every", "3", *extra),
    ]
    return subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def kill_during_the_last_save(out_dir, cache: str, *extra: str) -> tuple[list[dict], str]:
    """The job, SIGKILLed (launcher and every worker) while its step-6 checkpoint is being
    written (--fsdp: once its ranks write their shards); (the records it logged, its output up
    to the kill)."""
    job = torchrun(out_dir, cache, *extra)
    writing = os.path.join(out_dir, ".tmp_step_6", *([sharding.SHARDED] if extra else []))
    deadline = time.time() + 600
    while not os.path.exists(writing):
        assert job.poll() is None and time.time() < deadline, "the job ended before the kill"
        time.sleep(0.002)
    # torchrun's workers run in sessions of their own: killing the launcher's process group
    # would leave them running. Kill the launcher and every descendant, found before the kill.
    launcher = psutil.Process(job.pid)
    for process in [launcher, *launcher.children(recursive=True)]:
        process.send_signal(signal.SIGKILL)
    output = job.communicate(timeout=60)[0]
    time.sleep(2)  # a worker that survived the kill would finish the save
    assert job.returncode == -signal.SIGKILL
    assert not os.path.exists(os.path.join(out_dir, "step_6")), "the save ended before the kill"
    return read_metrics(out_dir), output


@pytest.fixture(scope="module")
def jobs(tmp_path_factory, cache) -> dict:
    """For DDP and FSDP: the records of the killed job (steps 1..6), its output, the records
    after --resume, and the run directory."""
    out = {}
    for mode, extra in (("ddp", ()), ("fsdp", ("--fsdp",))):
        out_dir = tmp_path_factory.mktemp(mode)
        killed, output = kill_during_the_last_save(out_dir, cache, *extra)
        assert [r["step"] for r in killed] == list(range(1, 7)), output[-3000:]
        previous = run_dir.checkpoints(str(out_dir))
        problem = run_dir.checkpoint_problem(str(out_dir / "step_3"), world_size=2)
        consolidated = load_consolidated(out_dir / "step_3", mode)
        resumed = torchrun(out_dir, cache, "--resume", *extra)
        resumed_output = resumed.communicate(timeout=600)[0]
        assert resumed.returncode == 0, resumed_output[-3000:]
        out[mode] = dict(
            killed=killed,
            output=output,
            previous=previous,
            problem=problem,
            consolidated=consolidated,
            resumed=read_metrics(out_dir),
            out_dir=out_dir,
        )
    return out


def load_consolidated(path, mode: str) -> tuple[dict, dict] | None:
    """(the save_pretrained copy as transformers loads it, the fp32 weights gathered from the
    shards in this one process): FSDP only."""
    if mode != "fsdp":
        return None
    model = AutoModelForCausalLM.from_pretrained(path, dtype="auto")
    loaded = model.state_dict()
    # DCP reads every rank's shard into whole tensors (it reshards on load: no process group)
    gathered = {"student." + k: torch.empty_like(v, dtype=torch.float32) for k, v in loaded.items()}
    gathered.pop("student.lm_head.weight")  # tied: the embedding
    state = {"model": gathered}
    import torch.distributed.checkpoint as dcp

    reader = sharding.SafeReader(os.path.join(path, sharding.SHARDED))
    dcp.load(state, storage_reader=reader, planner=sharding.TensorsOnly(), no_dist=True)
    return loaded, state["model"]


KEYS = ("loss", "ce", "kd", "kd_scale", "kd/pkg:qwen3", "kd/pkg:o200k", "kd/pkg:llama-3.2")


def test_fsdp_gives_the_losses_of_ddp_for_pkl_hkl_and_kl_teachers(jobs):
    ddp, fsdp = jobs["ddp"]["killed"], jobs["fsdp"]["killed"]
    assert [r["step"] for r in fsdp] == [r["step"] for r in ddp] == list(range(1, 7))
    for a, b in zip(ddp, fsdp):
        for key in KEYS:
            assert b[key] == pytest.approx(a[key], abs=1e-5), (a["step"], key)
        # the gradient norm: FSDP sums the shards' squares, DDP takes one float32 norm of each
        # whole gradient; over the 8M embedding entries the two differ by ~1e-4 at step 1 (the
        # float64 norm 1.23377, DDP 1.23360, FSDP 1.23368 in a one-teacher run); the clipped updates
        # differ by as much: the losses stay within 1e-5
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3)
    assert all(r["kd/pkg:o200k"] != 0 and r["kd/pkg:llama-3.2"] > 0 for r in fsdp)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_a_job_killed_during_a_save_resumes_from_the_previous_checkpoint_exactly(jobs, mode):
    job = jobs[mode]
    assert [s for s, _ in job["previous"]] == [3]  # step 6 never appeared: only its temp
    assert job["problem"] is None  # step 3 verifies: the kill left it complete
    before = {r["step"]: r for r in job["killed"]}
    assert [r["step"] for r in job["resumed"]] == list(range(1, 7))
    for r in job["resumed"][3:]:  # computed again from step 3
        for key in KEYS:
            assert r[key] == pytest.approx(before[r["step"]][key], abs=1e-6), (r["step"], key)
    assert [s for s, _ in run_dir.checkpoints(str(job["out_dir"]))] == [3, 6]
    assert not os.path.exists(job["out_dir"] / ".tmp_step_6")


def test_fsdp_checkpoints_are_shards_plus_a_copy_that_transformers_loads(jobs):
    step = jobs["fsdp"]["out_dir"] / "step_6"
    assert sorted(os.listdir(step / sharding.SHARDED)) == [
        ".metadata",
        "__0_0.distcp",
        "__1_0.distcp",
        sharding.PARAM_GROUPS,
    ]
    assert not os.path.exists(step / run_dir.MASTER_WEIGHTS)  # the shards hold the fp32 weights
    loaded, gathered = jobs["fsdp"]["consolidated"]
    assert next(iter(loaded.values())).dtype == torch.bfloat16
    assert len(gathered) == len(loaded) - 1
    for name, weights in gathered.items():
        assert torch.equal(loaded[name.removeprefix("student.")], weights.to(torch.bfloat16)), name


def test_each_fsdp_rank_holds_half_of_the_students_weights_and_optimizer_state(jobs):
    line = next(x for x in jobs["fsdp"]["output"].splitlines() if "memory:" in x)
    share = float(line.split(" of the whole")[0].rsplit(", ", 1)[1])
    assert share == pytest.approx(0.5, abs=0.01), line
    line = next(x for x in jobs["ddp"]["output"].splitlines() if "memory:" in x)
    assert ", 1.000 of the whole" in line


def test_a_damaged_shard_makes_the_checkpoint_unusable_for_resume(jobs, tmp_path):
    import shutil

    step = tmp_path / "step_6"
    shutil.copytree(jobs["fsdp"]["out_dir"] / "step_6", step)
    assert run_dir.checkpoint_problem(str(step), world_size=2) is None
    shard = step / sharding.SHARDED / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])
    assert "__1_0.distcp is truncated" in run_dir.checkpoint_problem(str(step), world_size=2)
    (step / sharding.SHARDED / "__1_0.distcp").unlink()
    assert "is missing" in run_dir.checkpoint_problem(str(step), world_size=2)


def test_metadata_naming_any_other_class_is_refused(tmp_path):
    import pickle

    (tmp_path / ".metadata").write_bytes(pickle.dumps(os.system))  # would run a command
    with pytest.raises(pickle.UnpicklingError, match="posix.system"):
        sharding.read_metadata(str(tmp_path))
    assert "unreadable (UnpicklingError)" in sharding.problem(str(tmp_path))
    # a dotted name inside an allowed module (protocol 4 walks the dots): os.system again
    module, name = b"torch.distributed.checkpoint.metadata", b"os.system"
    dotted = b"\x80\x04" + b"\x8c" + bytes([len(module)]) + module
    dotted += b"\x8c" + bytes([len(name)]) + name + b"\x93" + b"\x8c\x04true\x85R."
    (tmp_path / ".metadata").write_bytes(dotted)
    with pytest.raises(pickle.UnpicklingError, match="os.system"):
        sharding.read_metadata(str(tmp_path))


@pytest.fixture
def one_rank(tmp_path):
    """A process group of this process alone (gloo), for FSDP in this process."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_a_shard_saved_before_any_step_restores_a_fresh_optimizer(one_rank, tmp_path):
    from flags import tiny_model

    def sharded_student():
        torch.manual_seed(0)
        model = tiny_model("llama", 256, 16)
        sharding.shard_model(model, cuda=False, trained=True)
        return model, torch.optim.AdamW(model.parameters(), lr=1e-2)

    model, optimizer = sharded_student()
    sharding.save_sharded(str(tmp_path / "fresh"), model, [], optimizer)
    assert not optimizer.state  # saving made no optimizer step
    model.model.embed_tokens.weight.grad = None
    ids = torch.randint(0, 256, (2, 16))
    model(input_ids=ids).logits.float().pow(2).mean().backward()
    optimizer.step()
    sharding.save_sharded(str(tmp_path / "stepped"), model, [], optimizer)

    again, fresh = sharded_student()
    sharding.load_sharded(str(tmp_path / "fresh"), again, [], fresh)
    assert not fresh.state
    again, stepped = sharded_student()
    sharding.load_sharded(str(tmp_path / "stepped"), again, [], stepped)
    for p, q in zip(model.parameters(), again.parameters(), strict=True):
        assert torch.equal(p.full_tensor(), q.full_tensor())
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(
                sharding.local(optimizer.state[p][key]), sharding.local(stepped.state[q][key])
            )


@pytest.mark.parametrize("trained", [False, True], ids=["teacher", "student"])
def test_a_teacher_keeps_only_its_shards_after_its_forward(one_rank, trained):
    from torch.distributed.tensor import DTensor

    from flags import tiny_model

    model = tiny_model("qwen3", 256, 16).requires_grad_(trained)
    sharding.shard_model(model, cuda=False, trained=trained)
    with torch.no_grad():
        model(input_ids=torch.randint(0, 256, (2, 16)))
    # a teacher's root (embeddings, output layer) is freed; the student's waits for its backward
    assert isinstance(model.lm_head.weight, DTensor) == (not trained)
    assert all(isinstance(p, DTensor) for p in model.model.layers[0].parameters())
