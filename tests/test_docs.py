"""The documentation works as written: its code runs, its JSON parses, its links lead somewhere.

Conventions (README.md and docs/*.md):

- every ```python block is a complete script. It runs in a fresh process, in a temporary
  directory, with this tree first on ``PYTHONPATH``, and must exit with code 0 within 120 s;
- an HTML comment on the line before a block changes that: ``<!-- not-run: reason -->`` for a
  block that cannot run in one CPU process (the reason says why; it must still compile), and
  ``<!-- torchrun: N -->`` for a block that runs under ``torch.distributed.run`` with N ranks;
- every ```json block parses as a whole;
- every relative link or image, in those files and in the READMEs of tests/, benchmarks/,
  launch/ and integrations/, names a file that exists, and an ``#anchor`` into a Markdown file
  names one of its headings.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SNIPPET_TIMEOUT = 120
README_MAX_LINES = 200

DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK_FILES = [
    ROOT / "README.md",
    *sorted((ROOT / "docs").rglob("*.md")),
    ROOT / "tests" / "README.md",
    ROOT / "benchmarks" / "README.md",
    ROOT / "launch" / "README.md",
    *sorted((ROOT / "integrations").rglob("README.md")),
]

FENCE = re.compile(r"^(\s*)(`{3,})\s*([\w+-]*)\s*$")
MARKER = re.compile(r"^<!--\s*(not-run|torchrun)\s*:\s*(.*?)\s*-->$")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
INLINE_CODE = re.compile(r"(`+).*?\1")


@dataclass(frozen=True)
class Block:
    """One fenced code block of a Markdown file."""

    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    marker: str | None  # "not-run" or "torchrun", from the comment before the fence
    argument: str  # the marker's reason, or the number of ranks

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def blocks(path: Path) -> list[Block]:
    """The fenced code blocks of ``path``, with the marker comment before each, if any."""
    lines = path.read_text(encoding="utf-8").splitlines()
    found, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = m.groups()
        j = i + 1
        while j < len(lines) and lines[j].strip() != fence:
            j += 1
        code = "\n".join(line[len(indent):] if line.startswith(indent) else line for line in lines[i + 1:j])
        prev = next((lines[k].strip() for k in range(i - 1, -1, -1) if lines[k].strip()), "")
        mark = MARKER.match(prev)
        found.append(Block(path, i + 1, lang.lower(), code + "\n", mark.group(1) if mark else None,
                           mark.group(2) if mark else ""))
        i = j + 1
    return found


def prose(path: Path, *, keep_code: bool = False) -> list[tuple[int, str]]:
    """``(line number, text)`` of the lines outside fenced code, inline code removed unless kept."""
    out, fence = [], None
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        m = FENCE.match(line)
        if fence is None and m:
            fence = m.group(2)
        elif fence is not None and line.strip() == fence:
            fence = None
        elif fence is None:
            out.append((n, line if keep_code else INLINE_CODE.sub("", line)))
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors of the headings of a Markdown file (repeats get GitHub's -1, -2 suffixes)."""
    seen: dict[str, int] = {}
    out = set()
    for _, line in prose(path, keep_code=True):
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            base = slug(m.group(1))
            out.add(base if base not in seen else f"{base}-{seen[base]}")
            seen[base] = seen.get(base, 0) + 1
    return out


ALL_BLOCKS = [b for path in DOC_FILES for b in blocks(path)]
PYTHON = [b for b in ALL_BLOCKS if b.lang in ("python", "py")]
RUN_LOCAL = [b for b in PYTHON if b.marker is None]
RUN_TORCHRUN = [b for b in PYTHON if b.marker == "torchrun"]
JSON_BLOCKS = [b for b in ALL_BLOCKS if b.lang == "json"]


