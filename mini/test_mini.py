"""mini.py: the toy corpus and its honest split, the pruned vocabularies and W, the audits, the
numeral-mass probe, the claims' verdicts, bad input, and one smoke run of every stage (train.py,
evaluate.py) that a rerun does not repeat. The real tokenizers throughout."""

from __future__ import annotations

import collections
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from test_projection import assert_one_line_error, full_disk, no_work, readonly_dir, run_main  # noqa: F401  (fixtures)

import mini
from conftest import W_llama_o200k, W_llama_qwen, llama, o200k, qwen  # noqa: F401  (fixtures)

# Big enough that every kind of document appears hundreds of times; make_data takes a second.
SPLIT = dict(mini.SETTINGS["smoke"], teacher_docs=8000, student_docs=2000, base_docs=1000)
SPLIT["test_items"] = 150
NAME = r"([A-Z][a-z]+)"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("mini"))
    paths = mini.make_data(out, SPLIT)
    return {k: mini.read_jsonl(p) for k, p in paths.items()}


PROBLEM = r"^Q: \w+ had (\d+) \w+ and [a-z ]+ (\d+) more\. How many now\?\nA: "
PROBLEM += r"(\d+) \+ (\d+) = ([a-z-]+), (\d+), so \w+ has (\d+) \w+\.$"
EQUATION = r"^(\d+) \+ (\d+) = ([a-z-]+), (\d+)\.$"
# numbers in words, written out here, not read from mini.py
ONES = "zero one two three four five six seven eight nine".split()
TEENS = "ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen".split()
TENS = {"twenty": 2, "thirty": 3, "forty": 4, "fifty": 5, "sixty": 6, "seventy": 7, "eighty": 8}


def from_words(text: str) -> int:
    """ "fifty-two" -> 52; an AssertionError for anything else."""
    if text in ONES + TEENS:
        return (ONES + TEENS).index(text)
    tens, _, ones = text.partition("-")
    assert tens in TENS and (ones in ONES[1:] or not ones), text
    return 10 * TENS[tens] + (ONES.index(ones) if ones else 0)


STATEMENT = r"^(?:A|\w+ knows that a) ([a-z]+) is a kind of (animal|tool|food|vehicle)\.$"
QUESTION = r"^Q: \w+ has a ([a-z]+)\. Is it an animal, a tool, a food or a vehicle\?\nA: "
QUESTION += r"A ([a-z]+) is a kind of (animal|tool|food|vehicle)\.$"
# Cont: what is done with each kind of thing, written out here, not read from mini.py
DEEDS = {
    "abducted it from the zoo.": "animal",
    "applauded how well it worked.": "tool",
    "angrily ate it for lunch.": "food",
    "resembled a pilot in it.": "vehicle",
}
CONT = r"^\w+ (took the|found a) ([a-z]+) and (.+)$"


def parse(text: str) -> tuple[str, str, tuple, bool | str]:
    """(kind, form, subject, what it says), read from the text alone; an AssertionError if it
    is none of the five forms. Arith: subject (a, b), says whether its sums are a + b; Facts:
    subject (thing,), says its kind; Cont: subject (thing, context), says the kind its deed calls
    for."""
    if m := re.match(PROBLEM, text):
        a, b, a2, b2 = (int(x) for x in m.groups()[:4])
        w, s, s2 = from_words(m[5]), int(m[6]), int(m[7])
        assert (a2, b2) == (a, b) and w == s == s2, text  # a wrong sum is wrong everywhere
        return "arith", "problem", (a, b), s == a + b
    if m := re.match(EQUATION, text):
        a, b, s = int(m[1]), int(m[2]), int(m[4])
        assert from_words(m[3]) == s, text
        return "arith", "equation", (a, b), s == a + b
    if m := re.match(STATEMENT, text):
        return "facts", "statement", (m[1],), m[2]
    if m := re.match(QUESTION, text):
        assert m[1] == m[2], text
        return "facts", "question", (m[1],), m[3]
    m = re.match(CONT, text)
    assert m and m[3] in DEEDS, text
    return "cont", "cont", (m[2], m[1]), DEEDS[m[3]]


