"""Every ```python block of README.md runs as written (in a fresh temporary working directory).

A block preceded by the line `<!-- no-test -->` is skipped (say, one that needs a long training run).
"""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SKIP_MARK = "<!-- no-test -->"


def python_blocks(text: str) -> list[tuple[int, str, bool]]:
    """(line number, code, skipped) of each ```python block, in order."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        if re.fullmatch(r"\s*```python\s*", lines[i]):
            start, body = i + 1, []
            i += 1
            while i < len(lines) and not re.fullmatch(r"\s*```\s*", lines[i]):
                body.append(lines[i])
                i += 1
            # The mark counts on the closest non-blank line above the fence.
            above = next((ln.strip() for ln in reversed(lines[: start - 1]) if ln.strip()), "")
            blocks.append((start, "\n".join(body) + "\n", above == SKIP_MARK))
        i += 1
    return blocks


BLOCKS = python_blocks(README.read_text())


def test_block_extraction():
    text = "a\n```python\nx = 1\n```\n<!-- no-test -->\n\n```python\nraise SystemExit\n```\n"
    assert python_blocks(text) == [(2, "x = 1\n", False), (7, "raise SystemExit\n", True)]


@pytest.mark.parametrize("line,code,skipped", BLOCKS or [pytest.param(0, "", True, id="none")],
                         ids=[f"README.md:{b[0]}" for b in BLOCKS] or None)
def test_readme_python_block(line, code, skipped, tmp_path, monkeypatch):
    if skipped:
        pytest.skip(f"README.md:{line} is marked {SKIP_MARK}")
    monkeypatch.chdir(tmp_path)
    # Offline: a block that reaches for the network fails here rather than passing on a connected machine.
    def no_network(*args, **kwargs):
        raise OSError(f"README.md:{line} tried to use the network")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    exec(compile(code, f"README.md:{line}", "exec"), {"__name__": "__readme__"})
