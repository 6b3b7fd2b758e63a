"""The docs point at the code and tests they describe: every `[text](path#Lnn "symbol")` link names a
file that exists and a line that holds `symbol`, and every relative link resolves.

After an edit moves code, `python tests/test_docs.py --fix` moves each anchor to the first line
holding its symbol.
"""

import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
LINK = re.compile(r"\]\(([^)\s#]+)(?:#L(\d+))?(?: \"([^\"]+)\")?\)")


def links(doc: pathlib.Path):
    """(target path, line or None, symbol or None, position) of every relative link in a document."""
    for match in LINK.finditer(doc.read_text(encoding="utf-8")):
        target, line, symbol = match.groups()
        if not target.startswith(("http://", "https://", "mailto:")):
            yield (doc.parent / target).resolve(), int(line) if line else None, symbol, match


def line_of(path: pathlib.Path, symbol: str) -> int | None:
    """The first line of `path` that holds `symbol`."""
    for number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if symbol in text:
            return number
    return None


def test_relative_links_resolve():
    broken = [f"{doc.relative_to(ROOT)}: {target}" for doc in DOCS for target, _, _, _ in links(doc)
              if not target.exists()]
    assert not broken, broken


def test_line_anchors_hold_their_symbol():
    anchored = [(doc, *link) for doc in DOCS for link in links(doc) if link[1] is not None]
    assert len(anchored) >= 30  # the algorithm pages link their implementation details
    wrong = []
    for doc, target, line, symbol, _ in anchored:
        lines = target.read_text(encoding="utf-8").splitlines() if target.is_file() else []
        if symbol is None or not 0 < line <= len(lines) or symbol not in lines[line - 1]:
            wrong.append(f"{doc.relative_to(ROOT)}: {target.relative_to(ROOT)}#L{line} should hold {symbol!r}")
    assert not wrong, "\n".join(wrong) + "\nrun: python tests/test_docs.py --fix"


def fix() -> None:
    """Move every line anchor to the first line that holds its symbol."""
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")

        def anchor(match, doc=doc):
            target, line, symbol = match.groups()
            path = (doc.parent / target).resolve()
            if line is None or symbol is None or not path.is_file():
                return match.group(0)
            found = line_of(path, symbol)
            if found is None:
                raise SystemExit(f"{doc}: {symbol!r} is not in {target}")
            return f']({target}#L{found} "{symbol}")'

        doc.write_text(LINK.sub(anchor, text), encoding="utf-8")


if __name__ == "__main__" and "--fix" in sys.argv:
    fix()
