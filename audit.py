"""Coverage audit: which student tokens does the teacher see one-to-one, and which loss to use.

GOLD and H-KL split the vocabularies into a common set (trained with KL) and the rest (sorted-L1).
That split is only sound if the tokens that matter are in the common set. Llama-3.2 packs numbers
into 1,100 multi-digit tokens ("00".."999"); Qwen3 splits every number into digits, so none of them
is common: GOLD's common-KL term then pushes all of them down (METHOD.md Proposition 1) and P-KL,
which has no partition, is the loss to use. o200k (Phi-4-mini) has all 1,100: H-KL is sound.

For each category of student tokens the audit counts: in the strict common set (exact pass),
added by the H-KL set (top W weight >= threshold), mapped only through several teacher pieces,
unmapped. Then it recommends pkl or hkl from the critical category's coverage (METHOD.md sec. 3).
It also lists the special tokens W pairs (end of document, bos, pad, unk: by meaning), and --plot
draws the table: one bar per category, split into its four shares (needs matplotlib).

    python audit.py --student pkg:llama-3.2 --teacher pkg:qwen3 --plot audit.png
    python audit.py --student S --teacher T --projection W.pt --json audit.json --show 201 " the"
"""

from __future__ import annotations

import json
import os
import re
import sys

import torch

from build_projection import build_projection, hkl_pairs, load_projection, model_vocab_size
from cli import (
    ArgumentParser,
    add_model_flags,
    atomic_write,
    check_output_file,
    float_flag,
    one_line_errors,
)
from tokens import load_tokenizer, token_bytes

CATEGORIES = (
    "digits_1",
    "digits_2",
    "digits_3",
    "punct_ascii",
    "alpha",
    "whitespace",
    "non_ascii",
    "utf8_fragment",
    "special",
)
CRITICAL = ("digits_2", "digits_3")  # multi-digit numerals
STATUSES = ("common", "hkl_added", "multi_piece", "unmapped")  # disjoint, in this order
PUNCT = re.escape("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")
PATTERNS = {
    "digits_1": re.compile(rb"^ ?[0-9]$"),
    "digits_2": re.compile(rb"^ ?[0-9]{2}$"),
    "digits_3": re.compile(rb"^ ?[0-9]{3}$"),
    "punct_ascii": re.compile(rb"^ ?[" + PUNCT.encode() + rb"]+$"),
    "alpha": re.compile(rb"^ ?[A-Za-z]+$"),
    "whitespace": re.compile(rb"^\s+$"),
}


def categorize(b: bytes | None) -> str:
    """The category of one student token's bytes ("other" for mixed ASCII such as "_ptr")."""
    if b is None:
        return "special"
    for name, pattern in PATTERNS.items():
        if pattern.match(b):
            return name
    try:
        text = b.decode("utf-8")
    except UnicodeDecodeError:
        return "utf8_fragment"
    return "other" if text.isascii() else "non_ascii"


def audit(
    student_tok,
    projection: dict,
    *,
    threshold: float = 0.6,
    critical: tuple[str, ...] = CRITICAL,
    min_coverage: float = 0.9,
) -> dict:
    """Coverage per category and the recommended loss; the dict that --json writes."""
    if not 0 < threshold <= 1:  # also NaN
        raise ValueError(f"threshold {threshold} is out of range; give a number in (0, 1]")
    if not 0 <= min_coverage <= 1:
        raise ValueError(f"min_coverage {min_coverage} is out of range; give a number in [0, 1]")
    unknown = [c for c in critical if c not in (*CATEGORIES, "other")]
    if unknown:
        raise ValueError(f"unknown category {unknown}; choose from {', '.join(CATEGORIES)}, other")
    critical = tuple(dict.fromkeys(critical))  # a repeated category counts once
    W, exact = projection["W"].coalesce(), projection["exact_pairs"]
    n_rows = W.shape[0]
    common = torch.zeros(n_rows, dtype=torch.bool)
    common[exact[:, 0]] = True
    hkl = torch.zeros(n_rows, dtype=torch.bool)
    hkl[hkl_pairs(W, exact, threshold=threshold)[:, 0]] = True
    mapped = torch.zeros(n_rows, dtype=torch.bool)
    mapped[W.indices()[0]] = True
    # disjoint: common, else hkl_added, else multi_piece (other non-empty rows), else unmapped
    status = torch.where(common, 0, torch.where(hkl, 1, torch.where(mapped, 2, 3))).tolist()
    keys = STATUSES

    counts = {name: dict.fromkeys(("total", *keys), 0) for name in (*CATEGORIES, "other")}
    for b, s in zip(token_bytes(student_tok), status):
        row = counts[categorize(b)]
        row["total"] += 1
        row[keys[s]] += 1

    total = sum(counts[c]["total"] for c in critical)
    covered = sum(counts[c]["common"] for c in critical)
    coverage = covered / total if total else 1.0
    names = "+".join(critical)
    if coverage >= min_coverage:
        recommended = "hkl"
        reason = (
            f"{covered}/{total} {names} tokens are in the strict common set "
            f"({coverage:.0%} >= {min_coverage:.0%}): the partition is sound, use H-KL"
        )
    else:
        recommended = "pkl"
        reason = (
            f"only {covered}/{total} {names} tokens are in the strict common set "
            f"({coverage:.0%} < {min_coverage:.0%}): GOLD/H-KL would suppress the rest, use P-KL"
        )
    other = counts.pop("other")
    return {
        "categories": counts,
        "other": other,
        "recommended": recommended,
        "reason": reason,
        "special_pairs": list(projection.get("special_pairs", [])),
        "student": projection["student"],
        "teacher": projection["teacher"],
        "threshold": threshold,
        "critical": list(critical),
    }


