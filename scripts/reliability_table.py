"""Writes the README's reliability table from the tests' ``fault`` marks.

Each test (or parametrised case) marked ``@pytest.mark.fault(fault, behaviour)`` is one
row: the fault or bad input, what the tool does, and the test that shows it. The table
lives between the ``reliability:begin`` / ``reliability:end`` comments of README.md.

    python scripts/reliability_table.py           # rewrite the table
    python scripts/reliability_table.py --check   # exit 1 if the README's table is stale
"""

from __future__ import annotations

import contextlib
import io
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))
import harness  # noqa: E402 - the README section writer the benchmarks share


class _Collector:
    def __init__(self):
        self.rows: list[tuple[str, str, str]] = []

    def pytest_collection_modifyitems(self, items):
        for item in items:
            for mark in item.iter_markers('fault'):
                fault, behaviour = mark.args
                self.rows.append((fault, behaviour, item.nodeid))


def rows() -> list[tuple[str, str, str]]:
    """(fault, behaviour, test id) of every marked test, in collection order."""
    collector = _Collector()
    with contextlib.redirect_stdout(io.StringIO()) as out:
        code = pytest.main(
            ['--collect-only', '-q', '-p', 'no:cacheprovider', os.path.join(ROOT, 'tests')],
            plugins=[collector],
        )
    if code not in (0, 5):
        raise SystemExit(f'collecting the tests failed (pytest exit {code}):\n{out.getvalue()}')
    return collector.rows


def table(found: list[tuple[str, str, str]]) -> str:
    """The markdown table."""
    lines = ['| Fault or bad input | Behaviour | Test |', '|---|---|---|']
    for fault, behaviour, nodeid in found:
        test = nodeid.removeprefix('tests/')
        lines.append(f'| {fault} | {behaviour} | `{test}` |')
    return '\n'.join(lines)


def main(argv: list[str]) -> int:
    current = harness.readme_section('reliability', table(rows()), check='--check' in argv)
    if '--check' in argv and not current:
        print('README.md reliability table is stale: run python scripts/reliability_table.py')
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
