"""train.py with the tiny preset: every loss, several teachers, DDP on CPU, exact resume, errors.

The tiny preset builds small random Llama/Qwen3 models sized to the REAL tokenizers' vocabularies
and a local corpus; W is built once into a shared cache directory for the whole module.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

import blocked
import fused_head
import losses
import run_dir
import sharding
import train
from conftest import ROOT, read_metrics, tiny_argv


def run(out_dir, cache: str, *extra: str) -> list[dict]:
    """train.main in this process; returns the metrics.jsonl records."""
    train.main(tiny_argv(out_dir, cache, *extra))
    return read_metrics(out_dir)


@pytest.mark.parametrize("loss", ["pkl", "hkl", "gold", "uld"])
def test_each_cross_tokenizer_loss_trains_and_logs(tmp_path, cache, loss):
    records = run(tmp_path, cache, "--loss", loss, "--max-steps", "2")
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        assert {"step", "loss", "ce", "kd", "lr", "tokens_per_s", "grad_norm"} <= r.keys()
        assert math.isfinite(r["loss"]) and r["kd"] != 0
        # dynamic scaling (METHOD.md 5.5): sg(CE/|KD|) * KD + CE = CE + sign(KD) * CE; GOLD's
        # and H-KL's KD (a KL over some ids only) can be < 0, and then the loss is 0
        expected = 2 * r["ce"] if r["kd"] > 0 else 0.0
        assert r["loss"] == pytest.approx(expected, rel=1e-5, abs=1e-5 * r["ce"])
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
    assert r["kd_scale"] == pytest.approx(0.1)  # the applied scale


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
    checkpointed = run(
        tmp_path / "gc", cache, "--loss", "pkl", "--max-steps", "2", "--gradient-checkpointing"
    )
    for a, b in zip(plain, checkpointed):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)


def test_checkpoint_loads_with_transformers(tmp_path, cache):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run(tmp_path, cache, "--loss", "pkl", "--max-steps", "1")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "step_1")
    tok = AutoTokenizer.from_pretrained(tmp_path / "step_1")
    assert model.config.vocab_size >= len(tok) == 128_257


def test_non_finite_loss_skips_the_step_and_too_many_stop_the_run(tmp_path, cache, monkeypatch):
    real = losses.objective
    calls = {"n": 0}

    def sometimes_nan(*args, **kwargs):
        calls["n"] += 1
        loss, scale = real(*args, **kwargs)
        return (loss * float("nan") if calls["n"] == 2 else loss), scale

    monkeypatch.setattr(losses, "objective", sometimes_nan)
    records = run(tmp_path / "one", cache, "--loss", "pkl", "--max-steps", "3")
    assert [r["skipped"] for r in records] == [0, 1, 1]
    assert math.isnan(records[1]["grad_norm"])

    always_nan = lambda *a, **k: (real(*a, **k)[0] * float("nan"), real(*a, **k)[1])  # noqa: E731
    monkeypatch.setattr(losses, "objective", always_nan)
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
    assert [s for s, _ in run_dir.checkpoints(str(tmp_path))] == [1, 2]
    records = run(tmp_path, cache, "--loss", "pkl", "--max-steps", "3", "--resume")
    assert [r["step"] for r in records] == [1, 2, 3]


# ----------------------------------------------------------------------------- DDP and resume


# (2-process jobs killed and resumed, DDP and --fsdp: test_fsdp.py)


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


# ---- the exact objective under accumulation and DDP (METHOD.md 5.5) ---------------------------

SHORT_DOCS = [
    f"Note {i}: {i * 37} cats sat on {i + 2} mats in Zürich." * (1 + i % 3) for i in range(16)
]


def short_corpus(tmp_path) -> str:
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in SHORT_DOCS))
    return str(path)


# one optimizer step, checkpointed with fp32 weights (compared to 1e-5), over the short corpus's
# documents in order, one per window
ONE_STEP = (
    "--max-steps",
    "1",
    "--save-every",
    "1",
    "--save-dtype",
    "float32",
    "--no-shuffle",
    "--no-pack",
    "--seq-len",
    "256",
)


def first_step(out_dir, cache, data_path, *extra) -> tuple[dict, dict]:
    """(metrics, student weights) after one optimizer step on the short corpus."""
    from safetensors.torch import load_file

    records = run(out_dir, cache, "--data", data_path, *ONE_STEP, *extra)
    return records[0], load_file(os.path.join(out_dir, "step_1", "model.safetensors"))


def assert_same_update(a: tuple[dict, dict], b: tuple[dict, dict]) -> None:
    # grad_norm is taken before clipping: unlike Adam's first step it sees the gradient's scale
    for key in ("loss", "ce", "kd", "grad_norm", "tokens"):
        assert a[0][key] == pytest.approx(b[0][key], rel=1e-5, abs=1e-7), key
    for name, weight in a[1].items():
        torch.testing.assert_close(weight, b[1][name], rtol=0, atol=1e-5)


STATIC_TWO_TEACHERS = (
    "--teacher",
    "pkg:qwen3",
    "--loss",
    "pkl",
    "--teacher",
    "pkg:llama-3.2",
    "--loss",
    "kl",
    "--kd-scaling",
    "static",
    "--vocab-topk",
    "0",
)


def test_accumulation_gives_the_update_of_one_big_batch(tmp_path, cache):
    data_path = short_corpus(tmp_path)
    whole = first_step(
        tmp_path / "a",
        cache,
        data_path,
        "--batch-size",
        "4",
        "--grad-accum",
        "1",
        *STATIC_TWO_TEACHERS,
    )
    halves = first_step(
        tmp_path / "b",
        cache,
        data_path,
        "--batch-size",
        "2",
        "--grad-accum",
        "2",
        *STATIC_TWO_TEACHERS,
    )
    assert_same_update(whole, halves)
    # windows of very different lengths: a mean of micro-batch means would differ
    quarters = first_step(
        tmp_path / "c",
        cache,
        data_path,
        "--batch-size",
        "1",
        "--grad-accum",
        "4",
        *STATIC_TWO_TEACHERS,
    )
    assert_same_update(whole, quarters)


def test_two_ranks_give_the_update_of_one_rank_over_the_same_windows(tmp_path, cache):
    # unpacked and unshuffled, document i goes to rank i % 2: 2 ranks x 1 window per micro-step
    # see the windows that 1 rank sees in micro-steps of 2
    data_path = short_corpus(tmp_path)
    one = first_step(
        tmp_path / "one",
        cache,
        data_path,
        "--batch-size",
        "2",
        "--grad-accum",
        "2",
        *STATIC_TWO_TEACHERS,
    )
    argv = tiny_argv(
        tmp_path / "two",
        cache,
        "--data",
        data_path,
        *ONE_STEP,
        "--batch-size",
        "1",
        "--grad-accum",
        "2",
        *STATIC_TWO_TEACHERS,
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--master_port=29517",
            os.path.join(ROOT, "train.py"),
            *argv,
        ],
        check=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
    )
    from safetensors.torch import load_file

    two = (
        read_metrics(tmp_path / "two")[0],
        load_file(os.path.join(tmp_path / "two", "step_1", "model.safetensors")),
    )
    assert_same_update(one, two)


def test_dynamic_scale_is_taken_per_micro_step_from_its_own_means(tmp_path, cache):
    data_path = short_corpus(tmp_path)
    frozen = ("--lr", "1e-30", "--min-lr", "1e-30")  # two steps that see the same weights
    same = ("--data", data_path, "--no-shuffle", "--no-pack", "--seq-len", "256")
    same += ("--batch-size", "2", *frozen)
    singles = run(tmp_path / "a", cache, *same, "--max-steps", "2")
    accumulated = run(tmp_path / "b", cache, *same, "--max-steps", "1", "--grad-accum", "2")
    ratios = [r["ce"] / r["kd"] for r in singles]  # each micro-batch's own CE / KD
    assert ratios[0] != pytest.approx(ratios[1], rel=1e-3)
    assert accumulated[0]["kd_scale"] == pytest.approx(sum(ratios) / 2, rel=1e-5)
    assert [r["kd_scale"] for r in singles] == pytest.approx(ratios, rel=1e-5)
    # --kd-scale-max caps each micro-step's scale (METHOD.md 5.5)
    cap = min(ratios) / 2
    capped = run(
        tmp_path / "c",
        cache,
        *same,
        "--max-steps",
        "1",
        "--grad-accum",
        "2",
        "--kd-scale-max",
        str(cap),
    )
    assert capped[0]["kd_scale"] == pytest.approx(cap, rel=1e-6)


def test_metrics_count_the_real_tokens_of_packed_steps(tmp_path, cache):
    records = run(tmp_path, cache, "--loss", "pkl", "--max-steps", "2", "--grad-accum", "2")
    for r in records:  # tiny preset: 2 windows of 64 per micro-step, packed full
        assert 0.95 * 2 * 2 * 64 <= r["tokens"] <= 2 * 2 * 64


def test_non_finite_gradients_and_teacher_logits_skip_the_step(tmp_path, cache, monkeypatch):
    calls = {"clip": 0, "pkl": 0}
    clip, pkl = sharding.clip_gradients, losses.pkl_loss

    def nan_norm_at_step_2(*args, **kwargs):
        calls["clip"] += 1
        norm = clip(*args, **kwargs)
        return norm * float("nan") if calls["clip"] == 2 else norm

    def bad_teacher_at_call_3(*args, **kwargs):
        calls["pkl"] += 1
        if calls["pkl"] == 3:
            raise ValueError(losses.NON_FINITE)
        return pkl(*args, **kwargs)

    monkeypatch.setattr(sharding, "clip_gradients", nan_norm_at_step_2)
    monkeypatch.setattr(losses, "pkl_loss", bad_teacher_at_call_3)
    records = run(tmp_path, cache, "--loss", "pkl", "--max-steps", "4")
    assert [r["skipped"] for r in records] == [0, 1, 2, 2]
    assert math.isfinite(records[1]["loss"]) and not math.isfinite(records[1]["grad_norm"])
    assert not math.isfinite(records[2]["loss"])


def test_a_sentencepiece_student_distils_from_its_own_tokenizer_with_kl(tmp_path, cache):
    records = run(
        tmp_path,
        cache,
        "--student",
        "pkg:mistral-v1",
        "--teacher",
        "pkg:mistral-v1",
        "--loss",
        "kl",
        "--max-steps",
        "3",
    )
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(math.isfinite(r["kd"]) and r["kd"] > 0 for r in records)


# ---- padded teacher vocabularies (METHOD.md 0) --------------------------------------------------


def test_padded_teacher_rows_never_reach_the_losses(W_llama_qwen, qwen, llama):
    n = len(qwen)
    padded = train.tiny_model("qwen3", n + 64, 32)
    with torch.no_grad():  # padded rows that win every softmax and every top-k
        padded.get_output_embeddings().weight[n:] = 50.0 * padded.model.norm.weight.sign()
    ids = torch.tensor([qwen("The 201 cats sat.")["input_ids"]])
    before = padded(input_ids=ids).logits
    assert before[..., n:].max() > before[..., :n].max() + 10
    train.trim_output_vocabulary(padded, n)
    after = padded(input_ids=ids).logits
    assert after.shape[-1] == n
    torch.testing.assert_close(after, before[..., :n])
    # a W built for the padded layer has empty padded columns: cut, it equals W for n columns
    from build_projection import build_projection

    wide = build_projection(llama, qwen, teacher_vocab_size=n + 64)["W"]
    cut = train.drop_padded_columns(wide, n, "W.pt")
    assert cut.shape == (W_llama_qwen["W"].shape[0], n)
    want = W_llama_qwen["W"].coalesce()
    assert torch.equal(cut.indices(), want.indices()) and torch.equal(cut.values(), want.values())


def test_same_tokenizer_teacher_padding_is_masked_out_of_kl():
    t = train.Teacher("t", None, None, "kl", 1.0, vocab=5)
    args = train.parse_args(["--vocab-topk", "0"])
    s_logits = torch.randn(1, 3, 8)
    t_logits = torch.randn(1, 3, 8)
    t_logits[..., 5:] = 100.0  # padding that would take all of p_T
    batch = {"labels": torch.tensor([[1, 2, -100]])}
    got = train.kd_loss(t, s_logits, t_logits.clone(), batch, 0, args)
    p_t = torch.softmax(t_logits[..., :5], -1)  # the reference: KL over the real ids only
    log_ps = torch.log_softmax(s_logits, -1)[..., :5]
    want = (p_t * (p_t.log() - log_ps)).sum(-1)[0, :2].mean()
    torch.testing.assert_close(got, want)


def test_the_fused_head_trains_as_the_logits_do(tmp_path, cache):
    # P-KL and a same-tokenizer KL teacher; the tiny student ties its output layer to the input
    # embedding: the fused head's weight gradient adds to the embedding's
    teachers = ("--loss", "pkl", "--teacher", "pkg:qwen3", "--teacher", "pkg:llama-3.2", "--loss")
    extra = (*teachers, "kl", "--max-steps", "2", "--grad-accum", "2", "--save-every", "0")
    fused = run(tmp_path / "fused", cache, *extra)
    logits = run(tmp_path / "logits", cache, *extra, "--no-fused-head")
    for a, b in zip(fused, logits, strict=True):
        for key in ("loss", "ce", "kd", "kd/pkg:qwen3", "kd/pkg:llama-3.2", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (a["step"], key)
    # (the gradients themselves: test_losses.py, to 1e-5; weights after AdamW steps are not a
    # fair check: a float32-rounding difference in a near-zero gradient moves its update by ~lr)


@pytest.mark.parametrize(
    "teachers",
    [
        ("pkg:qwen3", "pkl", "pkg:o200k", "hkl", "pkg:llama-3.2", "kl"),
        ("pkg:qwen3", "gold", "pkg:o200k", "uld"),
    ],
    ids=["pkl-hkl-kl", "gold-uld"],
)
def test_the_plain_losses_train_as_the_blocked_ones(tmp_path, cache, teachers):
    # --loss-impl plain: losses.py's *_plain references on the whole logits (what a reader steps
    # through); the default: the same equations block by block, with the fused head
    flags = [x for name, loss in zip(teachers[::2], teachers[1::2]) for x in (
        "--teacher", name, "--loss", loss)]  # fmt: skip
    extra = (*flags, "--max-steps", "3", "--grad-accum", "2", "--save-every", "0")
    blocked_run = run(tmp_path / "blocked", cache, *extra)
    plain_run = run(tmp_path / "plain", cache, *extra, "--loss-impl", "plain")
    keys = ["loss", "ce", "kd", "kd_scale", "grad_norm", *(f"kd/{n}" for n in teachers[::2])]
    for a, b in zip(blocked_run, plain_run, strict=True):
        for key in keys:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (a["step"], key)
    assert len(plain_run) == 3


def test_compiled_forward_passes_give_the_eager_losses(tmp_path, cache):
    # torch.compile (inductor: C++ on a CPU) of the student's and the teacher's forward
    extra = ("--loss", "pkl", "--max-steps", "2", "--save-every", "0")
    compiled = run(tmp_path / "compiled", cache, *extra, "--compile")
    eager = run(tmp_path / "eager", cache, *extra)
    for a, b in zip(compiled, eager, strict=True):
        for key in ("loss", "ce", "kd", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-4), (a["step"], key)


def test_an_unknown_attention_implementation_is_one_line(tmp_path, cache, capsys):
    message = fails_with(capsys, cache, tmp_path, "--attn-implementation", "nope")
    assert "nope" in message


def test_a_student_whose_output_layer_is_not_h_w_is_trained_on_its_whole_logits():
    student = train.tiny_model("llama", 256, 16)
    assert fused_head.fused_head_problem(student) is None
    student.config.final_logit_softcapping = 30.0  # Gemma 2's cap: logits = 30 tanh(h W^T / 30)
    assert "final_logit_softcapping" in fused_head.fused_head_problem(student)
    student = train.tiny_model("llama", 256, 16)
    student.lm_head = torch.nn.Linear(64, 256, bias=True)
    assert "without bias" in fused_head.fused_head_problem(student)


def test_logits_that_are_not_h_w_stop_the_run_at_once(tmp_path, cache, capsys, monkeypatch):
    real = blocked.Head.logits
    monkeypatch.setattr(blocked.Head, "logits", lambda self, *a: real(self, *a) * 2)
    message = fails_with(capsys, cache, tmp_path, "--loss", "pkl")
    assert "--fused-head" in message and "--no-fused-head" in message


def test_a_logit_multiplier_no_config_name_announces_stops_the_fused_head():
    # Falcon-H1 multiplies its logits by lm_head_multiplier: at 0.9 on a fresh model the logits
    # differ from h W^T by less than the old absolute tolerance (0.16); relatively, by 10%
    from transformers import FalconH1Config, FalconH1ForCausalLM

    shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, head_dim=16)
    mamba = dict(mamba_d_ssm=64, mamba_n_heads=4, mamba_d_head=16, mamba_d_state=16)
    for multiplier, problem in ((0.9, "differ by 0.1"), (1.0, None)):
        torch.manual_seed(0)
        config = FalconH1Config(
            vocab_size=256, num_attention_heads=4, num_key_value_heads=2, mamba_chunk_size=16,
            lm_head_multiplier=multiplier, **shape, **mamba,
        )  # fmt: skip
        student = FalconH1ForCausalLM(config)
        head = fused_head.FusedHead(student, cuda=False)
        assert head.problem is None  # no config name the fused head knows
        ids = torch.randint(0, 256, (2, 16))
        forward = head.forward_args(torch.device("cpu"))
        logits = student(input_ids=ids, use_cache=False, **forward).logits
        if problem is None:
            head(logits, lambda error: error)
            assert head.checked
            continue
        assert logits.abs().max() < 2  # small logits: an absolute tolerance would not see it
        with pytest.raises(run_dir.RunError, match=problem) as stopped:
            head(logits, lambda error: error)
        assert "--no-fused-head" in str(stopped.value)
