"""Keeping credentials out of what rvhub prints: error lines, warnings and tracebacks (``--debug``).

A server may echo the Authorization header back in an error body, and that text ends up in exception
messages; so everything the CLI writes to stderr passes through :func:`scrub` first.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import traceback

_BEARER = re.compile(r"(?i)(bearer\s+)[^\s'\",;]+")
_HF_TOKEN = re.compile(r"hf_[A-Za-z0-9]{16,}")
_TOKEN_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")


def _tokens() -> list[str]:
    found = [os.environ.get(v, "") for v in _TOKEN_VARS]
    if "huggingface_hub" in sys.modules:  # the stored token (`hf auth login`), if the library ever read it
        try:
            from huggingface_hub import get_token

            found.append(get_token() or "")
        except Exception:  # reading the token store must never turn an error message into a crash
            pass
    return sorted({t.strip() for t in found if len(t.strip()) >= 8}, key=len, reverse=True)


def scrub(text: str) -> str:
    """``text`` with every known token, ``Bearer …`` credential and ``hf_…`` token replaced by ``***``."""
    for token in _tokens():
        text = text.replace(token, "***")
    text = _BEARER.sub(r"\1***", text)
    return _HF_TOKEN.sub("hf_***", text)


def format_exception(e: BaseException) -> str:
    """The full traceback of ``e`` (with its causes), scrubbed."""
    return scrub("".join(traceback.format_exception(type(e), e, e.__traceback__)))


class ScrubFilter(logging.Filter):
    """A handler filter that scrubs each record's message and traceback before it is formatted."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = scrub(record.getMessage())
        record.args = ()
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = format_exception(record.exc_info[1]).rstrip("\n")
            record.exc_info = None
        elif record.exc_text:
            record.exc_text = scrub(record.exc_text)
        return True


def scrub_logging() -> None:
    """Put :class:`ScrubFilter` on the root logger's handlers and huggingface_hub's own (once each)."""
    for name in ("", "huggingface_hub"):
        for handler in logging.getLogger(name).handlers:
            if not any(isinstance(f, ScrubFilter) for f in handler.filters):
                handler.addFilter(ScrubFilter())
