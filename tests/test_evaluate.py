"""evaluate.py end to end on a tiny random Llama with the real Llama-3.2 tokenizer, offline.

The standard benchmarks need the hub for their data, so the end-to-end runs use the local tasks in
tests/eval_tasks/ (one multiple-choice, one generative with regex answer extraction).
"""

import os

# Before datasets/transformers are imported anywhere: they read these once.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import csv
import errno
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import cli

ROOT = Path(__file__).resolve().parent.parent
TASK_DIR = ROOT / "tests" / "eval_tasks"
TASKS = "xtoken_tiny_choice,xtoken_tiny_arith,xtoken_tiny_group"


def load_evaluate():
    # By path: `import evaluate` could find Hugging Face's `evaluate` package instead.
    spec = importlib.util.spec_from_file_location("xtoken_evaluate", ROOT / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ev = load_evaluate()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A tiny random Llama with the real Llama-3.2 tokenizer (bench/bench_evaluate.py builds the
    same one, so the benchmark times what these tests check)."""
    sys.path.insert(0, str(ROOT / "bench"))
    from bench_evaluate import make_model

    path = tmp_path_factory.mktemp("ckpt") / "step_10"
    make_model(str(path))
    return path


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """The shipped tasks plus one whose data file does not exist, to make a task fail."""
    path = tmp_path_factory.mktemp("tasks")
    shutil.copytree(
        TASK_DIR, path, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__")
    )
    (path / "xtoken_tiny_broken.yaml").write_text(
        (TASK_DIR / "xtoken_tiny_choice.yaml")
        .read_text()
        .replace("task: xtoken_tiny_choice", "task: xtoken_tiny_broken")
        .replace("jsonl: xtoken_tiny_choice.jsonl", "jsonl: no_such_file.jsonl")
    )
    return path


@pytest.fixture(scope="module")
def first_run(tiny_model, tmp_path_factory):
    """`python evaluate.py` as a user runs it, from a directory other than the repo."""
    cwd = tmp_path_factory.mktemp("cwd")
    cmd = [sys.executable, str(ROOT / "evaluate.py"), "--model", f"tiny={tiny_model}"]
    cmd += ["--include-path", str(TASK_DIR), "--tasks", TASKS, "--limit", "4", "--out-dir", "out"]
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)
    return proc, cwd / "out"


def run_main(*argv: str) -> int:
    return ev.main([str(a) for a in argv])


def csv_rows(path: Path) -> dict[str, dict[str, str]]:
    with open(path) as f:
        return {row["model"]: row for row in csv.DictReader(f)}


def md_rows(path: Path) -> dict[str, list[str]]:
    rows = [line.strip("|").split("|") for line in path.read_text().splitlines() if line[:1] == "|"]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows}


def test_end_to_end_run_writes_table_csv_chart_and_raw_json(first_run, tiny_model):
    proc, out = first_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    md = md_rows(out / "results.md")
    assert md["Model"] == [*TASKS.split(","), "Avg"]
    assert "| tiny |" in proc.stdout  # the table is printed too
    row = csv_rows(out / "results.csv")["tiny"]
    assert row["path"] == str(tiny_model) and row["avg_over"] == "3/3"
    for task in TASKS.split(","):
        assert 0 <= float(row[task]) <= 100
    assert row["xtoken_tiny_group"] == row["xtoken_tiny_choice"]  # a group of that one task
    assert (out / "results.png").read_bytes()[:4] == b"\x89PNG"
    raw = json.loads((out / "raw" / "tiny.json").read_text())
    assert raw["limit"] == 4 and raw["num_fewshot"] == 3
    assert "acc,none" in raw["tasks"]["xtoken_tiny_choice"]["results"]["xtoken_tiny_choice"]
    arith = raw["tasks"]["xtoken_tiny_arith"]["results"]["xtoken_tiny_arith"]
    assert "exact_match,flexible-extract" in arith
    assert raw["tasks"]["xtoken_tiny_arith"]["n-shot"]["xtoken_tiny_arith"] == 3
    assert len(list((out / "cache").glob("*.json"))) == 3


def test_avg_is_plain_mean_of_the_rows_cells(first_run):
    _, out = first_run
    row = csv_rows(out / "results.csv")["tiny"]
    cells = [float(row[t]) for t in TASKS.split(",")]
    assert float(row["Avg"]) == pytest.approx(sum(cells) / len(cells), abs=0.006)
    assert md_rows(out / "results.md")["tiny"][-1] == row["Avg"]


def test_avg_of_a_partial_row_says_how_many_cells_it_covers():
    assert ev.row_avg({"a": 10.0, "b": 25.0, "c": "failed"}) == (17.5, "17.50 (2/3)")
    assert ev.row_avg({"a": 10.0, "b": 25.0}) == (17.5, "17.50")
    assert ev.row_avg({"a": "failed"}) == (None, "-")


def test_second_run_reads_the_cache_and_evaluates_nothing(
    first_run, tiny_model, task_dir, monkeypatch, capsys
):
    import lm_eval

    _, out = first_run
    before = csv_rows(out / "results.csv")

    def must_not_run(*args, **kwargs):
        raise AssertionError("a cached task was evaluated again")

    monkeypatch.setattr(ev, "load_lm", must_not_run)
    monkeypatch.setattr(lm_eval, "simple_evaluate", must_not_run)
    argv = ["--model", f"tiny={tiny_model}", "--include-path", task_dir, "--tasks", TASKS]
    assert run_main(*argv, "--limit", "4", "--out-dir", out) == 0
    assert "tiny / xtoken_tiny_choice: cached" in capsys.readouterr().out
    assert csv_rows(out / "results.csv") == before


def test_cache_key_changes_with_checkpoint_files_fewshot_and_limit(tmp_path):
    ckpt = tmp_path / "step_1"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    (ckpt / "model.safetensors").write_bytes(b"weights")
    args = ev.parse_args(["--out-dir", str(tmp_path / "out")])
    _, path = ev.cache_path(str(ckpt), "hellaswag", args)
    assert ev.cache_path(str(ckpt), "hellaswag", args)[1] == path
    assert ev.cache_path(str(ckpt), "winogrande", args)[1] != path
    for changed in (["--num-fewshot", "5"], ["--limit", "0.5"]):
        other = ev.parse_args(["--out-dir", str(tmp_path / "out"), *changed])
        assert ev.cache_path(str(ckpt), "hellaswag", other)[1] != path
    os.utime(ckpt / "model.safetensors", ns=(1, 1))  # a new checkpoint written at the same path
    assert ev.cache_path(str(ckpt), "hellaswag", args)[1] != path


def test_interrupted_run_redoes_only_the_unfinished_task_and_failure_shows_failed(
    first_run, tiny_model, task_dir, tmp_path, monkeypatch
):
    import lm_eval

    out = tmp_path / "resume"
    shutil.copytree(first_run[1], out)  # xtoken_tiny_choice finished there, the broken one did not
    real, evaluated = lm_eval.simple_evaluate, []

    def counting(*args, **kwargs):
        evaluated.append(kwargs["tasks"][0])
        return real(*args, **kwargs)

    monkeypatch.setattr(lm_eval, "simple_evaluate", counting)
    tasks = "xtoken_tiny_choice,xtoken_tiny_broken"
    argv = ["--model", f"tiny={tiny_model}", "--include-path", task_dir, "--tasks", tasks]
    assert run_main(*argv, "--limit", "4", "--out-dir", out) == 1  # some cell failed
    assert evaluated == ["xtoken_tiny_broken"]
    row = md_rows(out / "results.md")["tiny"]
    assert row[1] == "failed" and 0 <= float(row[0]) <= 100
    assert row[2] == f"{float(row[0]):.2f} (1/2)"
    assert "tiny / xtoken_tiny_broken: failed: " in (out / "results.md").read_text()
    assert not list((out / "cache").glob("xtoken_tiny_broken-*"))  # retried next time
    raw = json.loads((out / "raw" / "tiny.json").read_text())
    assert "error" in raw["tasks"]["xtoken_tiny_broken"]


# lm-eval-shaped results for the paper's tasks, with decoy metrics that must not be read.
FAKE_RESULTS = {
    "gsm8k": {"exact_match,strict-match": 0.01, "exact_match,flexible-extract": 0.125},
    "hellaswag": {"acc,none": 0.40, "acc_norm,none": 0.625},
    "winogrande": {"acc,none": 0.5},
}


def test_paper_tasks_read_the_documented_metric_and_paper_row_sits_beside_ours(
    tiny_model, task_dir, tmp_path, monkeypatch, capsys
):
    import lm_eval

    def fake_evaluate(model, tasks, **kwargs):
        return {"results": {tasks[0]: FAKE_RESULTS[tasks[0]]}}

    monkeypatch.setattr(ev, "load_lm", lambda model, args: "a model")
    monkeypatch.setattr(lm_eval, "simple_evaluate", fake_evaluate)
    argv = ["--model", f"pkl={tiny_model}", "--paper-row", "pkl=pkl-qwen", "--out-dir", tmp_path]
    assert run_main(*argv, "--include-path", task_dir, "--tasks", "gsm8k,hellaswag,winogrande") == 0
    md = md_rows(tmp_path / "results.md")
    assert md["Model"] == ["GSM8k", "HellaSwag", "Winogrande", "Avg"]
    assert md["pkl"] == ["12.50", "62.50", "50.00", "41.67"]
    assert list(md) == ["Model", "---", "pkl", "paper: pkl-qwen"]  # the paper's row under ours
    assert md["paper: pkl-qwen"][:3] == ["15.54", "62.63", "63.46"]
    assert float(md["paper: pkl-qwen"][3]) == pytest.approx((15.54 + 62.63 + 63.46) / 3, abs=0.006)
    assert csv_rows(tmp_path / "results.csv")["paper: pkl-qwen"]["path"] == "arXiv:2605.21699"
    assert (
        "GSM8k: lm-eval task `gsm8k`, metric `exact_match,flexible-extract`"
        in capsys.readouterr().out
    )
    assert (tmp_path / "results.png").stat().st_size > 1000


def test_default_tasks_are_the_five_paper_benchmarks_registered_in_lm_eval(task_dir):
    assert ev.parse_args([]).tasks == "mmlu,gsm8k,minerva_math,winogrande,hellaswag"
    assert [column for column, _ in ev.TASK_METRICS.values()] == list(ev.PAPER_COLUMNS)
    registered = set(ev.task_manager((str(task_dir),)).all_tasks)
    assert set(ev.TASK_METRICS) <= registered


def test_paper_avg_is_the_plain_mean_of_its_five_columns():
    for row_id, scores in ev.PAPER_SCORES.items():
        assert round(sum(scores[:5]) / 5, 2) == pytest.approx(scores[5]), row_id


def test_paper_flag_prints_the_paper_table_without_a_model():
    cmd = [sys.executable, str(ROOT / "evaluate.py"), "--paper"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    pkl = next(line for line in proc.stdout.splitlines() if line.startswith("| pkl-qwen |"))
    assert "P-KL (learned W)" in pkl and pkl.endswith("| 38.85 |")
    assert "| 44.67 | 15.54 | 7.96 | 63.46 | 62.63 |" in pkl
    assert all(f"| {row_id} |" in proc.stdout for row_id in ev.PAPER_SCORES)


def bad_input(capsys, *argv) -> str:
    assert run_main(*argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("evaluate.py: error: ")
    return err


TYPOS = [("xtoken_tiny_choise", "xtoken_tiny_choice"), ("hellaswg", "hellaswag")]


@pytest.mark.parametrize(("typo", "meant"), TYPOS)
def test_unknown_task_is_rejected_with_close_matches(
    tiny_model, task_dir, tmp_path, capsys, typo, meant
):
    argv = ["--model", f"t={tiny_model}", "--include-path", task_dir, "--tasks", typo]
    err = bad_input(capsys, *argv, "--out-dir", tmp_path / "out")
    assert f"unknown task '{typo}'" in err and meant in err.split("close matches:")[1]
    assert not (tmp_path / "out").exists()  # a rejected run leaves nothing behind


def test_directory_without_config_is_not_a_model(tmp_path, capsys):
    err = bad_input(capsys, "--model", f"x={tmp_path}", "--out-dir", tmp_path / "out")
    assert "not a model (no config.json)" in err


def test_missing_path_that_is_no_hub_id_is_not_a_model(tmp_path, capsys):
    err = bad_input(capsys, "--model", "x=out/qwen-pkl/step_30000", "--out-dir", tmp_path / "out")
    assert "not a model: no such directory" in err


def test_hub_id_passes_the_model_check():
    ev.check_model("base", "meta-llama/Llama-3.2-1B")
    assert ev.model_fingerprint("meta-llama/Llama-3.2-1B") == "hub:meta-llama/Llama-3.2-1B"


def test_checkpoint_without_tokenizer_is_rejected(tiny_model, tmp_path, capsys):
    ckpt = tmp_path / "step_10"
    ckpt.mkdir()
    for name in ("config.json", "model.safetensors"):
        os.link(tiny_model / name, ckpt / name)
    err = bad_input(capsys, "--model", f"x={ckpt}", "--out-dir", tmp_path / "out")
    assert "no tokenizer" in err and "tokenizer.save_pretrained" in err


def test_unwritable_out_dir_is_rejected(tiny_model, tmp_path, capsys):
    (tmp_path / "a_file").write_text("")  # a directory cannot be made inside a file, even as root
    err = bad_input(capsys, "--model", f"x={tiny_model}", "--out-dir", tmp_path / "a_file" / "out")
    assert "cannot write to --out-dir" in err


def test_paper_row_must_name_a_model_and_a_paper_row(tiny_model, tmp_path, capsys):
    err = bad_input(
        capsys, "--model", f"x={tiny_model}", "--paper-row", "x=pkl", "--out-dir", tmp_path
    )
    assert "pkl-qwen" in err


def test_bad_input_from_the_command_line_is_one_line_without_traceback(tmp_path):
    cmd = [sys.executable, str(ROOT / "evaluate.py"), "--model", f"x={tmp_path}"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


# -----------------------------------------------------------------------------
# Bad input, OS errors and the cache: one line on stderr and exit 2, nothing written, no traceback.


@pytest.fixture
def must_not_evaluate(monkeypatch):
    import lm_eval

    def must_not_run(*args, **kwargs):
        raise AssertionError("bad input reached the evaluation")

    monkeypatch.setattr(ev, "load_lm", must_not_run)
    monkeypatch.setattr(lm_eval, "simple_evaluate", must_not_run)


@pytest.fixture
def fake_evaluate(monkeypatch):
    """No model: every task scores 50% (acc,none); returns the tasks evaluated, in order."""
    import lm_eval

    evaluated = []

    def fake(model, tasks, **kwargs):
        evaluated.append(tasks[0])
        return {"results": {tasks[0]: {"alias": tasks[0], "acc,none": 0.5}}}

    monkeypatch.setattr(ev, "load_lm", lambda model, args: "a model")
    monkeypatch.setattr(lm_eval, "simple_evaluate", fake)
    return evaluated


def one_task_argv(tiny_model, task_dir, out) -> list[str]:
    argv = ["--model", f"tiny={tiny_model}", "--include-path", task_dir]
    return [str(a) for a in [*argv, "--tasks", "xtoken_tiny_choice", "--out-dir", out]]


def one_error_line(capsys, *argv) -> str:
    err = bad_input(capsys, *argv)
    assert "Traceback" not in err
    return err


# argv added to a good command line -> a fragment of the one-line error
BAD_FLAGS = [
    (["--num-fewshot", "-2"], "argument --num-fewshot: must be an integer >= 0"),
    (["--num-fewshot", "2.5"], "argument --num-fewshot: must be an integer, got '2.5'"),
    (["--num-fewshot", "three"], "argument --num-fewshot: must be an integer"),
    (["--batch-size", "0"], "argument --batch-size: must be an integer >= 1, auto or auto:N"),
    (["--batch-size", "-8"], "argument --batch-size: must be an integer >= 1"),
    (["--batch-size", "auto:0"], "argument --batch-size: must be an integer >= 1"),
    (["--batch-size", "autox"], "argument --batch-size: must be an integer >= 1"),
    (["--limit", "0"], "argument --limit: must be a count >= 1 or a fraction in (0, 1)"),
    (["--limit", "-1"], "argument --limit: must be a count >= 1 or a fraction in (0, 1)"),
    (["--limit", "nan"], "argument --limit: must be a count >= 1 or a fraction in (0, 1)"),
    (["--limit", "inf"], "argument --limit: must be a count >= 1 or a fraction in (0, 1)"),
    (["--limit", "2.5"], "argument --limit: a count of examples must be a whole number"),
    (["--limit", "lots"], "argument --limit: must be a count >= 1 or a fraction"),
    (["--dtype", "fp17"], "argument --dtype: invalid choice: 'fp17'"),
    (["--backend", "jax"], "argument --backend: invalid choice: 'jax'"),
    (["--frobnicate"], "unrecognized arguments: --frobnicate"),
    (["--device", "gpu"], "--device 'gpu': use cpu, cuda, cuda:N or mps"),
    (["--device", "cuda:99"], "--device cuda:99: "),
    (["--backend", "vllm", "--device", "cpu"], "--device is for the hf backend"),
    (["--tasks", "xtoken_tiny_choice,xtoken_tiny_choice"], "names 'xtoken_tiny_choice' twice"),
    (["--tasks", ","], "--tasks is empty"),
    (["--paper-row", "tiny=nope"], "--paper-row tiny=nope: need a --model label and a row"),
    (["--model", "tiny"], "--model takes LABEL=VALUE"),
    (["--include-path", "no/such/dir"], "--include-path no/such/dir is not a directory"),
    (["--paper"], "--paper prints the paper's table alone"),
]


@pytest.mark.parametrize(("extra", "message"), BAD_FLAGS, ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_bad_flag_is_one_line_and_exit_2_before_any_work(
    tiny_model, task_dir, tmp_path, capsys, must_not_evaluate, extra, message
):
    out = tmp_path / "out"
    err = one_error_line(capsys, *one_task_argv(tiny_model, task_dir, out), *extra)
    assert message in err
    assert not out.exists()  # checked before anything is written


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--num-fewshot", "-2"], "--num-fewshot: must be an integer >= 0"),
        (["--batch-size", "0"], "--batch-size: must be an integer >= 1"),
        (["--limit", "inf", "--paper"], "--limit: must be a count >= 1"),  # --paper too
    ],
)
def test_bad_flag_from_the_command_line_is_one_line_without_traceback(tmp_path, argv, message):
    cmd = [sys.executable, str(ROOT / "evaluate.py"), *argv]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert message in proc.stderr


def test_limit_and_batch_size_parse_to_what_lm_eval_takes():
    def parsed(flag, value):
        return getattr(ev.parse_args([flag, value]), flag[2:].replace("-", "_"))

    # lm-eval reads an int limit as a count, a float as a fraction: 4.0 must arrive as 4
    assert [parsed("--limit", v) for v in ("4", "1e2", "0.25")] == [4, 100, 0.25]
    assert [type(parsed("--limit", v)) for v in ("4", "1e2", "0.25")] == [int, int, float]
    assert [parsed("--batch-size", v) for v in ("16", "auto", "auto:4")] == [16, "auto", "auto:4"]
    assert parsed("--num-fewshot", "0") == 0


def test_offline_hub_model_not_in_the_cache_is_rejected_before_evaluating(
    tmp_path, capsys, monkeypatch, task_dir, must_not_evaluate
):
    from huggingface_hub import constants

    assert constants.is_offline_mode()  # HF_HUB_OFFLINE=1, set at the top of this file
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    out = tmp_path / "out"
    argv = ["--model", "base=meta-llama/Llama-3.2-1B", "--include-path", task_dir]
    err = one_error_line(capsys, *argv, "--tasks", "xtoken_tiny_choice", "--out-dir", out)
    assert "--model base=meta-llama/Llama-3.2-1B: not in the local hub cache" in err
    assert "HF_HUB_OFFLINE" in err and not out.exists()


IN_THE_WAY = [  # (path under --out-dir, made a "dir" or a "file", fragment of the error)
    ("results.md", "dir", "results.md is a directory, not a file"),
    ("raw/tiny.json", "dir", "tiny.json is a directory, not a file"),
    ("cache", "file", "cache is a file, not a directory"),
    ("raw", "file", "raw is a file, not a directory"),
    ("CACHE_ENTRY", "dir", "is a directory, not a file"),
]


@pytest.mark.parametrize(("name", "kind", "message"), IN_THE_WAY, ids=[n for n, *_ in IN_THE_WAY])
def test_output_path_in_the_way_is_rejected_before_evaluating(
    tiny_model, task_dir, tmp_path, capsys, must_not_evaluate, name, kind, message
):
    out = tmp_path / "out"
    argv = one_task_argv(tiny_model, task_dir, out)
    if name == "CACHE_ENTRY":
        path = ev.cache_path(str(tiny_model), "xtoken_tiny_choice", ev.parse_args(argv))[1]
    else:
        path = out / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.mkdir() if kind == "dir" else path.write_text("")
    before = sorted(out.rglob("*"))
    err = one_error_line(capsys, *argv)
    assert message in err and "choose another --out-dir" in err
    assert sorted(out.rglob("*")) == before


@pytest.fixture
def read_only_dir(tmp_path, monkeypatch):
    """A directory nothing can be created in: mode 0555, and for root (whom modes do not stop)
    os.open/os.mkdir refuse under it as the kernel would on a read-only mount."""
    path = tmp_path / "read-only"
    path.mkdir()
    path.chmod(0o555)
    if os.geteuid() == 0:
        real_open, real_mkdir = os.open, os.mkdir

        def refused(target) -> bool:
            return str(os.path.abspath(target)).startswith(str(path))

        def open_(file, flags, *args, **kwargs):
            if refused(file) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(file))
            return real_open(file, flags, *args, **kwargs)

        def mkdir(target, *args, **kwargs):
            if refused(target) and not os.path.isdir(target):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(target))
            return real_mkdir(target, *args, **kwargs)

        monkeypatch.setattr(os, "open", open_)
        monkeypatch.setattr(os, "mkdir", mkdir)
    yield path
    path.chmod(0o755)


@pytest.mark.parametrize("where", ["itself", "missing/parent"])
def test_read_only_out_dir_is_rejected_before_evaluating(
    tiny_model, task_dir, read_only_dir, capsys, must_not_evaluate, where
):
    out = read_only_dir if where == "itself" else read_only_dir / where
    err = one_error_line(capsys, *one_task_argv(tiny_model, task_dir, out))
    assert "cannot write" in err and "choose another" in err
    assert not list(read_only_dir.iterdir())


def full_disk(monkeypatch, fails):
    """cli.atomic_write, as evaluate.py calls it, whose write runs out of space (ENOSPC) for
    paths where fails(path)."""
    real = cli.atomic_write

    def atomic_write(path, write):
        def out_of_space(f):
            f.write(b"half a fi")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        return real(path, out_of_space if fails(path) else write)

    monkeypatch.setattr(ev, "atomic_write", atomic_write)


@pytest.mark.parametrize("fails", ["results.md", "cache"])
def test_full_disk_is_one_line_and_leaves_no_partial_file(
    tiny_model, task_dir, tmp_path, capsys, monkeypatch, fake_evaluate, fails
):
    out = tmp_path / "out"
    full_disk(monkeypatch, lambda path: fails in path)
    assert run_main(*one_task_argv(tiny_model, task_dir, out)) == 2
    err = capsys.readouterr().err  # the progress bar writes there too
    lines = [line for line in err.splitlines() if line.startswith("evaluate.py:")]
    assert len(lines) == 1 and "Traceback" not in err
    assert "No space left on device; free some space" in lines[0] and fails in lines[0]
    assert not (out / "results.md").exists()
    assert not [p for p in out.rglob("*") if p.name.startswith(".tmp")]  # no temp file left
    cached = list((out / "cache").glob("*.json"))
    assert len(cached) == (1 if fails == "results.md" else 0)  # what finished resumes


def cache_file(tiny_model, task_dir, out):
    argv = one_task_argv(tiny_model, task_dir, out)
    key, path = ev.cache_path(str(tiny_model), "xtoken_tiny_choice", ev.parse_args(argv))
    path.parent.mkdir(parents=True)
    return argv, key, path


BAD_CACHE = [  # (name, the cache file's text from its key, fragment of the warning)
    ("empty", lambda key: "", "is unreadable (JSONDecodeError"),
    ("truncated", lambda key: json.dumps({"key": key, "raw": {"results": {}}})[:40], "unreadable"),
    ("a list", lambda key: "[1, 2]", "is not a cache entry of this model x task"),
    ("raw not a dict", lambda key: json.dumps({"key": key, "raw": "x"}), "is not a cache entry"),
    ("other key", lambda key: json.dumps({"key": {}, "raw": {}}), "is not a cache entry"),
    ("failed", lambda key: json.dumps({"key": key, "raw": {"error": "boom"}}), "no result (boom)"),
    ("empty raw", lambda key: json.dumps({"key": key, "raw": {}}), "holds no result"),
    (
        "no metric",
        lambda key: json.dumps({"key": key, "raw": {"results": {"xtoken_tiny_choice": {}}}}),
        "holds no result (lm-eval reported no ? for xtoken_tiny_choice)",
    ),
    ("not utf-8", lambda key: "\udcff", "is unreadable (UnicodeDecodeError"),
]


@pytest.mark.parametrize(("name", "text", "warning"), BAD_CACHE, ids=[n for n, *_ in BAD_CACHE])
def test_bad_cache_entry_warns_once_and_is_evaluated_again(
    tiny_model, task_dir, tmp_path, capsys, fake_evaluate, name, text, warning
):
    out = tmp_path / "out"
    argv, key, path = cache_file(tiny_model, task_dir, out)
    path.write_bytes(text(key).encode(errors="surrogateescape"))
    assert run_main(*argv) == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and warning in warnings[0] and "evaluating it again" in warnings[0]
    assert "Traceback" not in err
    assert fake_evaluate == ["xtoken_tiny_choice"]
    assert md_rows(out / "results.md")["tiny"] == ["50.00", "50.00"]
    assert ev.read_cache(path, key, "xtoken_tiny_choice")[0]["results"]  # rewritten, whole


def test_result_without_its_metric_is_not_cached(
    tiny_model, task_dir, tmp_path, monkeypatch, fake_evaluate
):
    import lm_eval

    monkeypatch.setattr(lm_eval, "simple_evaluate", lambda model, tasks, **kw: {"results": {}})
    out = tmp_path / "out"
    assert run_main(*one_task_argv(tiny_model, task_dir, out)) == 1
    assert md_rows(out / "results.md")["tiny"][0] == "failed"
    assert not list((out / "cache").iterdir())  # so the next run evaluates it again


@pytest.mark.parametrize(
    ("umask", "mode"), [(0o022, 0o644), (0o002, 0o664)], ids=["umask 022", "umask 002"]
)
def test_outputs_get_the_users_umask(tiny_model, task_dir, tmp_path, fake_evaluate, umask, mode):
    out = tmp_path / "out"
    old = os.umask(umask)
    try:
        assert run_main(*one_task_argv(tiny_model, task_dir, out)) == 0
    finally:
        os.umask(old)
    written = [out / name for name in ("results.md", "results.csv", "results.png", "raw/tiny.json")]
    written += (out / "cache").glob("*.json")
    assert len(written) == 5
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in written} == {
        p.name: oct(mode) for p in written
    }


def test_directory_made_where_a_result_goes_during_the_run_is_one_line(
    tiny_model, task_dir, tmp_path, capsys, monkeypatch, fake_evaluate
):
    import lm_eval

    out = tmp_path / "out"
    fake = lm_eval.simple_evaluate

    def meanwhile(*args, **kwargs):
        (out / "results.md").mkdir()  # after the checks, before the table is written
        return fake(*args, **kwargs)

    monkeypatch.setattr(lm_eval, "simple_evaluate", meanwhile)
    assert run_main(*one_task_argv(tiny_model, task_dir, out)) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("evaluate.py:")]
    assert len(lines) == 1 and "Traceback" not in err
    assert f"cannot write {out / 'results.md'}" in lines[0] and "rerunning resumes" in lines[0]


# -----------------------------------------------------------------------------
# --dtype auto, --model-args, --gen-kwargs, --apply-chat-template, the batch-size default, --devices


@pytest.fixture(scope="module")
def tiny_bf16(tiny_model, tmp_path_factory):
    """A second tiny model saved as train.py saves checkpoints: bf16 weights and a config.json that
    says "dtype": "bfloat16". Its weights are nudged, so that it scores unlike tiny_model."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    noise = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=noise) * p.std())
    path = tmp_path_factory.mktemp("ckpt-bf16") / "step_10"
    model.to(torch.bfloat16).save_pretrained(path)
    for f in tiny_model.iterdir():  # the tokenizer
        if not (path / f.name).exists():
            shutil.copy(f, path / f.name)
    assert json.loads((path / "config.json").read_text())["dtype"] == "bfloat16"
    return path


@pytest.mark.parametrize("which", ["fp32", "bf16", "bf16, older config (torch_dtype)"])
def test_dtype_auto_evaluates_a_checkpoint_in_its_own_dtype(tiny_model, tiny_bf16, tmp_path, which):
    import torch

    path, expected = (tiny_model, torch.float32) if which == "fp32" else (tiny_bf16, torch.bfloat16)
    if "older" in which:  # transformers 4 wrote torch_dtype
        path = tmp_path / "old"
        shutil.copytree(tiny_bf16, path)
        config = json.loads((path / "config.json").read_text())
        config["torch_dtype"] = config.pop("dtype")
        (path / "config.json").write_text(json.dumps(config))
    args = ev.parse_args(["--device", "cpu"])
    assert args.dtype == "auto"
    assert ev.load_lm(str(path), args).model.dtype == expected


class FakeModel:
    """What get_model returns, recording the arguments each model is made with."""

    made: list = []

    @classmethod
    def create_from_arg_obj(cls, arg_dict, additional_config=None):
        cls.made.append((arg_dict, additional_config))
        return "a model"


@pytest.fixture
def fake_model(monkeypatch):
    monkeypatch.setattr(ev, "get_model", lambda backend: FakeModel)
    monkeypatch.setattr(FakeModel, "made", [])
    return FakeModel.made


@pytest.mark.parametrize(
    ("flags", "cuda", "device", "batch_size"),
    [
        ([], False, "cpu", 8),
        ([], True, "cuda", "auto"),
        (["--device", "cpu"], True, "cpu", 8),
        (["--device", "cuda:1"], True, "cuda:1", "auto"),
        (["--batch-size", "4"], False, "cpu", 4),
        (["--batch-size", "auto:2"], True, "cuda", "auto:2"),
    ],
)
def test_batch_size_default_is_8_on_cpu_and_auto_on_gpu(
    monkeypatch, fake_model, flags, cuda, device, batch_size
):
    monkeypatch.setattr(ev.torch.cuda, "is_available", lambda: cuda)
    ev.load_lm("m", ev.parse_args(flags))
    assert fake_model == [
        ({"pretrained": "m", "dtype": "auto"}, {"batch_size": batch_size, "device": device})
    ]


@pytest.fixture
def seen_by_simple_evaluate(monkeypatch):
    """lm_eval.simple_evaluate faked: every task scores 50%; returns the kwargs of each call."""
    import lm_eval

    calls = []

    def fake(model, tasks, **kwargs):
        calls.append(kwargs)
        return {"results": {tasks[0]: {"acc,none": 0.5}}}

    monkeypatch.setattr(lm_eval, "simple_evaluate", fake)
    return calls


def test_model_args_gen_kwargs_and_chat_template_reach_lm_eval(
    tiny_model, task_dir, tmp_path, fake_model, seen_by_simple_evaluate
):
    argv = one_task_argv(tiny_model, task_dir, tmp_path / "out")
    argv += ["--device", "cpu", "--apply-chat-template"]
    argv += ["--model-args", "attn_implementation=sdpa, max_length=2048,trust_remote_code=true"]
    argv += ["--gen-kwargs", "max_gen_toks=64,temperature=0.0,until='Q:'"]
    assert run_main(*argv) == 0
    assert fake_model == [
        (
            {
                "pretrained": str(tiny_model),
                "dtype": "auto",
                "attn_implementation": "sdpa",
                "max_length": 2048,  # typed as lm-eval's own command line types them
                "trust_remote_code": True,
            },
            {"batch_size": 8, "device": "cpu"},
        )
    ]
    [kwargs] = seen_by_simple_evaluate
    assert kwargs["gen_kwargs"] == {"max_gen_toks": 64, "temperature": 0.0, "until": "Q:"}
    assert kwargs["apply_chat_template"] is True and kwargs["fewshot_as_multiturn"] is True
    notes = (tmp_path / "out" / "results.md").read_text()
    assert "dtype auto, model-args attn_implementation=sdpa,max_length=2048," in notes
    assert "gen-kwargs max_gen_toks=64,temperature=0.0,until=Q:, chat template" in notes
    raw = json.loads((tmp_path / "out" / "raw" / "tiny.json").read_text())
    assert raw["model_args"]["attn_implementation"] == "sdpa" and raw["apply_chat_template"]


def test_without_the_new_flags_lm_eval_gets_its_plain_defaults(
    tiny_model, task_dir, tmp_path, fake_model, seen_by_simple_evaluate
):
    assert run_main(*one_task_argv(tiny_model, task_dir, tmp_path / "out")) == 0
    assert fake_model[0][0] == {"pretrained": str(tiny_model), "dtype": "auto"}
    [kwargs] = seen_by_simple_evaluate
    assert kwargs["gen_kwargs"] is None
    assert kwargs["apply_chat_template"] is False and kwargs["fewshot_as_multiturn"] is False
    assert "model-args" not in (tmp_path / "out" / "results.md").read_text()


CACHE_KEY_BEFORE = {  # the fields of a cache key before these flags: such caches still resume
    "model", "fingerprint", "task", "num_fewshot", "limit", "backend", "dtype", "lm_eval"
}  # fmt: skip


def test_cache_key_changes_with_model_args_gen_kwargs_and_chat_template(tmp_path):
    ckpt = tmp_path / "step_1"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    out = ["--out-dir", str(tmp_path / "out")]

    def key_and_path(*flags):
        return ev.cache_path(str(ckpt), "gsm8k", ev.parse_args([*out, *flags]))

    key, path = key_and_path()
    assert set(key) == CACHE_KEY_BEFORE
    settings = [
        ["--model-args", "attn_implementation=sdpa"],
        ["--model-args", "attn_implementation=eager"],
        ["--model-args", "max_length=2048"],
        ["--gen-kwargs", "max_gen_toks=64"],
        ["--apply-chat-template"],
    ]
    paths = {path, *(key_and_path(*flags)[1] for flags in settings)}
    assert len(paths) == 1 + len(settings)
    # the same settings in another order are the same key
    assert key_and_path("--model-args", "a=1,b=2")[1] == key_and_path("--model-args", "b=2,a=1")[1]


def test_result_cached_for_other_settings_is_not_reused(
    tiny_model, task_dir, tmp_path, fake_evaluate
):
    argv = one_task_argv(tiny_model, task_dir, tmp_path / "out")
    assert run_main(*argv) == 0
    assert run_main(*argv) == 0  # the same settings: cached
    assert len(fake_evaluate) == 1
    for flags in (["--model-args", "max_length=512"], ["--gen-kwargs", "max_gen_toks=8"]):
        assert run_main(*argv, *flags) == 0
    assert run_main(*argv, "--apply-chat-template") == 0
    assert len(fake_evaluate) == 4


def pretend_gpus(monkeypatch, count):
    monkeypatch.setattr(ev.torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(ev.torch.cuda, "device_count", lambda: count)


NEW_BAD_FLAGS = [
    (["--model-args", "sdpa"], "argument --model-args: takes KEY=VALUE,KEY=VALUE..., got 'sdpa'"),
    (["--model-args", "=sdpa"], "argument --model-args: takes KEY=VALUE"),
    (["--model-args", "a=1,,b=2"], "argument --model-args: takes KEY=VALUE,KEY=VALUE..., got ''"),
    (["--model-args", "max_length="], "argument --model-args: takes KEY=VALUE"),
    (["--model-args", "max-length=1"], "argument --model-args: takes KEY=VALUE"),
    (["--model-args", "a=1,a=2"], "argument --model-args: names 'a' twice"),
    (["--model-args", "dtype=float16"], "'dtype' has a flag of its own: --dtype"),
    (["--model-args", "pretrained=x/y"], "'pretrained' has a flag of its own: --model"),
    (["--model-args", "batch_size=2"], "'batch_size' has a flag of its own: --batch-size"),
    (["--model-args", "device=cpu"], "'device' has a flag of its own: --device or --devices"),
    (["--gen-kwargs", "temperature"], "argument --gen-kwargs: takes KEY=VALUE"),
    (["--apply-chat-template", "yes"], "unrecognized arguments: yes"),
    (["--devices", "gpu"], "argument --devices: takes a count N (cuda:0 to cuda:N-1) or a list"),
    (["--devices", "cuda"], "argument --devices: takes a count N"),
    (["--devices", "cpu,"], "argument --devices: takes a count N"),
    (["--devices", "mps"], "argument --devices: takes a count N"),
    (["--devices", "0"], "argument --devices: a count of CUDA devices must be >= 1"),
    (["--devices", "cuda:99"], "--devices: cuda:99 is not here"),
    (["--devices", "99"], "--devices: cuda:98 is not here"),
    (["--devices", "cpu,cpu", "--device", "cpu"], "give one of them"),
    (["--devices", "cpu", "--backend", "vllm"], "--devices cpu is for the hf backend"),
]


@pytest.mark.parametrize(
    ("extra", "message"), NEW_BAD_FLAGS, ids=[" ".join(a) for a, _ in NEW_BAD_FLAGS]
)
def test_bad_new_flag_is_one_line_and_exit_2_before_any_work(
    tiny_model, task_dir, tmp_path, capsys, must_not_evaluate, extra, message
):
    out = tmp_path / "out"
    err = one_error_line(capsys, *one_task_argv(tiny_model, task_dir, out), *extra)
    assert message in err
    assert not out.exists()


def test_worker_flag_is_not_for_users(capsys):
    err = one_error_line(capsys, ev.WORKER, "nonsense")
    assert "how --devices starts its workers" in err


def test_devices_count_or_list():
    assert ev.parse_args(["--devices", "3"]).devices == ["cuda:0", "cuda:1", "cuda:2"]
    assert ev.parse_args(["--devices", "cuda:2,cpu,cpu"]).devices == ["cuda:2", "cpu", "cpu"]
    assert ev.parse_args([]).devices is None


def test_worker_env_gives_each_gpu_worker_its_card_and_cpu_workers_a_share_of_the_cores(
    monkeypatch,
):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert ev.worker_env("cuda:1", 0)["CUDA_VISIBLE_DEVICES"] == "1"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")  # cuda:N counts the visible ones
    assert ev.worker_env("cuda:1", 0)["CUDA_VISIBLE_DEVICES"] == "6"
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert ev.worker_env("cpu", 2)["OMP_NUM_THREADS"] == "4"
    assert "OMP_NUM_THREADS" not in ev.worker_env("cpu", 1)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's choice stands
    assert ev.worker_env("cpu", 2)["OMP_NUM_THREADS"] == "3"


def test_devices_on_gpus_start_one_worker_per_card_each_seeing_only_its_own(
    tiny_model, tiny_bf16, task_dir, tmp_path, monkeypatch
):
    pretend_gpus(monkeypatch, 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    started = []

    class Worker:  # a started process that exits at once, having evaluated nothing
        def __init__(self, cmd, env, **kwargs):
            started.append((json.loads(cmd[-1]), env["CUDA_VISIBLE_DEVICES"]))

        wait = poll = lambda self: 0

    monkeypatch.setattr(ev.subprocess, "Popen", Worker)
    models = [
        "--model",
        f"a={tiny_model}",
        "--model",
        f"b={tiny_bf16}",
        "--model",
        f"c={tiny_model}",
    ]
    argv = [*models, "--include-path", task_dir, "--tasks", "xtoken_tiny_choice"]
    assert run_main(*argv, "--out-dir", tmp_path / "out", "--devices", "2") == 1
    jobs = {env: (list(job["models"]), job["args"]["device"]) for job, env in started}
    assert jobs == {"0": (["a", "c"], "cuda:0"), "1": (["b"], "cuda:0")}
    md = (tmp_path / "out" / "results.md").read_text()
    assert "- a / xtoken_tiny_choice: failed: no worker evaluated it" in md  # never a hang


def test_worker_that_dies_leaves_its_models_failed_and_exit_1(
    tiny_model, tiny_bf16, task_dir, tmp_path, monkeypatch
):
    die = "import os, sys, json; job = json.loads(sys.argv[1]); "
    die += "os.kill(os.getpid(), 9) if job['position'] == 0 else sys.exit(3)"
    monkeypatch.setattr(
        ev, "worker_command", lambda job: [sys.executable, "-c", die, json.dumps(job)]
    )
    out = tmp_path / "out"
    argv = ["--model", f"a={tiny_model}", "--model", f"b={tiny_bf16}", "--include-path", task_dir]
    argv += ["--tasks", "xtoken_tiny_choice", "--out-dir", out, "--devices", "cpu,cpu"]
    assert run_main(*argv) == 1
    md = (out / "results.md").read_text()
    assert "- a / xtoken_tiny_choice: failed: the worker on cpu was killed by signal 9" in md
    assert "- b / xtoken_tiny_choice: failed: the worker on cpu exited with status 3" in md
    assert md_rows(out / "results.md")["b"] == ["failed", "-"]
    assert (
        "error" in json.loads((out / "raw" / "a.json").read_text())["tasks"]["xtoken_tiny_choice"]
    )
    assert not list((out / "cache").iterdir())  # retried next time


def test_devices_two_cpu_workers_give_the_single_process_numbers_and_resume(
    tiny_model, tiny_bf16, task_dir, tmp_path, monkeypatch
):
    import torch

    # the workers compute with as many threads as this process: the same sums, the same numbers
    monkeypatch.setenv("OMP_NUM_THREADS", str(torch.get_num_threads()))
    argv = ["--model", f"a={tiny_model}", "--model", f"b={tiny_bf16}", "--include-path", task_dir]
    argv += ["--tasks", "xtoken_tiny_choice"]  # all 8 examples: scores that differ per model
    assert run_main(*argv, "--out-dir", tmp_path / "one") == 0

    real, started = ev.worker_command, []
    monkeypatch.setattr(ev, "worker_command", lambda job: started.append(job) or real(job))
    assert run_main(*argv, "--out-dir", tmp_path / "two", "--devices", "cpu,cpu") == 0
    assert [(job["name"], list(job["models"])) for job in started] == [
        ("cpu", ["a"]),
        ("cpu", ["b"]),
    ]
    one, two = md_rows(tmp_path / "one" / "results.md"), md_rows(tmp_path / "two" / "results.md")
    assert two == one and one["a"] != one["b"]
    for label in ("a", "b"):
        results = [
            json.loads((tmp_path / d / "raw" / f"{label}.json").read_text())["tasks"]
            for d in ("one", "two")
        ]
        assert (
            results[0]["xtoken_tiny_choice"]["results"]
            == results[1]["xtoken_tiny_choice"]["results"]
        )
    notes = (tmp_path / "two" / "results.md").read_text()
    assert f"- a: `{tiny_model}` (float32)" in notes and f"- b: `{tiny_bf16}` (bfloat16)" in notes

    def must_not_start(job):
        raise AssertionError("a worker was started with nothing left to evaluate")

    monkeypatch.setattr(ev, "worker_command", must_not_start)  # all cached: the run resumes
    assert run_main(*argv, "--out-dir", tmp_path / "two", "--devices", "cpu,cpu") == 0
    assert md_rows(tmp_path / "two" / "results.md") == one


def test_model_that_fails_to_load_in_a_worker_is_a_row_of_failed_cells(
    tiny_model, tiny_bf16, task_dir, tmp_path, monkeypatch, fake_evaluate
):
    class InProcessWorker:  # the worker's own code, run here, so that the fakes reach it
        def __init__(self, cmd, env, **kwargs):
            assert cmd[-2] == ev.WORKER
            self.code = ev.main(cmd[-2:])

        def wait(self):
            return self.code

        poll = wait

    def load_lm(model, args):
        if model == str(tiny_bf16):
            raise RuntimeError("bad weights")
        return "a model"

    monkeypatch.setattr(ev.subprocess, "Popen", InProcessWorker)
    monkeypatch.setattr(ev, "load_lm", load_lm)
    out = tmp_path / "out"
    argv = [
        "--model",
        f"ok={tiny_model}",
        "--model",
        f"bad={tiny_bf16}",
        "--include-path",
        task_dir,
    ]
    argv += ["--tasks", "xtoken_tiny_choice", "--out-dir", out, "--devices", "cpu,cpu"]
    assert run_main(*argv) == 1
    md = md_rows(out / "results.md")
    assert md["bad"] == ["failed", "-"] and md["ok"] == ["50.00", "50.00"]
    notes = (out / "results.md").read_text()
    assert (
        "- bad / xtoken_tiny_choice: failed: model did not load: RuntimeError: bad weights" in notes
    )


# ---- a checkpoint whose config does not match its weights; a model that does not load ---------

MISMATCHED = {  # config.json change -> what the failed row says
    "another architecture": (
        {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]},
        "its config.json (qwen2) does not match its weights: 6 weights the config names are not "
        "in the checkpoint (they would be random) (model.layers.0.self_attn.k_proj.bias, ",
    ),
    "another size": (
        {"intermediate_size": 96},
        "its config.json (llama) does not match its weights: 6 weights have another shape in the "
        "checkpoint (model.layers.0.mlp.down_proj.weight, ",
    ),
}


@pytest.mark.parametrize("what", list(MISMATCHED))
def test_checkpoint_whose_config_does_not_match_its_weights_is_a_failed_row_and_exit_1(
    what, tiny_model, task_dir, tmp_path, capsys
):
    # transformers loads such a checkpoint with a warning (random weights where the checkpoint
    # has none): evaluate.py scored it as if it were fine and exited 0
    changes, said = MISMATCHED[what]
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_model, ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps(config | changes))
    out = tmp_path / "out"
    argv = ["--model", f"bad={ckpt}", "--include-path", task_dir, "--tasks", "xtoken_tiny_choice"]
    assert run_main(*argv, "--limit", "2", "--out-dir", out) == 1
    assert md_rows(out / "results.md")["bad"] == ["failed", "-"]
    notes = (out / "results.md").read_text()
    assert f"- bad / xtoken_tiny_choice: failed: model did not load: {said}" in notes
    assert "fix config.json or evaluate the checkpoint it belongs to" in notes
    err = capsys.readouterr().err
    assert "Traceback" not in err  # said in its line: no traceback
    last = err.strip().splitlines()[-1]  # what a script calling it sees last, with exit 1
    assert last.startswith(
        "evaluate.py: error: 1 of 1 results failed (bad / xtoken_tiny_choice: failed: model did "
        "not load: its config.json ("
    )


@pytest.mark.parametrize("what", ["cut short", "no tensors"])
def test_damaged_weights_file_is_one_line_and_exit_2_before_any_work(
    what, tiny_model, task_dir, tmp_path, capsys, monkeypatch
):
    # a truncated model.safetensors was a failed row with a traceback after the model load began
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_model, ckpt)
    weights = ckpt / "model.safetensors"
    if what == "cut short":
        os.truncate(weights, weights.stat().st_size // 2)
    else:
        from safetensors.torch import save_file

        save_file({}, str(weights))
    monkeypatch.setattr(ev, "load_lm", lambda *a: pytest.fail("a model load began"))
    err = one_error_line(capsys, "--model", f"x={ckpt}", "--out-dir", tmp_path / "out")
    said = {
        "cut short": "is not a readable safetensors file (damaged or cut short: SafetensorError:"
    }
    assert f"--model x={ckpt}: model.safetensors " in err
    assert said.get(what, "holds no tensors") in err and "save the checkpoint again" in err
    assert not (tmp_path / "out").exists()


def test_model_that_fails_to_load_in_one_process_exits_1(
    tiny_model, task_dir, tmp_path, monkeypatch, fake_evaluate
):
    def load_lm(model, args):
        raise RuntimeError("bad weights")

    monkeypatch.setattr(ev, "load_lm", load_lm)
    out = tmp_path / "out"
    assert run_main(*one_task_argv(tiny_model, task_dir, out)) == 1  # a script can tell
    assert md_rows(out / "results.md")["tiny"] == ["failed", "-"]
    assert "model did not load: RuntimeError: bad weights" in (out / "results.md").read_text()


def test_weights_must_match_leaves_transformers_as_it_was():
    import transformers.modeling_utils as modeling

    before = modeling.log_state_dict_report
    with pytest.raises(ev.CheckpointMismatch):
        with ev.weights_must_match():
            info = type("Info", (), {"missing_keys": {"a"}, "unexpected_keys": set()})()
            modeling.log_state_dict_report(model=None, loading_info=info)
    assert modeling.log_state_dict_report is before