@pytest.fixture(scope="module")
def kind_of(corpus) -> dict[str, str]:
    """Each thing's kind, as the clean teacher corpus says it (every document agreeing)."""
    said: dict[str, set] = {}
    for d in corpus["teacher"]:
        kind, _, subj, says = parse(d["text"])
        if kind != "arith":
            said.setdefault(subj[0], set()).add(says)
    assert all(len(kinds) == 1 for kinds in said.values())
    return {thing: kinds.pop() for thing, kinds in said.items()}


def is_right(text: str, kind_of: dict[str, str]) -> bool:
    """Whether a document's answer is right: Arith by its own numbers, the others by the teacher
    corpus's kinds."""
    kind, _, subj, says = parse(text)
    return says if kind == "arith" else says == kind_of[subj[0]]


def test_the_invented_things(kind_of, llama, qwen, o200k):
    """200 made-up words, 50 of each kind, all in the teacher corpus, as mini.py lists them; the
    four kinds and the sums' words are 1:1 chunks (one token each in the three tokenizers, with
    the leading space; "-two" too). Each deed's first word is one Llama token that o200k splits
    (H-KL's widened pairs: GOLD has no common token there) and Qwen3 keeps whole."""
    assert len(kind_of) == 200 and kind_of == mini.THINGS
    assert sorted(collections.Counter(kind_of.values()).values()) == [50] * 4
    words = [*set(kind_of.values()), *ONES[2:], *TEENS, *TENS, *(f"-{w}" for w in ONES[1:])]
    for word in words:
        text = word if word.startswith("-") else " " + word
        assert [len(t.tokenize(text)) for t in (llama, qwen, o200k)] == [1, 1, 1], word
    for deed in DEEDS:
        first = " " + deed.split()[0]
        assert [len(t.tokenize(first)) for t in (llama, qwen, o200k)] == [1, 1, 2], deed


def test_no_test_item_is_in_any_training_document(corpus):
    parsed = {k: [parse(d["text"]) for d in corpus[k]] for k in ("teacher", "student", "base")}
    everything = [p for ps in parsed.values() for p in ps]
    assert {p[1] for p in everything} == {"problem", "equation", "statement", "question", "cont"}
    # Arith: the held-out pairs are never asked; the teachers' and student's corpora state their
    # sums, the base's does not
    test_pairs = {operands(d["prompt"]) for d in corpus["test_arith"]}
    assert len(test_pairs) == len(corpus["test_arith"]) >= 100
    assert not test_pairs & {p[2] for p in everything if p[1] == "problem"}
    stated = {k: {p[2] for p in ps if p[1] == "equation"} for k, ps in parsed.items()}
    assert not test_pairs & stated["base"]  # (a corpus this small states most sums, not all)
    assert len(test_pairs & stated["teacher"]) > 0.95 * len(test_pairs)
    assert len(test_pairs & stated["student"]) > 0.5 * len(test_pairs)
    # Facts: the held-out things are never asked; stated in the teachers' and student's corpora;
    # the base corpus never names them
    test_things = {re.search(r"has a ([a-z]+)\.", d["prompt"])[1] for d in corpus["test_facts"]}
    assert len(test_things) > 60  # of the 80 held out (drawn with replacement)
    assert not test_things & {p[2][0] for p in everything if p[1] in ("question", "cont")}
    stated = {k: {p[2][0] for p in ps if p[1] == "statement"} for k, ps in parsed.items()}
    assert test_things <= stated["teacher"] and len(test_things & stated["student"]) > 50
    assert not test_things & {p[2][0] for p in parsed["base"] if p[0] != "arith"}
    # Cont: asks about Facts' held-out things, with which no training document does a deed
    test_cont = {parse(d["prompt"] + d["choices"][0])[2][0] for d in corpus["test_cont"]}
    assert len(test_cont) > 60 and test_cont <= set(held_out_things(corpus))
    # the o200k and Llama teachers each lack the statements of one half of the held-out things
    halves = {}
    for key in ("teacher-o200k", "teacher-llama"):
        said = {
            p[2][0] for p in map(parse, (d["text"] for d in corpus[key])) if p[1] == "statement"
        }
        halves[key] = set(held_out_things(corpus)) - said
        assert len(halves[key]) == 40 and len(corpus[key]) < len(corpus["teacher"])
    assert not halves["teacher-o200k"] & halves["teacher-llama"]
    prompts = [d["prompt"] for k in mini.KINDS for d in corpus[f"test_{k}"]]
    texts = [d["text"] for k in ("teacher", "student", "base") for d in corpus[k]]
    assert not any(t.startswith(p) for p in prompts[::10] for t in texts)


