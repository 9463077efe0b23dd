"""Every test folder is collected by a plain `pytest` (the README's test command).

pytest skips folders matching `norecursedirs` when it walks `testpaths`; its
default list holds `dist` and `build`. The two-process tests lived in
`tests/dist/` for five sessions and ran only when named on the command line,
never in CI.
"""
from __future__ import annotations

import fnmatch
from pathlib import Path

TESTS = Path(__file__).parent


def test_no_test_folder_is_skipped_by_norecursedirs(pytestconfig):
    patterns = pytestconfig.getini("norecursedirs")
    folders = {p.parent for p in TESTS.rglob("test_*.py")} - {TESTS}
    skipped = sorted(str(f.relative_to(TESTS)) for f in folders
                     if any(fnmatch.fnmatch(part, pat) for part in f.relative_to(TESTS).parts for pat in patterns))
    assert not skipped, f"pytest would not collect {skipped} (norecursedirs {patterns})"