def _env() -> dict[str, str]:
    """This tree first on the path, so the snippets import the package they document."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _run(cmd: list[str], block: Block, cwd: Path) -> None:
    """Run ``cmd`` in ``cwd`` and fail with the block's name and the output tail on trouble."""
    try:
        done = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True,
                              timeout=SNIPPET_TIMEOUT, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"{block.name}: no exit within {SNIPPET_TIMEOUT} s\n{(err.stderr or '')[-3000:]}")
    if done.returncode != 0:
        pytest.fail(f"{block.name}: exit code {done.returncode}\n--- stdout\n{done.stdout[-3000:]}"
                    f"\n--- stderr\n{done.stderr[-5000:]}")


@pytest.mark.slow
@pytest.mark.parametrize("block", RUN_LOCAL, ids=lambda b: b.name)
def test_python_block_runs(block: Block, tmp_path: Path) -> None:
    script = tmp_path / "snippet.py"
    script.write_text(block.code, encoding="utf-8")
    _run([sys.executable, str(script)], block, tmp_path)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("block", RUN_TORCHRUN, ids=lambda b: b.name)
def test_torchrun_block_runs(block: Block, tmp_path: Path) -> None:
    script = tmp_path / "snippet.py"
    script.write_text(block.code, encoding="utf-8")
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
          block.argument, str(script)], block, tmp_path)


@pytest.mark.parametrize("block", PYTHON, ids=lambda b: b.name)
def test_python_block_is_well_formed(block: Block) -> None:
    """Every block compiles, runnable or not; markers carry a reason or a rank count."""
    compile(block.code, block.name, "exec")
    if block.marker == "not-run":
        assert block.argument, f"{block.name}: say why the block is not run"
    if block.marker == "torchrun":
        assert block.argument.isdigit() and int(block.argument) >= 1, f"{block.name}: torchrun: N"
        assert "destroy_process_group" in block.code, f"{block.name}: end with destroy_process_group()"


@pytest.mark.parametrize("block", JSON_BLOCKS, ids=lambda b: b.name)
def test_json_block_parses(block: Block) -> None:
    json.loads(block.code)


def test_the_docs_have_runnable_blocks() -> None:
    """The conventions are in use (a parsing slip would otherwise pass vacuously)."""
    assert any(b.path.name == "README.md" and b.path.parent == ROOT for b in RUN_LOCAL)
    assert RUN_TORCHRUN and JSON_BLOCKS
    # The README's first python block is the one users (and launch/package_check.sh) run.
    first = next(b for b in blocks(ROOT / "README.md") if b.lang == "python")
    assert first.marker is None and "param_groups(model" in first.code


def test_readme_is_short_and_names_the_test_command() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= README_MAX_LINES
    assert "bash launch/test.sh" in text and "bash launch/demo.sh" in text


def _links(path: Path) -> list[tuple[int, str]]:
    return [(n, m.group(1)) for n, line in prose(path) for m in LINK.finditer(line)]


@pytest.mark.parametrize("path", LINK_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path: Path) -> None:
    assert path.is_file(), f"{path.relative_to(ROOT)} is missing"
    broken = []
    for n, target in _links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:, ...
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        where = f"{path.relative_to(ROOT)}:{n}: {target}"
        if not dest.exists():
            broken.append(f"{where} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{where} (no heading with that anchor)")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_the_parsers_on_a_sample(tmp_path: Path) -> None:
    """The block, marker, link and anchor parsing itself, on a small file."""
    sample = tmp_path / "sample.md"
    sample.write_text(
        "# Title: one `two`\n\n<!-- torchrun: 2 -->\n```python\nprint(1)\n```\n\n"
        "<!-- not-run: needs GPUs -->\n\n```py\nx = 1\n```\n```json\n{}\n```\n"
        "See [a](b.md#c) and ![i](img.png \"t\") but not `[x](y)`.\n## Title: one `two`\n",
        encoding="utf-8")
    found = blocks(sample)
    assert [(b.lang, b.marker, b.argument) for b in found] == [
        ("python", "torchrun", "2"), ("py", "not-run", "needs GPUs"), ("json", None, "")]
    assert [t for _, t in _links(sample)] == ["b.md#c", "img.png"]
    assert anchors(sample) == {"title-one-two", "title-one-two-1"}