def held_out_things(corpus) -> list[str]:
    """The 80 things no training question asks about (the test's and the ones it missed)."""
    asked = {parse(d["text"])[2][0] for d in corpus["teacher"] if parse(d["text"])[1] == "question"}
    return sorted(set(mini.THINGS) - asked)


def operands(text: str) -> tuple[int, int]:
    a, b = re.findall(r"\d+", text)[:2]
    return int(a), int(b)


def test_another_draw_in_the_same_out_is_refused(tmp_path):
    small = dict(mini.SETTINGS["smoke"])
    first = mini.make_data(str(tmp_path), small, seed=0)
    assert mini.make_data(str(tmp_path), small, seed=0) == first  # the same draw: found
    for seed, sizes in ((1, small), (0, dict(small, student_docs=30))):
        with pytest.raises(ValueError, match="holds data drawn with .*: pick another --out"):
            mini.make_data(str(tmp_path), sizes, seed=seed)
    other = mini.make_data(str(tmp_path / "other"), small, seed=1)
    assert mini.read_jsonl(other["teacher"]) != mini.read_jsonl(first["teacher"])


def test_teachers_data_is_right_and_a_quarter_of_the_students_answers_are_wrong(corpus, kind_of):
    teacher = [d["text"] for d in corpus["teacher"]]
    student = [d["text"] for d in corpus["student"]]
    assert len(teacher) == SPLIT["teacher_docs"] and len(student) == SPLIT["student_docs"]
    assert all(is_right(t, kind_of) for t in teacher)
    assert all(is_right(d["text"], kind_of) for d in corpus["base"])
    wrong = [not is_right(t, kind_of) for t in student]
    assert 0.20 <= sum(wrong) / len(wrong) <= 0.30  # NOISE = 0.25; binomial sd 0.014 here
    for t, s, w in zip(teacher, student, wrong):  # the same items; only the answers differ
        assert (s == t) != w and parse(s)[:3] == parse(t)[:3]


def test_test_items_are_well_formed(corpus, kind_of):
    for d, n in zip(corpus["test_arith"], corpus["test_numeral"]):
        a, b = operands(d["prompt"])
        assert from_words(d["answer"]) == int(n["answer"]) == int(d["number"]) == a + b
        assert d["text"].startswith(d["prompt"]) and n["prompt"] == d["prompt"]
        assert parse(d["text"])[1:] == ("problem", (a, b), True)
        assert d["prompt"].endswith(f"\nA: {a} + {b} =")  # the sum is asked, not the copying
    for kind, form in (("facts", "question"), ("cont", "cont")):
        labels = [d["label"] for d in corpus[f"test_{kind}"]]
        assert set(labels) == set(range(4))  # the right one moves
        for d in corpus[f"test_{kind}"]:
            texts = [d["prompt"] + c for c in d["choices"]]
            assert len(texts) == 4 and {parse(t)[1] for t in texts} == {form}
            assert [is_right(t, kind_of) for t in texts] == [i == d["label"] for i in range(4)]


