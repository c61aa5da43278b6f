"""MkDocs hook: inline the generated reports into their guide pages, if they exist.

The benchmark suite writes ``docs/benchmarks/README.md`` (and PNG charts beside it); the
results job writes ``docs/results/robustness.md``. Both are produced by other commands, may be
absent, and use links relative to their own folder. A page containing the marker
``<!-- include: docs/<folder>/<file>.md -->`` (or ``a.md|b.md``: the first that exists) gets
the file's content in place of the marker, its headings moved one level down and its relative
links and images rebased onto the folder, so the site builds in strict mode with or without
the reports.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path

MARKER = re.compile(r"^<!-- include: (?P<paths>docs/[\w./|-]+\.md) -->[ \t]*$", re.MULTILINE)
LINK = re.compile(r"(?P<head>!?\[[^\]]*\]\()(?P<target>[^)\s]+)(?P<tail>[^)]*\))")
SRC = re.compile(r"""(?P<head>\b(?:src|href)=["'])(?P<target>[^"']+)(?P<tail>["'])""")
HEADING = re.compile(r"^(#{1,5}) ", re.MULTILINE)


def _rebase(target: str, folder: str) -> str:
    if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith(("#", "/")):
        return target
    return posixpath.normpath(posixpath.join(folder, target))


def _inline(path: Path, docs_dir: Path, page_dir: str) -> str:
    folder = posixpath.relpath(path.parent.relative_to(docs_dir).as_posix(), page_dir or ".")
    text = path.read_text(encoding="utf-8")
    parts = re.split(r"(^```.*?^```[ \t]*$)", text, flags=re.MULTILINE | re.DOTALL)
    for i in range(0, len(parts), 2):  # leave fenced code alone
        part = HEADING.sub(r"#\1 ", parts[i])
        part = LINK.sub(lambda m: m["head"] + _rebase(m["target"], folder) + m["tail"], part)
        parts[i] = SRC.sub(lambda m: m["head"] + _rebase(m["target"], folder) + m["tail"], part)
    return "".join(parts)


def on_page_markdown(markdown, page, config, files):
    docs_dir = Path(config["docs_dir"])
    root = docs_dir.parent
    page_dir = posixpath.dirname(page.file.src_uri)

    def replace(match: re.Match) -> str:
        # "a.md|b.md": the first file that exists.
        for name in match["paths"].split("|"):
            path = root / name
            if path.is_file():
                return _inline(path, docs_dir, page_dir)
        return ""

    return MARKER.sub(replace, markdown)
