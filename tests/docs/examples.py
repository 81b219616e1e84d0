"""Find the shell and Python examples in the README and the docs, with the output each shows.

A fenced `bash` or `python` block is an example. The line above it may mark it:
`<!-- not run: REASON -->` (the tests skip it, and the reader learns why),
`<!-- run: export -->` (it runs without a server), or `<!-- run: server ARGS -->` (it runs
against a server of its own started with `VAR=value ... hiera-serve ARGS`, as the page's
previous block shows). An unmarked example runs against `make run`'s server. Every example
runs in a temporary folder standing for /tmp/. A `text` or `json` block that follows an
example with only blank lines between is the output the example must print.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE_LANGUAGES = {"bash", "sh", "shell", "python"}
OUTPUT_LANGUAGES = {"text", "json", ""}
MARK = re.compile(
    r"^<!-- (not run: (?P<reason>.*\S)|run: (?P<fixture>export|server)(?P<args>( \S+)*)) -->$"
)
FENCE = re.compile(r"^```(?P<lang>[\w-]*)\s*$")


@dataclass(frozen=True)
class Example:
    path: Path
    line: int  # 1-based line of the opening fence
    language: str
    code: str
    mark: str | None  # the marker line above, verbatim
    expected: str | None  # the output block that follows, if any

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    @property
    def not_run_reason(self) -> str | None:
        match = MARK.match(self.mark or "")
        return match.group("reason") if match else None

    @property
    def fixture(self) -> str:
        """`server` (the default), `export` (no server), or `skip`."""
        match = MARK.match(self.mark or "")
        if match is None:
            return "server"
        return "skip" if match.group("reason") else str(match.group("fixture"))

    @property
    def server_args(self) -> tuple[str, ...]:
        """The environment assignments and flags of the example's own server, if it has one."""
        match = MARK.match(self.mark or "")
        return tuple((match.group("args") or "").split()) if match else ()


def documents() -> list[Path]:
    """The README and every page of the site."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


@dataclass(frozen=True)
class _Block:
    start: int  # index of the opening fence line
    end: int  # index of the closing fence line
    language: str
    code: str


def _blocks(lines: list[str]) -> list[_Block]:
    blocks, index = [], 0
    while index < len(lines):
        match = FENCE.match(lines[index])
        if match is None:
            index += 1
            continue
        end = next(
            (j for j in range(index + 1, len(lines)) if lines[j].strip() == "```"), len(lines)
        )
        code = "\n".join(lines[index + 1 : end]) + "\n"
        blocks.append(_Block(index, end, match.group("lang"), code))
        index = end + 1
    return blocks


def examples(path: Path) -> list[Example]:
    """Every example of one Markdown file, in order."""
    lines = path.read_text().splitlines()
    blocks = _blocks(lines)
    found = []
    for position, block in enumerate(blocks):
        if block.language not in EXAMPLE_LANGUAGES:
            continue
        above = next((lines[i] for i in range(block.start - 1, -1, -1) if lines[i].strip()), "")
        mark = above.strip() if above.strip().startswith("<!--") else None
        expected = None
        if position + 1 < len(blocks):
            following = blocks[position + 1]
            gap = lines[block.end + 1 : following.start]
            if following.language in OUTPUT_LANGUAGES and not any(line.strip() for line in gap):
                expected = following.code
        found.append(Example(path, block.start + 1, block.language, block.code, mark, expected))
    return found


def matches(expected: str, actual: str) -> bool:
    """Whether `actual` is what `expected` shows: whitespace ignored, `...` stands for anything."""
    squeeze = re.compile(r"\s+")
    pattern = ".*?".join(re.escape(part) for part in squeeze.sub("", expected).split("..."))
    return re.fullmatch(pattern, squeeze.sub("", actual), re.DOTALL) is not None