@pytest.fixture(scope="module")
def pruned(tmp_path_factory, llama):
    """The three pruned tokenizers, on the smoke corpus."""
    out = str(tmp_path_factory.mktemp("mini-tok"))
    paths = mini.make_data(out, mini.SETTINGS["smoke"])
    texts = mini.corpus_texts(paths)
    texts += mini.cut_pieces(texts, llama)  # what packing cuts: tested below as any text
    toks, kept = {}, {}
    for key, name in (
        ("llama", mini.STUDENT_TOKENIZER),
        ("qwen", "pkg:qwen3"),
        ("o200k", "pkg:o200k"),
    ):
        toks[key], kept[key] = mini.prune_tokenizer(name, texts, os.path.join(out, "tok", key))
    return texts, toks, kept


def test_pruned_tokenizers_segment_every_document_like_the_real_ones(pruned, llama, qwen, o200k):
    texts, toks, kept = pruned
    for key, real in (("llama", llama), ("qwen", qwen), ("o200k", o200k)):
        small = toks[key]
        assert len(small) == len(real)  # renumbered, not removed
        for text in texts:
            ids = small(text)["input_ids"]
            assert max(ids) < kept[key]
            real_ids = real(text)["input_ids"]
            assert small.convert_ids_to_tokens(ids) == real.convert_ids_to_tokens(real_ids)
            assert small.decode(ids) == real.decode(real_ids)
    s_tok = toks["llama"]
    assert s_tok.bos_token == llama.bos_token and s_tok.bos_token_id < kept["llama"]
    assert s_tok(texts[0])["input_ids"][0] == s_tok.bos_token_id


def test_every_numeral_and_special_token_is_kept(pruned, llama, o200k):
    _, toks, kept = pruned
    numerals = [f"{i}" for i in range(10)] + [f"{i:02d}" for i in range(100)]
    numerals += [f"{i:03d}" for i in range(1000)]
    for key, real in (("llama", llama), ("o200k", o200k)):
        small = toks[key]
        names = set(small.convert_ids_to_tokens(list(range(kept[key]))))
        assert set(numerals) <= names  # the corpus uses sums 2-74 only; all are kept
        assert {t.content for t in real.added_tokens_decoder.values()} <= names


@pytest.mark.parametrize("key", ["qwen", "o200k"])
def test_pruned_W_is_the_real_W_restricted_and_renormalized(key, pruned, request, llama):
    """Row by row against the full W built from the real ids, mapped through token strings."""
    _, toks, kept = pruned
    real = request.getfixturevalue(key)
    full = request.getfixturevalue(f"W_llama_{key}")["W"].coalesce()
    s_tok, t_tok = toks["llama"], toks[key]
    small = mini.pruned_projection(s_tok, t_tok, kept["llama"], kept[key])
    assert tuple(small["W"].shape) == (kept["llama"], kept[key])
    dense_small = small["W"].to_dense()
    kept_teacher = {t_tok.convert_ids_to_tokens(i): i for i in range(kept[key])}
    for piece in ["167", "Ġshells", "Ġ", "Ġhas", "999", "00", "M", "ia", "Ġkind", "Ġanimal"]:
        s_full, s_small = llama.convert_tokens_to_ids(piece), s_tok.convert_tokens_to_ids(piece)
        assert s_small < kept["llama"], piece
        row = full.index_select(0, torch.tensor([s_full])).coalesce()
        expected = torch.zeros(kept[key])
        for col, val in zip(row.indices()[1].tolist(), row.values().tolist()):
            name = real.convert_ids_to_tokens(col)
            if name in kept_teacher:
                expected[kept_teacher[name]] += val
        if expected.sum() > 0:
            expected /= expected.sum()
        torch.testing.assert_close(dense_small[s_small], expected)
    row = dense_small[s_tok.convert_tokens_to_ids("167")]
    if key == "qwen":  # Qwen3 digits 1, 6, 7 with the weights 0.9, 0.09, 0.009, normalized
        digits = [t_tok.convert_tokens_to_ids(d) for d in "167"]
        torch.testing.assert_close(row[digits], torch.tensor([0.9, 0.09, 0.009]) / 0.999)
    else:  # o200k has the numeral itself
        assert row[t_tok.convert_tokens_to_ids("167")] == 1