def format_table(report: dict) -> str:
    keys = ("total", "common", "hkl_added", "multi_piece", "unmapped")
    lines = [f"{'category':<14}" + "".join(f"{k:>12}" for k in keys)]
    rows = {**report["categories"], "other": report["other"]}
    for name, row in rows.items():
        lines.append(f"{name:<14}" + "".join(f"{row[k]:>12,}" for k in keys))
    pairs = report.get("special_pairs", [])
    lines.append("special tokens paired:" + ("" if pairs else " none"))
    for p in pairs:
        lines.append(
            f"  {p['role']:<17}{p['student_token']!r} ({p['student_id']}) <-> "
            f"{p['teacher_token']!r} ({p['teacher_id']})"
        )
    lines.append(f"recommended loss: {report['recommended']} ({report['reason']})")
    return "\n".join(lines)


def show_rows(student_tok, teacher_tok, projection: dict, tokens: list[str]) -> str:
    """W's rows for student tokens given as text (" the", "201") or as ids."""
    W = projection["W"].coalesce()
    indices, values = W.indices(), W.values()
    lines = []
    for token in tokens:
        ids = student_tok.encode(token, add_special_tokens=False)
        if len(ids) != 1 and token.removeprefix("id:").isdigit():  # "128000" is an id, "201" text
            ids = [int(token.removeprefix("id:"))]
        if len(ids) != 1 or not 0 <= ids[0] < W.shape[0]:
            pieces = student_tok.convert_ids_to_tokens(ids)
            lines.append(f"{token!r}: not one student token (it encodes as {pieces}); pass id:N")
            continue
        s = ids[0]
        mask = indices[0] == s
        entries = sorted(zip(values[mask].tolist(), indices[1][mask].tolist()), reverse=True)
        shown = ", ".join(
            f"{teacher_tok.convert_ids_to_tokens(t)!r} ({t}) {w:.4f}" for w, t in entries
        )
        name = student_tok.convert_ids_to_tokens(s)
        lines.append(f"{name!r} ({s}) -> {shown or 'nothing (empty row)'}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- --plot

PLOT_LABELS = {
    "common": "common (exact pair)",
    "hkl_added": "added by H-KL",
    "multi_piece": "multi-piece only",
    "unmapped": "unmapped",
}
PLOT_COLORS = {
    "common": "#2e7d32",
    "hkl_added": "#1f77b4",
    "multi_piece": "#f0a030",
    "unmapped": "#b0b0b0",
}


def plot_data(report: dict) -> list[dict]:
    """The bars of --plot, top to bottom: each category that has tokens, with its counts and its
    shares of the category's tokens (common, hkl_added, multi_piece, unmapped: they sum to 1)."""
    rows = {**report["categories"], "other": report["other"]}
    critical = set(report.get("critical", CRITICAL))
    return [
        {
            "category": name,
            "critical": name in critical,
            "total": row["total"],
            "counts": {k: row[k] for k in STATUSES},
            "shares": {k: row[k] / row["total"] for k in STATUSES},
        }
        for name, row in rows.items()
        if row["total"]
    ]


def _figure_class():
    """matplotlib's Figure (no pyplot: no global state, no display needed); optional."""
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ValueError(
            "--plot needs matplotlib, which is not installed: pip install matplotlib"
        ) from e
    return Figure


def plot_report(report: dict, path: str, student: str, teacher: str) -> None:
    """Write the audit as a PNG (atomically): per category, stacked horizontal bars of the four
    shares with their counts; the recommendation and its reason (shortened) in the title."""
    bars = plot_data(report)
    height = 2.1 + 0.42 * len(bars)  # inches: fixed margins (titles, axis, legend) + the bars
    fig = _figure_class()(figsize=(11, height), dpi=110)
    ax = fig.add_axes((0.17, 1.15 / height, 0.56, 1 - 2.0 / height))
    ys = range(len(bars))[::-1]  # first category on top
    left = [0.0] * len(bars)
    for key in STATUSES:
        widths = [b["shares"][key] for b in bars]
        ax.barh(ys, widths, left=left, height=0.7, color=PLOT_COLORS[key], label=PLOT_LABELS[key])
        for y, x, width, bar in zip(ys, left, widths, bars):
            if width >= 0.07:  # the count inside its segment where it fits
                color = "white" if key in ("common", "hkl_added") else "black"
                text = f"{bar['counts'][key]:,}"
                ax.text(x + width / 2, y, text, ha="center", va="center", fontsize=8, color=color)
        left = [x + w for x, w in zip(left, widths)]
    # every count, also those of segments too narrow to hold one, in a column right of the bars
    column = {"fontsize": 8, "transform": ax.get_yaxis_transform()}
    header = "common / H-KL / multi / unmapped"
    ax.text(1.02, len(bars) - 0.4, header, va="bottom", color="#444444", **column)
    for y, bar in zip(ys, bars):
        ax.text(
            1.02, y, " / ".join(f"{bar['counts'][k]:,}" for k in STATUSES), va="center", **column
        )
    labels = [f"{b['category']}{' *' if b['critical'] else ''}  ({b['total']:,})" for b in bars]
    ax.set_yticks(list(ys), labels)
    for tick, bar in zip(ax.get_yticklabels(), bars):
        tick.set_fontweight("bold" if bar["critical"] else "normal")
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.6, len(bars) - 0.4)
    ax.xaxis.set_major_formatter(lambda x, _: f"{x:.0%}")
    ax.set_xlabel("share of the category's student tokens   (n): its tokens   *: critical")
    fig.legend(loc="lower center", bbox_to_anchor=(0.45, 0.01), ncol=4, fontsize=8, frameon=False)
    loss = {"pkl": "P-KL", "hkl": "H-KL"}.get(report["recommended"], report["recommended"])
    reason = report["reason"].split(": ")[0]  # the counts, without the advice that repeats the loss
    fig.suptitle(
        f"{student} vs {teacher}: recommended loss {loss}", fontsize=12, y=1 - 0.2 / height
    )
    ax.set_title(reason, fontsize=9, pad=8)
    atomic_write(path, lambda f: fig.savefig(f, format="png"))


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="audit.py", description=__doc__.split("\n\n")[0])
    add_model_flags(parser)
    parser.add_argument(
        "--projection",
        help="a W file: build_projection.py's, or NeMo-RL/TRL's top-k file (default: build it)",
    )
    parser.add_argument("--json", help="write the report as JSON to this file")
    parser.add_argument("--plot", metavar="PNG", help="draw the table into this PNG (matplotlib)")
    parser.add_argument(
        "--show", nargs="+", metavar="TOKEN", help="print W's rows for these tokens"
    )
    parser.add_argument(
        "--threshold",
        type=float_flag(0, 1, low_open=True, what=" (a top W weight)"),
        default=0.6,
        help="H-KL top-weight threshold, in (0, 1]",
    )
    parser.add_argument("--critical", default=",".join(CRITICAL), help="critical categories")
    parser.add_argument(
        "--min-coverage",
        type=float_flag(0, 1, what=" (a share of the critical tokens)"),
        default=0.9,
        help="hkl at or above this share, in [0, 1]",
    )
    parser.add_argument("--trust-remote-code", action="store_true")
    args = parser.parse_args(argv)
    return one_line_errors(lambda: _run(args))


