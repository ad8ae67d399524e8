"""No function outside the tests is over 80 lines: past that it is usually two things.

    .venv/bin/python tests/unit/test_function_length.py [N]

prints the N longest (default 5).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ROOTS = [REPO / "agent" / "colo_agent", REPO / "operator" / "colo_operator", REPO / "benchmarks"]
LIMIT = 80


def function_lengths(source: str, where: str) -> list[tuple[int, str]]:
    """(lines from `def` to the last line of the body, "where:line name") of every function."""
    tree = ast.parse(source, where)
    return [
        (node.end_lineno - node.lineno + 1, f"{where}:{node.lineno} {node.name}")
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno is not None
    ]


def longest() -> list[tuple[int, str]]:
    found = [
        row
        for root in ROOTS
        for path in sorted(root.rglob("*.py"))
        for row in function_lengths(path.read_text(), str(path.relative_to(REPO)))
    ]
    return sorted(found, key=lambda row: (-row[0], row[1]))


def test_no_function_outside_the_tests_is_over_80_lines() -> None:
    rows = longest()
    assert len(rows) > 500  # the walk found the code
    assert [f"{n} lines: {where}" for n, where in rows if n > LIMIT] == []


def test_a_function_is_measured_from_def_to_its_last_line() -> None:
    body = "".join(f"    x{i} = {i}\n" for i in range(LIMIT))
    source = f"@decorated\nasync def long():\n{body}\ndef short():\n    pass\n"
    assert function_lengths(source, "m.py") == [(LIMIT + 1, "m.py:2 long"), (2, "m.py:84 short")]


if __name__ == "__main__":
    for n, where in longest()[: int(sys.argv[1]) if len(sys.argv) > 1 else 5]:
        print(f"{n:4d}  {where}")