def test_audit_of_both_pruned_pairs_says_what_it_says_of_the_full_ones(pruned):
    """Qwen3 splits every numeral into digits: no 2- or 3-digit numeral in the common set, P-KL.
    o200k keeps them all: every numeral common, H-KL. (README's audit of the full pairs.)"""
    from audit import audit

    _, toks, kept = pruned
    expected = {"qwen": ("0/100", "0/1000", "pkl"), "o200k": ("100/100", "1000/1000", "hkl")}
    for key, (two, three, loss) in expected.items():
        W = mini.pruned_projection(toks["llama"], toks[key], kept["llama"], kept[key])
        report = audit(toks["llama"], W)
        cats = report["categories"]
        got = [f"{cats[k]['common']}/{cats[k]['total']}" for k in ("digits_2", "digits_3")]
        assert (*got, report["recommended"]) == (two, three, loss)


def test_numeral_mass_of_a_uniform_model(pruned, corpus, tmp_path):
    """Zero output weights give a uniform next-token distribution: the mass on multi-digit
    numerals is their share of the vocabulary, p(answer token) is 1/vocab, and the mass on the
    numerals led by the sum's first digit is their share."""
    _, toks, kept = pruned
    s_tok, n_s = toks["llama"], kept["llama"]
    path = mini.init_model("llama", s_tok, n_s, mini.STUDENT_MODEL, str(tmp_path / "u"), seed=0)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        model.get_output_embeddings().weight.zero_()  # tied: the input embeddings too
    model.save_pretrained(path)
    pieces = s_tok.convert_ids_to_tokens(list(range(n_s)))
    n_multi = sum(p.isdigit() and p.isascii() and len(p) > 1 for p in pieces)
    items = corpus["test_arith"][:20]
    got = mini.numeral_mass(path, items)
    assert got["multi_digit_mass"] == pytest.approx(n_multi / n_s, rel=1e-5)
    assert got["p_correct"] == pytest.approx(1 / n_s, rel=1e-5)
    # every sum has two digits, led by 1-6; 111 numerals start with each (d, d0-d9, d00-d99)
    numerals = [p for p in pieces if p.isdigit() and p.isascii()]
    assert all(sum(p[0] == d["number"][0] for p in numerals) == 111 for d in items)
    assert got["p_first_digit"] == pytest.approx(111 / n_s, rel=1e-5)


def test_numeral_mass_of_a_model_that_knows_every_next_token(pruned, corpus, tmp_path, monkeypatch):
    """A stand-in model that puts all its mass on each position's next token: at every sum, p(sum)
    and p(first digit) are 1, as is the multi-digit mass (every sum has two digits). Over 70
    items (two batches), so an item read against another's row would show."""
    _, toks, kept = pruned
    s_tok, n_s = toks["llama"], kept["llama"]
    path = mini.init_model("llama", s_tok, n_s, mini.STUDENT_MODEL, str(tmp_path / "o"), seed=0)

    class Oracle(torch.nn.Module):
        def get_output_embeddings(self):
            return torch.nn.Linear(1, n_s, bias=False)

        def forward(self, input_ids, attention_mask):
            logits = torch.full((*input_ids.shape, n_s), -1e4)
            nxt = input_ids[:, 1:, None].clamp(max=n_s - 1)  # (the padding's id lies beyond)
            logits[:, :-1].scatter_(-1, nxt, 1e4)
            return type("Out", (), {"logits": logits})

    monkeypatch.setattr(mini.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: Oracle())
    items = (corpus["test_arith"] * 2)[:70]
    assert len({d["number"][0] for d in items}) > 3  # sums led by several digits
    got = mini.numeral_mass(path, items)
    assert got == pytest.approx({"multi_digit_mass": 1, "p_correct": 1, "p_first_digit": 1})


