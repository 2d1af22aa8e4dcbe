"""Static checks a refactor needs: no name used that is not defined.

pyflakes, limited to the errors that are always bugs (an undefined name
only fails when its line runs, and some lines run only in production:
`llmesh models build` without --home, a service's error path).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from pyflakes import api, messages
from pyflakes.reporter import Reporter

REPO = Path(__file__).resolve().parents[1]
BUGS = (messages.UndefinedName, messages.UndefinedExport, messages.UndefinedLocal, messages.ImportStarUsed)


class _Collect(Reporter):
    def __init__(self) -> None:
        super().__init__(None, None)
        self.found: list[str] = []

    def flake(self, message) -> None:
        if isinstance(message, BUGS):
            self.found.append(str(message))

    def syntaxError(self, filename, msg, lineno, offset, text) -> None:  # noqa: N802 - pyflakes' name
        self.found.append(f"{filename}:{lineno}: {msg}")

    def unexpectedError(self, filename, msg) -> None:  # noqa: N802 - pyflakes' name
        self.found.append(f"{filename}: {msg}")


@pytest.mark.parametrize("root", ["services", "router", "scaler", "monitor", "tests"])
def test_no_undefined_names(root):
    reporter = _Collect()
    for path in sorted((REPO / root).rglob("*.py")):
        api.checkPath(str(path), reporter)
    assert not reporter.found, "\n".join(reporter.found)
