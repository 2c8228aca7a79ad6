"""Reading what rvhub did not write itself: JSON bounded in size and depth before it is parsed, and text made
safe to show on a terminal.

Cards, index files, adapter configs and registry records come from folders and servers others can write to.
Python's ``json`` recurses once per nesting level (a card 200,000 levels deep raises RecursionError) and
builds every value it reads (a 30 MB string field costs hundreds of MB), so both are checked on the raw text
first. Torch-free: ``info`` and ``search`` import it.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .errors import CorruptFileError, RvhubError, VectorFormatError

MAX_CARD_BYTES = 16 << 20  # a card of a 20,000-tensor model is a few MB; the same cap on disk and from a server
# Records, indexes and configs are far smaller than a card.
MAX_JSON_BYTES = 16 << 20
MAX_DEPTH = 64  # the card schema nests 6 deep; a config's rope settings 3
MAX_STRING = 1 << 20  # in a card: the longest text it holds is a prompt template

_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")

ErrorFactory = Callable[[str], RvhubError]


def _default_error(where: str) -> ErrorFactory:
    return lambda reason: CorruptFileError(where, reason)


def check_json_text(
    text: str, where: str, *, max_bytes: int = MAX_JSON_BYTES, max_depth: int = MAX_DEPTH,
    max_string: int | None = None, error: ErrorFactory | None = None,
) -> None:
    """Refuse JSON text that is larger, deeper or (with ``max_string``) has a longer string than allowed,
    before it is parsed."""
    fail = error or _default_error(where)
    if len(text) > max_bytes:
        raise fail(f"{len(text):,} characters of JSON, more than the {max_bytes:,} allowed")
    if max_string is not None:
        longest = max(map(len, _STRING.findall(text)), default=2) - 2
        if longest > max_string:
            raise fail(f"a JSON string of {longest:,} characters, more than the {max_string:,} allowed")
    # the brackets outside strings; each pass removes the innermost pairs, so the depth is the number of
    # passes (all C loops: a 30 MB tokenizer.json takes well under a second)
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text))
    for _ in range(max_depth):
        if not brackets:
            return
        inner = brackets.replace("[]", "").replace("{}", "")
        if inner == brackets:
            raise fail("not valid JSON: its brackets do not pair up")
        brackets = inner
    if brackets:
        raise fail(f"JSON nested more than {max_depth} levels deep")


def parse_json(
    text: str | bytes, where: str, *, max_bytes: int = MAX_JSON_BYTES, max_depth: int = MAX_DEPTH,
    max_string: int | None = None, error: ErrorFactory | None = None, allow_nan: bool = False,
) -> Any:
    """``json.loads`` of untrusted text, bounded in size, depth and string length; NaN and Infinity refused
    unless ``allow_nan`` (Python's json writes them, and lm-eval results may hold them)."""
    fail = error or _default_error(where)
    if isinstance(text, bytes):
        if len(text) > max_bytes:
            raise fail(f"{len(text):,} bytes of JSON, more than the {max_bytes:,} allowed")
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise fail(f"not UTF-8 text: {e}") from e
    check_json_text(text, where, max_bytes=max_bytes, max_depth=max_depth, max_string=max_string, error=fail)
    try:
        return json.loads(text) if allow_nan else json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:
        raise fail(f"not valid JSON: {e}") from e


def read_json(
    path: Path, where: str | None = None, *, max_bytes: int = MAX_JSON_BYTES, max_depth: int = MAX_DEPTH,
    error: ErrorFactory | None = None, allow_nan: bool = False,
) -> Any:
    """A JSON file, read only up to ``max_bytes`` (+1 to tell it is over) and parsed by :func:`parse_json`."""
    label = where or str(path)
    fail = error or _default_error(label)
    try:
        with open(path, "rb") as fh:
            raw = fh.read(max_bytes + 1)
    except OSError as e:
        raise fail(f"cannot read {path.name}: {e.strerror or e}") from e
    return parse_json(raw, label, max_bytes=max_bytes, max_depth=max_depth, error=fail, allow_nan=allow_nan)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


@contextlib.contextmanager
def decoding(where: str, tensor: str) -> Iterator[None]:
    """Turn what torch or numpy raise while decoding a stored tensor (a mask of the wrong dtype or length, a
    fix-up index out of range) into a :class:`~rvhub.errors.VectorFormatError` naming the tensor. The
    files' hashes matched their card, so the card and the files disagree: one of them was made by hand."""
    try:
        yield
    except RvhubError:
        raise
    except (RuntimeError, ValueError, TypeError, IndexError, KeyError, OverflowError) as e:
        reason = (str(e).strip().splitlines() or [""])[0][:200]
        raise VectorFormatError(
            where,
            f"{tensor} cannot be decoded ({type(e).__name__}: {reason}); its stored tensors do not match the card",
        ) from e


# ---------------------------------------------------------------- terminal output

_ESCAPE = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)?|[@-Z\\-_])")


def printable(text: str) -> str:
    """``text`` without terminal escape sequences, and with every other control or format character (bidi
    overrides included) shown as ``?`` (other spaces as a space); newlines and tabs are kept. Card values
    reach the terminal through it, so a hostile card cannot move the cursor, retitle the window or hide a line."""
    if text.isprintable():
        return text
    text = _ESCAPE.sub("", text)
    return "".join(c if c in "\n\t" or c.isprintable() else " " if c.isspace() else "?" for c in text)