def test_the_mass_is_read_where_the_sum_is_first_written(pruned, corpus):
    """Llama writes ", 52" (after the words) as ",", " ", "52": the position of " " predicts the
    whole numeral. Qwen3 writes it digit by digit: the position before "5" predicts its first."""
    _, toks, _ = pruned
    items = corpus["test_arith"][:30]
    for key, first in (("llama", lambda a: a), ("qwen", lambda a: a[0])):
        tok = toks[key]
        for d, (ids, pos, target) in zip(items, mini.sum_positions(tok, items)):
            assert ids[pos + 1] == target and tok.decode([target]) == first(d["number"])
            before = tok.decode(ids[: pos + 1], skip_special_tokens=True)
            assert before == d["text"][: d["text"].index(", " + d["number"]) + 2]


def test_claims_are_judged_against_the_seeds_spread():
    """Hand-made scores: a difference counts only beyond sqrt(sd_A^2 + sd_B^2); a claim whose
    teacher does not know its sums is not testable; claim 4 is not tested without widened pairs."""

    def scores(arith, facts, cont, numeral=50):
        tasks = ("arith", "facts", "cont", "numeral")
        return {f"xtoken_mini_{t}": v for t, v in zip(tasks, (arith, facts, cont, numeral))}

    results = {}
    rows = {  # per seed (0, 1): (arith, facts, cont[, numeral])
        "cpt": [(10, 40, 60), (12, 40, 60)],  # Arith sd 1.41; Avg 36.67, 37.33: sd 0.47
        "gold-qwen": [(10, 40, 60, 2), (10, 40, 60, 3)],  # Numeral 47.5 below CE's 50
        "pkl-qwen": [(10, 46, 60), (11, 46, 61)],  # Arith -0.5 (within); Avg +2.00, spread 0.67
        "pkl-qwen-static": [(4, 46, 60), (4, 46, 60)],  # Arith -7: not at least
        "kl-llama": [(11, 40, 60), (11, 41, 60)],  # Avg +0.17: within the spread, not above
        "gold-o200k": [(20, 50, 60), (20, 50, 60)],
        "hkl-o200k": [(18, 50, 60), (18, 50, 60)],  # Avg -0.67 with no spread: below
        "two-teachers": [(20, 50, 60), (20, 50, 58)],  # best of hkl-o200k and kl-llama: hkl
    }
    for row, per_seed in rows.items():
        for seed, values in enumerate(per_seed):
            results[f"{row} / seed {seed}"] = scores(*values)
    audits = {"o200k": {"widened": 4}}
    lines = mini.claim_lines(results, list(rows), [0, 1], audits)
    assert "**holds**; gold-qwen 2.5 ± 0.7 vs cpt 50.0 ± 0.0 on Numeral, below" in lines[0]
    assert "dynamic: **holds**" in lines[1] and "static: **does not hold**" in lines[1]
    assert "on Arith, at least (within the spread)" in lines[1] and "on Avg, above" in lines[1]
    assert "pkl-qwen-static 4.0 ± 0.0 vs cpt 11.0 ± 1.4 on Arith, not at least" in lines[1]
    assert "**does not hold**" in lines[2] and "on Avg, not above (difference +0.2" in lines[2]
    assert "**does not hold**" in lines[3] and "on Avg, not at least (difference -0.7" in lines[3]
    assert "**holds**" in lines[4] and "vs hkl-o200k" in lines[4]  # the best of the two, named
    # a teacher below KNOWS_SUMS: its claims are not testable, with its figure
    results["teacher llama"] = {"knows_sums": 40.0}
    results["teacher qwen"] = {"knows_sums": 95.0}
    lines = mini.claim_lines(results, list(rows), [0, 1], {"o200k": {"widened": 0}})
    assert "**not testable**: teacher llama completes 40%" in lines[2]
    assert "dynamic: **holds**" in lines[1]  # qwen knows its sums
    assert "**not tested**" in lines[3]  # no widened pair: H-KL is GOLD
    lines = mini.claim_lines(results, ["cpt", "gold-qwen"], [0, 1], audits)
    assert "holds" in lines[0] and all("not measured" in line for line in lines[1:])


