"""What ``push`` publishes of a card: local folder paths cut to their last component.

A vector extracted from local folders records them as given (``/home/alice/projects/sft``), and so do a
combination's inputs and an evaluation's target. Published, such a path says who made the vector and where;
it helps nobody else find the model. So, unless ``--keep-local-paths``, the published ``rvhub.json`` (and the
README.md rendered from it) keeps only each path's last component; a local model keeps its content sha256,
which is what pins it. The vector folder itself is left as it is. ``rvhub.json`` and ``README.md`` are not in
the card's file manifest, so the published card is as valid as the original: pull verifies the same files.
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath, PureWindowsPath

from .card import HUB_ID_PATTERN, ModelRef, VectorCard

_REPO_AT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9_.\-]+@[A-Za-z0-9_.\-/]+")


def public_card(card: VectorCard) -> tuple[VectorCard, list[str]]:
    """``card`` with every local path cut to its last component, and the card fields that were cut."""
    changed: list[str] = []
    update: dict[str, object] = {}
    for field in ("source_from", "source_to"):
        ref = _ref(getattr(card, field))
        if ref is not getattr(card, field):
            update[field] = ref
            changed.append(field)
    p = card.provenance
    if p is not None:
        inputs = []
        for i, x in enumerate(p.inputs):
            new = x.model_copy(update={"ref": _name(x.ref), "source_from": _ref(x.source_from),
                                       "source_to": _ref(x.source_to)})
            if new != x:
                changed.append(f"provenance.inputs.{i}")
            inputs.append(new)
        update["provenance"] = p.model_copy(update={"inputs": inputs})
    benchmarks = []
    for i, d in enumerate(card.benchmarks):
        if _name(d.target) != d.target:
            changed.append(f"benchmarks.{i}.target")
            d = d.model_copy(update={"target": _name(d.target)})
        benchmarks.append(d)
    update["benchmarks"] = benchmarks
    if not changed:
        return card, []
    # read back as pull will read it: model_copy alone checks nothing
    return VectorCard.from_json(card.model_copy(update=update).to_json(), "the published card"), changed


def is_local_path(text: str) -> bool:
    """Whether a card's model or vector reference is a local path rather than a Hub id (``org/name``) or a
    registry reference (``org/name@rev``): absolute, home- or dot-relative, with a backslash, or deeper than
    one ``/``."""
    if _REPO_AT.fullmatch(text) or re.fullmatch(HUB_ID_PATTERN, text):
        return False
    return text.startswith(("/", "~", ".")) or "\\" in text or text.count("/") >= 1 or bool(
        PureWindowsPath(text).drive)


def _name(text: str) -> str:
    return _last(text) if is_local_path(text) else text


def _ref(ref: ModelRef) -> ModelRef:
    if ref.kind != "local" or _last(ref.id) == ref.id:
        return ref
    return ref.model_copy(update={"id": _last(ref.id)})


def _last(path: str) -> str:
    last = PureWindowsPath(path).name if "\\" in path else PurePosixPath(path).name
    return last if last not in ("", ".", "..") else "local-folder"
