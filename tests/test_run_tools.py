"""train.py with the tools distillers use: config files, --help, run_config.json, trackers
(TensorBoard, Weights & Biases offline), the progress bar, curves.png, bf16 checkpoints that
lm-eval and vLLM load as they are, and an exact resume from them."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors import safe_open
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModelForCausalLM

import curves
import flags
import run_dir
import train
from conftest import ROOT, read_metrics, tiny_argv

CONFIGS = os.path.join(ROOT, "configs")
# The paper's rows (docs/paper_results.md), the tiny CPU run: teachers, losses, weights, learned W
ROWS = {
    "cpt": (None, ["ce"], None, False),
    "kl-llama3b": (["meta-llama/Llama-3.2-3B"], ["kl"], None, False),
    "gold-qwen": (["Qwen/Qwen3-4B"], ["gold"], None, False),
    "pkl-qwen": (["Qwen/Qwen3-4B"], ["pkl"], None, True),
    "gold-phi": (["microsoft/Phi-4-mini-instruct"], ["gold"], None, False),
    "hkl-phi": (["microsoft/Phi-4-mini-instruct"], ["hkl"], None, False),
    "two-teachers": (
        ["microsoft/Phi-4-mini-instruct", "meta-llama/Llama-3.2-3B"],
        ["hkl", "kl"],
        [0.8, 0.2],
        False,
    ),
    "tiny": (["pkg:qwen3"], ["pkl"], None, False),
}


# ----------------------------------------------------------------------------- config files


@pytest.mark.parametrize("row", sorted(ROWS))
def test_each_config_file_is_its_row_of_the_paper(row):
    args = train.parse_args(["--config", os.path.join(CONFIGS, f"{row}.yaml")])
    teachers, loss, weights, learned = ROWS[row]
    assert (args.teacher, args.loss, args.teacher_weight) == (teachers, loss, weights)
    assert args.learn_projection is learned and args.out_dir == f"out/{row}".replace(
        "out/tiny", "out/tiny-pkl"
    )
    assert args.student == ("pkg:llama-3.2" if row == "tiny" else "meta-llama/Llama-3.2-1B")
    assert sorted(f[:-5] for f in os.listdir(CONFIGS)) == sorted(ROWS)


def test_the_command_line_wins_over_the_config_and_the_config_over_the_preset(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(
        "preset: tiny\nteacher: [pkg:qwen3, pkg:o200k]\nloss: pkl\nlr: 0.002\nno-pack: true\n"
        "teacher_weight: [0.3, 0.7]\nbetas: [0.8, 0.9]\nshuffle: false\n"
    )
    args = train.parse_args(["--config", str(config)])
    assert args.teacher == ["pkg:qwen3", "pkg:o200k"] and args.loss == ["pkl"]
    assert args.lr == 0.002 and args.seq_len == 64  # the config's lr; the preset's seq_len
    assert args.pack is False and args.shuffle is False and args.betas == [0.8, 0.9]
    args = train.parse_args(["--config", str(config), "--teacher", "pkg:llama-3.2", "--lr", "3e-4"])
    assert args.teacher == ["pkg:llama-3.2"] and args.lr == 3e-4  # replaced, not appended
    assert args.teacher_weight == [0.3, 0.7]  # not given on the command line: the config's


BAD_CONFIGS = [
    ("lr: [1, 2]\n", "lr: give one value, not a list"),
    ("betas: 0.9\n", "argument --betas: expected 2 arguments"),
    ("lrr: 0.1\n", "'lrr' is not a train.py setting; did you mean lr?"),
    ("loss: [fancy]\n", "argument --loss: invalid choice: 'fancy'"),
    ("resume: yes-please\n", "resume: give true or false"),
    ("- just a list\n", "must map flag names to values"),
    ("lr: [unclosed\n", "is not valid YAML"),
    ("max_steps: many\n", "argument --max-steps: invalid int value: 'many'"),
]


@pytest.mark.parametrize("text,message", BAD_CONFIGS)
def test_a_bad_config_is_one_line_and_exit_2(text, message, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(text)
    with pytest.raises(SystemExit) as info:
        train.parse_args(["--config", str(config)])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1 and message in err, err
    with pytest.raises(SystemExit):
        train.parse_args(["--config", str(tmp_path / "missing.yaml")])
    assert "No such file" in capsys.readouterr().err


def test_a_config_that_is_not_utf8_is_one_line(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_bytes(b"lr: 0.001\nrun-name: caf\xe9\n")  # Latin-1
    with pytest.raises(SystemExit) as info:
        train.parse_args(["--config", str(config)])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1
    assert "is not UTF-8 text (byte 0xe9 at offset 23)" in err


def test_a_config_expands_home_in_paths_as_a_shell_would(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    config = tmp_path / "c.yaml"
    config.write_text("out-dir: ~/runs/x\nprojection: [~/W.pt]\nrun-name: ~literal\n")
    args = train.parse_args(["--config", str(config)])
    assert args.out_dir == str(tmp_path / "runs" / "x")
    assert args.projection == [str(tmp_path / "W.pt")] and args.run_name == "~literal"


def test_help_gives_every_flag_a_text_and_every_set_default(capsys):
    with pytest.raises(SystemExit) as info:
        train.parse_args(["--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    parser = flags.build_parser()
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, action.dest
            assert action.option_strings[0] in text
    assert (
        "(default: 5e-05)" in text and "(default: 30000)" in text and "(default: dynamic)" in text
    )


# ----------------------------------------------------------------------------- one tiny run


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory, cache):
    """A tiny run logged to TensorBoard and (offline) to Weights & Biases, checkpointed in bf16
    at steps 2 and 4, stopped there and resumed to step 6 (one schedule of 6 steps); its stderr."""
    out = tmp_path_factory.mktemp("tracked")
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}

    def run(out_dir, *extra):
        argv = tiny_argv(out_dir, cache, "--loss", "pkl", "--save-every", "2", *extra)
        cmd = [sys.executable, os.path.join(ROOT, "train.py"), *argv]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stderr

    trackers = ("--report-to", "tensorboard", "wandb", "--run-name", "tiny-tracked")
    first = run(out / "run", "--max-steps", "6", "--stop-step", "4", *trackers)
    resumed = run(out / "run", "--max-steps", "6", "--resume", *trackers)
    return out, first, resumed


def test_trackers_get_the_scalars_and_wandb_resumes_the_same_run(tracked_run):
    out, _, _ = tracked_run
    events = EventAccumulator(str(out / "run" / "tensorboard")).Reload()
    tags = set(events.Tags()["scalars"])
    assert {
        "loss",
        "ce",
        "kd",
        "kd_scale",
        "kd/pkg:qwen3",
        "lr",
        "data_issues/split_document",
    } <= tags
    assert "step" not in tags and "data_issues" not in tags  # flattened, not the dict
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3, 4, 5, 6]
    records = [json.loads(line) for line in open(out / "run" / "metrics.jsonl")]
    assert [e.value for e in events.Scalars("loss")] == pytest.approx([r["loss"] for r in records])
    run_id = (out / "run" / "wandb_run_id").read_text()
    runs = glob.glob(str(out / "run" / "wandb" / "offline-run-*"))
    assert len(runs) == 2 and all(r.endswith(f"-{run_id}") for r in runs)


def test_the_bar_shows_each_teachers_kd_and_the_scale_and_no_save_bars(tracked_run):
    _, first, _ = tracked_run
    assert "kd:qwen3=" in first and "scale=" in first and "ce=" in first
    assert "Writing model shards" not in first  # transformers printed one per checkpoint


def test_run_config_holds_every_flag_the_versions_and_the_commit(tracked_run):
    out, _, _ = tracked_run
    config = json.load(open(out / "run" / "run_config.json"))
    assert set(vars(train.parse_args([]))) == set(config["args"])
    assert config["args"]["report_to"] == ["tensorboard", "wandb"]
    assert config["args"]["max_steps"] == 6 and config["args"]["resume"] is True  # the last start
    assert config["versions"]["torch"] == torch.__version__
    commit = subprocess.run(
        ["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True
    )
    assert config["git"]["commit"] == commit.stdout.strip()
    again = train.parse_args(["--config", str(out / "run" / "run_config.json")])
    assert again.teacher == ["pkg:qwen3"] and again.max_steps == 6 and not again.resume


def test_checkpoints_are_bf16_for_lm_eval_with_the_fp32_master_beside_them(tracked_run):
    out, _, _ = tracked_run
    step = out / "run" / "step_6"
    assert json.load(open(step / "config.json"))["dtype"] == "bfloat16"
    with safe_open(str(step / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    model = AutoModelForCausalLM.from_pretrained(step, dtype="auto")
    assert next(model.parameters()).dtype == torch.bfloat16
    master = torch.load(step / run_dir.MASTER_WEIGHTS, weights_only=True)
    for name, weight in model.state_dict().items():
        if name in master:
            assert master[name].dtype == torch.float32
            assert torch.equal(weight, master[name].to(torch.bfloat16)), name
    # that a resume from such a checkpoint equals the unbroken run: test_fsdp.py (DDP, bf16)


def test_a_bf16_checkpoint_without_its_master_weights_is_not_resumed(tracked_run, tmp_path):
    out, _, _ = tracked_run
    import shutil

    copy = tmp_path / "step_6"
    shutil.copytree(out / "run" / "step_6", copy)
    assert run_dir.checkpoint_problem(str(copy), 1) is None
    os.remove(copy / run_dir.MASTER_WEIGHTS)
    assert run_dir.checkpoint_problem(str(copy), 1) == f"{run_dir.MASTER_WEIGHTS} is missing"


def test_save_dtype_float32_keeps_fp32_model_weights_and_no_master(tmp_path, cache):
    train.main(
        tiny_argv(
            tmp_path,
            cache,
            "--loss",
            "ce",
            "--max-steps",
            "1",
            "--save-every",
            "1",
            "--save-dtype",
            "float32",
        )
    )
    assert json.load(open(tmp_path / "step_1" / "config.json"))["dtype"] == "float32"
    assert not (tmp_path / "step_1" / run_dir.MASTER_WEIGHTS).exists()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "step_1", dtype="auto")
    assert next(model.parameters()).dtype == torch.float32


def test_curves_draw_every_panel_and_the_cli_is_one_line_on_bad_input(tracked_run, capsys):
    out, _, _ = tracked_run
    png = out / "run" / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # drawn at the end of the run
    records = curves.read_metrics(str(out / "run"))
    titles = {title: lines for title, lines, _ in curves.panels(records)}
    assert titles["KD per teacher"]["pkg:qwen3"][0] == [1, 2, 3, 4, 5, 6]
    assert titles["objective"]["ce"][1] == pytest.approx([r["ce"] for r in records])
    other = out / "again.png"
    assert curves.main([str(out / "run"), "--out", str(other)]) == 0 and other.exists()
    assert curves.main([str(out / "nothing-here")]) == 2
    assert "metrics.jsonl does not exist" in capsys.readouterr().err


def test_run_config_of_a_run_without_trackers_replays_it(tmp_path, cache):
    first = tmp_path / "first"
    train.main(tiny_argv(first, cache, "--max-steps", "1", "--save-every", "0"))
    config = str(first / "run_config.json")
    assert json.load(open(config))["args"]["report_to"] == []
    for extra in ([], ["--report-to", "none"]):
        assert train.parse_args(["--config", config, *extra]).report_to == []
    train.main(["--config", config, "--out-dir", str(tmp_path / "again")])
    (replayed,) = read_metrics(tmp_path / "again")
    (original,) = read_metrics(first)
    for key in ("loss", "ce", "kd", "grad_norm"):
        assert replayed[key] == pytest.approx(original[key], rel=1e-6), key


def test_a_tracker_that_cannot_start_or_log_is_a_warning_and_the_run_goes_on(
    tmp_path, cache, capsys, monkeypatch
):
    import wandb

    def no_network(*args, **kwargs):
        raise wandb.errors.CommError("Network error (ConnectionError), entering retry loop")

    monkeypatch.setattr(wandb, "init", no_network)
    monkeypatch.setattr(run_dir.TensorBoardTracker, "log", lambda *a: 1 / 0)
    extra = ("--max-steps", "2", "--save-every", "0", "--report-to", "wandb", "tensorboard")
    train.main(tiny_argv(tmp_path, cache, *extra))
    err = capsys.readouterr().err
    assert "--report-to wandb could not start (CommError: Network error" in err
    assert "--report-to: tensorboard failed (ZeroDivisionError: division by zero): dropped" in err
    assert "Traceback" not in err and len(read_metrics(tmp_path)) == 2


def test_curves_leave_out_malformed_lines_with_a_warning(tmp_path, capsys):
    good = [{"step": s, "loss": 2.0 / s, "skipped": 0, "lr": 1e-3} for s in (1, 2, 3)]
    lines = [json.dumps(r).encode() for r in good]
    lines[1:1] = [b"[1, 2]", b'{"loss": 1}', b'{"step": "x"}', b"\xff\xfe", b'{"step": 3, "lo']
    lines.append(b'{"step": 4, "skipped": "many", "loss": "nan", "kd/t": true}')
    (tmp_path / "metrics.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    assert curves.main([str(tmp_path)]) == 0 and (tmp_path / "curves.png").exists()
    err = capsys.readouterr().err
    assert (
        "5 line(s) not a step's record, left out: 2, 3, 4, 5, 6" in err and "Traceback" not in err
    )
    records = curves.read_metrics(str(tmp_path))
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert curves.series(records, "loss") == ([1, 2, 3], [2.0, 1.0, 2.0 / 3])


def test_a_config_file_runs_the_tiny_preset(tmp_path, cache):
    config = yaml.safe_load(open(os.path.join(CONFIGS, "tiny.yaml")))
    config.update(
        {"out-dir": str(tmp_path), "max-steps": 1, "projection-cache": cache, "num-workers": 0}
    )
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    train.main(["--config", str(path)])
    saved = json.load(open(tmp_path / "run_config.json"))["args"]
    assert saved["config"] == str(path) and saved["preset"] == "tiny" and saved["max_steps"] == 1
    assert (tmp_path / "step_1").is_dir()


def test_the_campaign_tells_our_tracebacks_from_torchruns_and_checks_what_errors_say(monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("campaign", f"{ROOT}/bench/campaign.py")
    campaign = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "campaign", campaign)  # its dataclasses look it up
    spec.loader.exec_module(campaign)
    Result, Case = campaign.Result, campaign.Case
    ours = f'Traceback (most recent call last):\n  File "{ROOT}/run_dir.py", line 3\nKeyError: 1'
    torchrun = f'Traceback (most recent call last):\n  File "{ROOT}/.venv/lib/x.py", line 9\n'
    error = Case("c", "k", None, "error", ("--seq-len 32",))
    ok = Case("c", "k", None, "ok", ("warning: x",))
    outcomes = [
        campaign.classify(error, Result(2, "", "error: --seq-len 32 (the run: 64)\n", 1), None),
        campaign.classify(error, Result(1, "", torchrun + "error: --seq-len 32 ...\n", 1), None),
        campaign.classify(error, Result(1, "", "evaluate.py: error: --seq-len 32 x\n", 1), None),
        campaign.classify(error, Result(2, "", "error: something else\n", 1), None),
        campaign.classify(error, Result(0, "", "", 1), None),
        campaign.classify(ok, Result(1, "", ours, 1), None),
        campaign.classify(ok, Result(None, "", "", 1), None),
        campaign.classify(ok, Result(0, "", "warning: x\n", 1), "lost: step_2 is gone"),
        campaign.classify(ok, Result(0, "", "", 1), None),
        campaign.classify(ok, Result(0, "warning: x\n", "", 1), "loss 1.0 != 2.0"),
    ]
    assert outcomes == [
        "handled", "handled", "handled", "unclear", "silent wrong", "traceback", "hang", "lost run",
        "silent wrong", "silent wrong",
    ]  # fmt: skip
    assert len(campaign.base_cases()) >= 60
