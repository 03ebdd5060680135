"""docs/architecture.md is the layout: its module list and commands table match the code."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")


def _section(title: str) -> str:
    return DOC.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_the_module_list_names_every_module_on_disk_once_with_a_line():
    package = ROOT / "platform" / "chatsft"
    on_disk = {p.relative_to(package).as_posix() for p in package.rglob("*.py") if p.name != "__init__.py"}
    entries = re.findall(r"^- `([\w/]+\.py)`: (.+)$", _section("Modules"), flags=re.M)
    listed = [path for path, _ in entries]
    assert len(listed) == len(set(listed)), "a module is listed twice"
    assert set(listed) == on_disk, (f"listed but not on disk: {sorted(set(listed) - on_disk)}; "
                                    f"on disk but not listed: {sorted(on_disk - set(listed))}")
    assert all(len(line.strip()) > 10 for _, line in entries)


def test_the_commands_table_holds_every_verb():
    from chatsft.cli import VERBS

    table = set(re.findall(r"^\| `(\w+)[^`]*` \|", _section("Commands"), flags=re.M))  # `cache list|prune`: its verb
    assert table == set(VERBS) | {"keys"}
