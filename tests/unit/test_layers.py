"""jobs/ sits on top of the house: a job entry point reaches chatsft through the CLI only
(the layers inside the package are import-linter's contract, pyproject.toml)."""

import ast
from pathlib import Path

JOBS = Path(__file__).resolve().parents[2] / "jobs"


def test_jobs_import_only_the_cli():
    found = {}
    for path in sorted(JOBS.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("chatsft"):
                found.setdefault(path.name, set()).add(node.module)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("chatsft"):
                        found.setdefault(path.name, set()).add(alias.name)
    assert set(found) == {p.name for p in JOBS.glob("*.py")}
    assert all(mods == {"chatsft.cli"} for mods in found.values()), found