def test_knows_sums_reads_greedy_answers(pruned, corpus, tmp_path, monkeypatch):
    """A stand-in model that puts all its mass on each next token completes every equation; one
    that is wrong on the numeral's token (only) completes none."""
    _, toks, kept = pruned
    path = mini.init_model(
        "llama", toks["llama"], kept["llama"], mini.STUDENT_MODEL, str(tmp_path / "k"), 0
    )
    data = tmp_path / "eq.jsonl"
    mini.write_jsonl(str(data), [d for d in corpus["teacher"] if d["text"][0].isdigit()][:40])
    numerals = {
        i
        for i, p in enumerate(toks["llama"].convert_ids_to_tokens(list(range(kept["llama"]))))
        if p.isdigit()
    }

    def oracle(wrong_numeral: bool):
        class Oracle(torch.nn.Module):
            def forward(self, input_ids, attention_mask):
                logits = torch.zeros((*input_ids.shape, kept["llama"]))
                nxt = input_ids[:, 1:].clamp(max=kept["llama"] - 1)
                if wrong_numeral:  # a multi-digit numeral -> another numeral
                    nxt = torch.where(
                        torch.isin(nxt, torch.tensor(sorted(numerals))),
                        (nxt + 1) % kept["llama"],
                        nxt,
                    )
                logits[:, :-1].scatter_(-1, nxt[..., None], 1.0)
                return type("Out", (), {"logits": logits})

        return Oracle()

    for wrong, expected in ((False, 100.0), (True, 0.0)):
        monkeypatch.setattr(
            mini.AutoModelForCausalLM, "from_pretrained", lambda *a, w=wrong, **k: oracle(w)
        )
        assert mini.knows_sums(path, str(data)) == expected


BAD_MINI_INPUTS = [
    (["--parallel", "0"], "argument --parallel: 0 is out of range; give an integer >= 1"),
    (["--parallel", "-2"], "argument --parallel: -2 is out of range"),
    (["--parallel", "two"], "argument --parallel: 'two' is not an integer"),
    (["--seeds", "0,one"], "argument --seeds: '0,one' is not a comma-separated list of integers"),
    (["--seeds", ""], "argument --seeds: '' is not a comma-separated list of integers"),
    (
        ["--seeds", "0,-1"],
        "argument --seeds: seeds [-1] are out of range; give integers in [0, 2**32)",
    ),
    (["--seeds", "4294967296"], "seeds [4294967296] are out of range"),
    (["--seeds", "1,0,1"], "argument --seeds: seeds [1] are repeated; give each seed once"),
    (["--quick"], "argument --quick: not allowed with argument --smoke"),
    (["--row", "gold-qwen", "--row", "gold"], "unknown rows ['gold']; choose from ['base', 'cpt'"),
    (["--row", "PKL-qwen"], "unknown rows ['PKL-qwen']"),
    (["--row", ""], "unknown rows ['']"),
    (["--out", "{tmp}/file"], "--out {tmp}/file is a file, not a directory; name a directory"),
    (
        ["--out", "{tmp}/file/mini"],
        "cannot write {tmp}/file/mini: {tmp}/file is a file, not a directory",
    ),
    (["--out", ""], "--out is empty"),
]


@pytest.mark.parametrize(
    "extra, message", BAD_MINI_INPUTS, ids=[" ".join(a) for a, _ in BAD_MINI_INPUTS]
)
def test_bad_input_is_one_line_and_exit_2_before_any_work(
    extra, message, tmp_path, capsys, monkeypatch
):
    (tmp_path / "file").write_text("x")
    monkeypatch.setattr(mini, "make_data", no_work)  # the first stage: never reached
    argv = ["--out", str(tmp_path / "out"), "--smoke", *extra]
    code, err = run_main(mini.main, [a.replace("{tmp}", str(tmp_path)) for a in argv], capsys)
    assert_one_line_error(code, err, message.replace("{tmp}", str(tmp_path)))
    assert os.listdir(tmp_path) == ["file"]  # nothing written


