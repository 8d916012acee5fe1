"""The README's module map names every module of the core and the nodes, and only what exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAPPED = ("lora_train_core", "nodes")
ENTRY = re.compile(r"^(?P<indent> *)(?P<name>\S+)(?: +(?P<what>\S.*))?$")


def readme_map() -> dict[str, str]:
    """path → what the map says it owns, from the README's code block that starts the core's tree.

    Each line is `<indent><name> <what it owns>`; two spaces of indent per folder level, and a
    folder's name ends in "/".
    """
    blocks, block = [], None
    for line in (ROOT / "README.md").read_text(encoding="utf-8").splitlines():
        if line.startswith("```") and block is None:
            block = []
        elif line.startswith("```"):
            blocks.append(block)
            block = None
        elif block is not None:
            block.append(line)
    (lines,) = [b for b in blocks if any(line.startswith("lora_train_core/ ") for line in b)]
    entries, folders = {}, []
    for line in lines:
        match = ENTRY.match(line)
        assert match, f"not a map line: {line!r}"
        depth, name = len(match["indent"]) // 2, match["name"]
        assert len(match["indent"]) % 2 == 0 and depth <= len(folders), f"bad indent: {line!r}"
        folders = folders[:depth]
        path = "/".join([*folders, name.rstrip("/")])
        entries[path] = match["what"] or ""
        if name.endswith("/"):
            folders.append(name.rstrip("/"))
    return entries


def tree_modules() -> set[str]:
    """Every module and package under lora_train_core/ and nodes/ (a package's __init__.py is its folder)."""
    found = set()
    for top in MAPPED:
        for path in (ROOT / top).rglob("*.py"):
            if "__pycache__" in path.parts:
                continue
            found.add(str((path.parent if path.name == "__init__.py" else path).relative_to(ROOT)))
    return found


def test_the_map_lists_every_module_of_the_tree():
    assert sorted(tree_modules() - set(readme_map())) == []


def test_every_path_the_map_names_exists():
    assert sorted(p for p in readme_map() if not (ROOT / p).exists()) == []


def test_every_module_in_the_map_says_what_it_owns():
    assert sorted(p for p, what in readme_map().items() if not what.strip()) == []
