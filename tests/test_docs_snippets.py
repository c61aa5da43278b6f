"""Every Python block of the documentation runs.

Convention: a fenced ```` ```python ```` block preceded by the line ``<!-- runnable -->`` is
executed, each in a fresh namespace with a fresh temporary working directory. A Python block
without that marker must carry ``<!-- not-runnable: reason -->`` instead, so no example goes
unchecked by accident. A YAML block preceded by ``<!-- model-config -->`` must be a valid model
config (``ModelConfig.from_dict``). Shell blocks are never run.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PAGES = [*sorted((ROOT / "docs").rglob("*.md")), ROOT / "README.md"]
PAGES = [p for p in PAGES if p.is_file() and "benchmarks" not in p.relative_to(ROOT).parts[:2]]

FENCE = re.compile(
    r"^(?P<marker><!-- (?P<kind>runnable|not-runnable[^>]*|model-config) -->\n)?"
    r"```(?P<lang>[\w-]*)[^\n]*\n(?P<body>.*?)^```[ \t]*$",
    re.MULTILINE | re.DOTALL,
)


def _blocks(kind: str) -> list[tuple[str, str]]:
    found = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for match in FENCE.finditer(text):
            if (match["kind"] or "").startswith(kind) and match["kind"] is not None:
                line = text.count("\n", 0, match.start()) + 1
                found.append((f"{page.relative_to(ROOT)}:{line}", match["body"]))
    return found


RUNNABLE = _blocks("runnable")
CONFIGS = _blocks("model-config")


def test_every_python_block_is_marked():
    unmarked = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for match in FENCE.finditer(text):
            if match["lang"] in ("python", "py") and match["kind"] is None:
                line = text.count("\n", 0, match.start()) + 1
                unmarked.append(f"{page.relative_to(ROOT)}:{line}")
    assert not unmarked, f"python blocks without a runnable / not-runnable marker: {unmarked}"


def test_docs_have_runnable_snippets():
    pages = {where.split(":")[0] for where, _ in RUNNABLE}
    assert {"README.md", "docs/index.md", "docs/concepts.md", "docs/compose.md"} <= pages


@pytest.mark.parametrize(("where", "code"), RUNNABLE, ids=[w for w, _ in RUNNABLE])
def test_snippet_runs(where, code, tmp_path, monkeypatch, isolated_registry):
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__docs__"}
    exec(compile(code, where, "exec"), namespace)


@pytest.mark.parametrize(("where", "text"), CONFIGS, ids=[w for w, _ in CONFIGS])
def test_model_config_block_is_valid(where, text):
    from fusionkit import ModelConfig

    config = yaml.safe_load(text)
    ModelConfig.from_dict(config)