def _run(args) -> int:
    critical = tuple(dict.fromkeys(args.critical.split(",")))  # a repeat counts once
    unknown = [c for c in critical if c not in (*CATEGORIES, "other")]
    if unknown:
        raise ValueError(
            f"--critical: unknown category {unknown}; choose from {', '.join(CATEGORIES)}, other"
        )
    if args.json is not None:
        check_output_file(args.json, "--json", "audit.json")  # before the slow work
    if args.plot is not None:
        check_output_file(args.plot, "--plot", "audit.png")
        _figure_class()  # matplotlib is there
    if args.projection is not None and not os.path.isfile(args.projection):
        load_projection(args.projection)  # its error: a directory, or not there
    student = load_tokenizer(args.student, trust_remote_code=args.trust_remote_code)
    teacher = load_tokenizer(args.teacher, trust_remote_code=args.trust_remote_code)
    if args.projection:
        projection = load_projection(args.projection, student, teacher)
    else:
        hint = "--projection (a W from build_projection.py --{}-vocab-size N)"
        projection = build_projection(
            student,
            teacher,
            student_vocab_size=model_vocab_size(args.student, hint.format("student")),
            teacher_vocab_size=model_vocab_size(args.teacher, hint.format("teacher")),
        )
    report = audit(
        student,
        projection,
        threshold=args.threshold,
        critical=critical,
        min_coverage=args.min_coverage,
    )
    if args.json:
        text = json.dumps(report, indent=2) + "\n"
        atomic_write(args.json, lambda f: f.write(text.encode()))
    if args.plot:
        plot_report(report, args.plot, args.student, args.teacher)
    print(f"student {args.student}  teacher {args.teacher}")
    print(format_table(report))
    if args.show:
        print(show_rows(student, teacher, projection, args.show))
    return 0


if __name__ == "__main__":
    sys.exit(main())