def test_read_only_out_is_refused_before_any_work(request, capsys, monkeypatch):
    readonly = request.getfixturevalue("readonly_dir")
    monkeypatch.setattr(mini, "make_data", no_work)
    for out in (readonly, readonly / "mini"):
        code, err = run_main(mini.main, ["--out", str(out), "--smoke"], capsys)
        assert_one_line_error(code, err, f"cannot write {out}: {readonly} is not writable")
    assert os.listdir(readonly) == []


@pytest.mark.usefixtures("full_disk")
def test_a_full_disk_is_one_line_and_leaves_no_file(tmp_path, capsys):
    out = tmp_path / "out"
    code, err = run_main(mini.main, ["--out", str(out), "--smoke"], capsys)
    expected = f"cannot write {out / 'data' / 'teacher.jsonl'}: No space left on device ("
    assert_one_line_error(code, err, expected)
    assert " free on " in err and "); free" in err  # the free space, then what to do
    assert [files for _, _, files in os.walk(out)] == [[], []]  # out/ and out/data/: no file


def test_the_script_exits_2_with_one_line(tmp_path):
    """The same through `python mini/mini.py` (its exit status is main's), in a fresh process, from
    another directory."""
    result = subprocess.run(
        [sys.executable, mini.__file__, "--out", str(tmp_path), "--smoke", "--seeds", "0,0"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert_one_line_error(result.returncode, result.stderr, "seeds [0] are repeated")
    assert result.stdout == "" and os.listdir(tmp_path) == []


SMOKE_ROWS = ["base", "cpt", "gold-qwen", "pkl-qwen", "two-teachers"]


def test_smoke_run_of_every_stage_then_a_rerun_trains_nothing(tmp_path, capsys):
    """Every stage with a few steps: the three teachers, a base, students with each loss family
    (CE, GOLD, P-KL with a learned W, H-KL + KL from two teachers), evaluate.py on the three tasks,
    the report. Then the same command again: everything is found done."""
    out = str(tmp_path / "run")
    argv = ["--out", out, "--smoke", *(w for r in SMOKE_ROWS for w in ("--row", r))]
    assert mini.main(argv) == 0
    first = capsys.readouterr().out
    assert first.count(" trained ") == 3 + 1 + 4  # teachers, the base, the students
    summary = json.load(open(os.path.join(out, "results.json")))
    assert summary["rows"] == SMOKE_ROWS
    assert summary["audits"]["qwen"]["recommended"] == "pkl"
    assert summary["audits"]["o200k"]["recommended"] == "hkl"
    labels = [f"{r} / seed 0" for r in SMOKE_ROWS] + [f"teacher {k}" for k in mini.TEACHERS]
    assert sorted(summary["results"]) == sorted(labels)
    for label in labels:
        result = summary["results"][label]
        assert all(0 <= result[t] <= 100 for t in mini.TASKS)
        assert 0 <= result["multi_digit_mass"] <= 1 and 0 < result["p_correct"] < 1
    table = open(os.path.join(out, "results.md")).read()
    assert all(f"| {r} |" in table for r in SMOKE_ROWS) and table.count("\n1. ") == 1
    assert len(summary["claims"]) == 5
    for name in ("results.md", "results.csv", "results.png"):  # evaluate.py's own table
        assert os.path.getsize(os.path.join(out, "eval", name)) > 0
    assert os.path.getsize(os.path.join(out, "results.png")) > 0
    assert mini.main(argv) == 0  # everything finished: no training, cached evaluations
    assert " trained " not in capsys.readouterr().out
    # a run made by another command (here: its record altered) is trained again, and only it
    with open(os.path.join(out, "runs", "cpt-seed0", "mini_job.json"), "w") as f:
        f.write("{}")
    assert mini.main(argv) == 0
    again = capsys.readouterr().out
    assert again.count(" trained ") == 1 and "trained cpt / seed 0 in" in again
