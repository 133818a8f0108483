"""The repository's shape, as README's map states it: every top-level module is in the map as core
or option, and the core (the method a reader learns in one sitting) stays within the size README
states, so that a new feature pays for its lines in an optional module."""

from __future__ import annotations

import glob
import os
import re

from conftest import ROOT


def map_rows() -> dict[str, str]:
    """README's map: {file: "core" | "option" | "support"}, from its table rows."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[1] in ("core", "option", "support"):
            for name in re.findall(r"\[([\w/.]+)\]\(", cells[0]):
                rows[name] = cells[1]
    return rows


def stated_core_budget() -> int:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        found = re.search(r"The core[^.]*? under ([\d,]+) lines", f.read())
    assert found, "README must state the core's size: 'The core ... under N lines'"
    return int(found.group(1).replace(",", ""))


def test_every_top_level_module_is_in_the_map_as_core_support_or_option():
    rows = map_rows()
    modules = {os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "*.py"))}
    assert modules - set(rows) == set(), "add these modules to README's map"
    for name in rows:
        assert os.path.exists(os.path.join(ROOT, name.rstrip("/"))), name


def test_the_core_stays_within_its_stated_size():
    core = [name for name, kind in map_rows().items() if kind == "core"]
    assert {"train.py", "losses.py", "align.py", "data.py"} <= set(core)
    lines = 0
    for name in core:
        with open(os.path.join(ROOT, name), encoding="utf-8") as f:
            lines += sum(1 for _ in f)
    budget = stated_core_budget()
    assert lines <= budget, f"the core has {lines} lines, README states under {budget}"
