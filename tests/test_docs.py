"""The documentation points only at what the repository holds."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")  # [text](target)
PATH_IN_CODE = re.compile(r"`(\.\./[^`\s]+)`")  # `../somewhere`: outside the repository


def _documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_every_relative_link_resolves_inside_the_repository():
    broken = []
    for doc in _documents():
        text = doc.read_text()
        for link in LINK.findall(text):
            if re.match(r"[a-z]+:|#", link):  # web addresses, anchors
                continue
            target = (doc.parent / link.split("#")[0]).resolve()
            if not target.exists() or ROOT not in target.parents:
                broken.append(f"{doc.relative_to(ROOT)}: {link}")
        broken += [f"{doc.relative_to(ROOT)}: {p}" for p in PATH_IN_CODE.findall(text)]
    assert not broken, broken


def test_the_link_check_can_fail(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text("[a](missing.md) and `../shared/notes.md`")
    text = doc.read_text()
    assert LINK.findall(text) == ["missing.md"]
    assert PATH_IN_CODE.findall(text) == ["../shared/notes.md"]
    assert not (doc.parent / "missing.md").exists()
