"""The Hub card (README.md) of a vector folder, rendered from its :class:`~rvhub.card.VectorCard`.

YAML metadata through ``huggingface_hub.ModelCardData`` and the body through ``ModelCard.from_template``
with the template ``cards/vector-card.md``. Pure: no network call (``ModelCard.validate`` and
``push_to_hub`` are the card functions that talk to the Hub, and they are not used here).

The card's JSON is embedded at the end in an HTML comment (``<!-- rvhub-card … -->``, with ``<``, ``>``
and ``&`` escaped as JSON ``\\u`` sequences so nothing in it can close the comment): the README alone gives
the card back, and ``VectorCard.from_readme(render_readme(card)) == card``. Only that last block is read: a
block planted earlier in the text (by a card value, or by a hand edit) is never taken for the card.

Every card value the body shows is escaped (:func:`_text` for prose and table cells, :func:`_code` for code
spans): a hostile id, model_type or tensor name cannot add Markdown, HTML, links or table columns.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .card import HUB_ID_PATTERN
from .errors import VectorFormatError

if TYPE_CHECKING:
    from .card import BenchmarkDelta, ModelRef, VectorCard


def _template_path() -> Path:
    """``cards/vector-card.md``: inside the package when installed from a wheel, beside it in a clone."""
    here = Path(__file__).resolve().parent
    inside = here / "cards" / "vector-card.md"
    return inside if inside.is_file() else here.parent / "cards" / "vector-card.md"


TEMPLATE = _template_path()
_EMBED_START = "<!-- rvhub-card\n"
_EMBED_END = "\n-->"
_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>|~!#&])")
TAGS = ["reasoning-vector", "task-vector", "rvhub"]
# plain tags (the Hub derives colon tags such as base_model:… itself) that say what a vector fits, so that a
# Hub listing filtered by them finds the vectors a target can take (rvhub search --base)
SHAPE_TAG_PREFIX = "rvhub-shape-"
ARCH_TAG_PREFIX = "rvhub-arch-"
_ARCH_TAG = re.compile(r"[a-z0-9][a-z0-9_\-.]{0,63}")


def shape_tag(shape_hash: str) -> str:
    return SHAPE_TAG_PREFIX + shape_hash


def hub_tags(card: VectorCard) -> list[str]:
    """The tags of the card's README.md YAML (on the Hub, the repo's tags)."""
    return TAGS + (["lora"] if card.format == "lora" else []) + fit_tags(card)


def fit_tags(card: VectorCard) -> list[str]:
    """``rvhub-shape-<16 hex>`` (the `from` model's :func:`rvhub.compat.shape_hash`, when the card records one)
    and ``rvhub-arch-<model_type>`` (when the model_type makes a plain tag)."""
    fp = card.fingerprints
    tags = [shape_tag(fp.architecture.shape_hash)] if fp is not None and fp.architecture.shape_hash else []
    model_type = fp.architecture.model_type if fp is not None else card.model_type
    if model_type and _ARCH_TAG.fullmatch(model_type):
        tags.append(ARCH_TAG_PREFIX + model_type)
    return tags


def preload() -> None:
    """Import what :func:`render_readme` uses (huggingface_hub's card module and jinja2, ~0.3 s), so that a
    caller can have it done while other work (hashing) runs on another core."""
    import huggingface_hub.repocard  # noqa: F401
    import jinja2  # noqa: F401


def render_readme(card: VectorCard, repo_id: str | None = None) -> str:
    """README.md for ``card``: Hub YAML metadata, a readable body, and the card's JSON."""
    from huggingface_hub import ModelCard, ModelCardData

    lora = card.format == "lora"
    data = ModelCardData(
        base_model=_base_models(card) or None,
        base_model_relation="adapter" if _base_models(card) else None,
        library_name="peft" if lora else None,
        license=card.license,
        tags=hub_tags(card),
        model_name=_title(card),
        eval_results=_eval_results(card) or None,
    )
    text = ModelCard.from_template(data, template_str=TEMPLATE.read_text(encoding="utf-8"), **_context(card, repo_id))
    return str(text).rstrip("\n") + "\n"


def describe(card: VectorCard, name: str) -> str:
    """A few lines for the terminal (``rvhub card VEC``)."""
    lines = [
        f"{name}: {card.format} vector{' (exact)' if card.exact else ''}, {len(card.tensors)} tensors, "
        f"{sum(f.size for f in card.files):,} bytes in {len(card.files)} file(s)",
        f"  from {card.source_from}",
        f"  to   {card.source_to}",
        f"  recommended α {card.recommended_scale:g}; bases: {', '.join(card.recommended_bases) or 'none'}; "
        f"license: {card.license or 'not stated'}",
        f"  fingerprints: {'recorded' if card.fingerprints else 'none'}",
    ]
    for d in card.benchmarks:
        s = d.scores
        others = (("−αv", s.minus), ("control", s.control))
        extra = "".join(f", {k} {v:.4g} ({v - s.target:+.4g})" for k, v in others if v is not None)
        lines.append(f"  {d.benchmark} {d.metric} on {d.target}: {s.target:.4g} → +αv {s.plus:.4g} "
                     f"({s.plus - s.target:+.4g}){extra}; α={d.scale:g}, n={d.n}, {_setup(d)}")
    return "\n".join(lines)


def embedded_json(text: str, where: str) -> str:
    """The card JSON embedded in a rendered README: the one block rvhub writes, which ends the text."""
    body = text.rstrip()
    start = body.rfind(_EMBED_START)
    if start < 0 or not body.endswith(_EMBED_END):
        raise VectorFormatError(where, "expected an embedded rvhub card (<!-- rvhub-card … -->) at the end, found none")
    found = body[start + len(_EMBED_START) : len(body) - len(_EMBED_END)]
    if "-->" in found:  # rendered JSON escapes '>' (see _escape_json): this is not a block rvhub wrote
        raise VectorFormatError(where, "the embedded rvhub card at the end is not one rvhub wrote")
    return found


def _escape_json(text: str) -> str:
    # '<', '>' and '&' only occur inside JSON strings, where \u escapes mean the same characters
    return text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


def _base_models(card: VectorCard) -> list[str]:
    if card.recommended_bases:
        return list(card.recommended_bases)
    ref = card.source_from
    return [ref.id] if ref.kind == "hub" and re.fullmatch(HUB_ID_PATTERN, ref.id) and len(ref.id) <= 200 else []


def _text(value: object) -> str:
    """A card value as Markdown text (prose or a table cell): one line, control characters shown as '?',
    every character Markdown or HTML could act on backslash-escaped."""
    from ._untrusted import printable

    return _MD_SPECIAL.sub(r"\\\1", " ".join(printable(str(value)).split()))


def _code(value: object, cell: bool = True) -> str:
    """A card value as an inline code span: one line, no backtick (it would end the span), and in a table
    cell no bare '|' (GFM splits cells before it reads code spans)."""
    from ._untrusted import printable

    text = " ".join(printable(str(value)).split()).replace("`", "'")
    if cell:
        text = text.replace("|", "\\|")
    return f"`{text}`" if text.strip() else "` `"


def _short(ref: ModelRef) -> str:
    return ref.id if ref.kind == "hub" else Path(ref.id).name or ref.id


def _title(card: VectorCard) -> str:
    if card.provenance is not None:
        return f"Combined reasoning vector: {card.provenance.expression}"
    return f"Reasoning vector: {_short(card.source_to)} − {_short(card.source_from)}"


def _provenance(card: VectorCard) -> dict[str, Any] | None:
    """The combine provenance as template rows (None for an extracted vector)."""
    p = card.provenance
    if p is None:
        return None
    params = [f"method `{p.method}`"] + ([f"density {p.density:g}"] if p.density is not None else []) + (
        [f"seed {p.seed}"] if p.seed is not None else []) + [f"α {p.scale:g}"] + [
        f"α {e.alpha:g} for tensors matching `{_cell(e.pattern)}`" for e in p.scale_patterns] + (
        ["combined with --force despite differing `from` fingerprints"] if p.forced else [])
    inputs = [{"i": i + 1, "weight": f"{x.weight:g}", "ref": _cell(x.ref), "card": x.card_sha256[:16],
               "from": _cell(str(x.source_from)), "to": _cell(str(x.source_to))} for i, x in enumerate(p.inputs)]
    return {"expression": _cell(p.expression), "params": ", ".join(params), "inputs": inputs}


def _ref_text(ref: ModelRef) -> str:
    if ref.kind == "hub":
        pin = _code(ref.commit or ref.revision or "main")
        if re.fullmatch(HUB_ID_PATTERN, ref.id) and len(ref.id) <= 200:  # only a real Hub id becomes a link
            return f"[`{ref.id}`](https://huggingface.co/{ref.id}) at {pin}"
        return f"{_code(ref.id)} at {pin}"
    return f"local folder {_code(ref.id)} (content sha256 {_code(str(ref.content_sha256)[:16] + '…')})"


def _eval_results(card: VectorCard) -> list[Any]:
    from huggingface_hub import EvalResult

    return [
        EvalResult(
            task_type="text-generation",
            dataset_type=d.benchmark,
            dataset_name=d.benchmark,
            metric_type=d.metric,
            metric_value=d.scores.plus,
            metric_name=f"{d.metric} of {d.target} + {d.scale:g}·v",
            metric_config=d.harness.filter,
            dataset_args={"num_fewshot": d.harness.num_fewshot} if d.harness.num_fewshot is not None else None,
        )
        for d in card.benchmarks
    ]


_cell = _text


def _num(x: float) -> str:
    return f"{x:.4g}"


def _with_diff(x: float | None, base: float, err: float | None) -> str:
    if x is None:
        return "–"
    pm = f" ± {_num(err)}" if err is not None else ""
    return f"{_num(x)}{pm} ({x - base:+.4g})"


def _setup(d: BenchmarkDelta, markdown: bool = False) -> str:
    """How a delta was measured, in a few words (escaped for Markdown when ``markdown``)."""
    h = d.harness
    text = _text if markdown else str
    parts = [text(h.name + (f" {h.version[:12]}" if h.version else ""))]
    if h.num_fewshot is not None:
        parts.append(f"{h.num_fewshot}-shot")
    if h.chat_template is not None:
        parts.append("chat template" if h.chat_template else "no chat template")
    if h.fewshot_as_multiturn:
        parts.append("few-shot as multi-turn")
    if h.filter:
        parts.append(f"filter {text(h.filter)}")
    if h.system_instruction:
        parts.append("system prompt")
    if h.prompt:
        parts.append(f"prompt {_code(h.prompt[:60]) if markdown else repr(h.prompt[:60])}")
    return ", ".join(parts)


def _delta_row(d: BenchmarkDelta) -> dict[str, str]:
    s, e = d.scores, d.stderr
    return {
        "benchmark": _cell(d.benchmark),
        "metric": _cell(d.metric + ("" if d.higher_is_better else " (lower is better)")),
        "target": _cell(d.target),
        "n": str(d.n) if d.n is not None else "–",
        "setup": _setup(d, markdown=True),
        "score_target": _num(s.target) + (f" ± {_num(e.target)}" if e else ""),
        "plus": _with_diff(s.plus, s.target, e.plus if e else None).replace("(", f"(α={d.scale:g}: ", 1),
        "minus": _with_diff(s.minus, s.target, e.minus if e else None),
        "control": _with_diff(s.control, s.target, e.control if e else None),
    }


def _test_rows(card: VectorCard) -> list[dict[str, str]]:
    return [
        {"benchmark": _cell(d.benchmark), "metric": _cell(d.metric), "against": t.against,
         "diff": f"{t.diff:+.4g}", "method": t.method + (f" ({t.plus_only}/{t.other_only} discordant)"
                                                        if t.plus_only is not None else ""),
         "p": f"{t.p_value:.3g}", "verdict": "yes" if t.distinguishable else "no"}
        for d in card.benchmarks for t in d.tests
    ]


def _sweep_text(d: BenchmarkDelta) -> str:
    points = ", ".join(f"α={p.scale:g}: {_num(p.score)}" for p in d.sweep)
    best = f", best α = {d.best_scale:g}" if d.best_scale is not None else ""
    return _cell(f"{d.benchmark} {d.metric}: {points}{best}")


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def _context(card: VectorCard, repo_id: str | None) -> dict[str, Any]:
    from .card import CARD_FILE

    bases = card.recommended_bases
    fp = card.fingerprints
    ctx: dict[str, Any] = {
        "card": card,
        "title": _cell(_title(card)),
        "from_ref": _ref_text(card.source_from),
        "to_ref": _ref_text(card.source_to),
        "form_text": {
            "sparse": "sparse, exact (bitmask of changed elements + their deltas)",
            "dense": f"dense, {card.values_dtype} deltas",
            "lora": "PEFT LoRA adapter + residual file for what LoRA cannot carry",
        }[card.format] + (
            "" if not card.exact else "; every element is exactly the float32 result of the formula below"
            if card.provenance else "; applied to `from` it reproduces `to` exactly"),
        "prov": _provenance(card),
        "scale": f"{card.recommended_scale:g}",
        "bases": ", ".join(f"[`{b}`](https://huggingface.co/{b})" for b in bases) or "none given",
        "model_type": _code(card.model_type) if card.model_type else "unknown model_type",
        "n_tensors": len(card.tensors),
        "license": card.license or "not stated (check the source models' licenses)",
        "lora": card.format == "lora",
        "repo": repo_id or "REPO_ID",
        "vector_ref": repo_id or "./VECTOR_FOLDER",
        "base_example": bases[0] if bases else "TARGET_MODEL",
        "deltas": [_delta_row(d) for d in card.benchmarks],
        "any_stderr": any(d.stderr for d in card.benchmarks),
        "all_control": all(d.scores.control is not None for d in card.benchmarks),
        "any_control": any(d.scores.control is not None for d in card.benchmarks),
        "tests": _test_rows(card),
        "sweeps": [_sweep_text(d) for d in card.benchmarks if d.sweep],
        "plot": next((f.path for f in card.files if f.path == "eval.png"), None),
        "comp": card.compression,
        "fp": fp,
        "card_json": _escape_json(card.model_dump_json()),
        "card_file": CARD_FILE,
        "rvhub_version": _text(card.rvhub_version),
        "arch_model_type": _code(fp.architecture.model_type, False) if fp else "",
        "file_rows": [(_code(f.path), f.size, f.sha256) for f in card.files],
    }
    comp = card.compression
    if comp is not None:
        ranks = sorted({m.rank for m in comp.modules})
        ctx.update(
            n_modules=len(comp.modules),
            ranks=(f"{ranks[0]}–{ranks[-1]}" if len(ranks) > 1 else str(ranks[0])) if ranks else "none",
            adapter_share=_pct(comp.adapter_energy),
            residual_share=_pct(comp.residual_energy),
            dropped_share=_pct(comp.dropped_energy),
            rel_error=f"{comp.rel_error:.4g}",
            adapter_mb=_mb(comp.adapter_bytes),
            residual_mb=_mb(comp.residual_bytes),
            vector_mb=_mb(comp.vector_bytes),
            residual_text=_cell(", ".join(comp.residual[:6]) + (" …" if len(comp.residual) > 6 else "")) or "nothing",
        )
    if fp is not None:
        values = fp.config.values
        shown = [f"{_code(k, False)} = {_code(json.dumps(v), False)}" for k, v in sorted(values.items())]
        ctx["config_text"] = ", ".join(shown) or "no fields"
        tok = fp.tokenizer
        ctx["tokenizer_text"] = (
            f"{tok.vocab_size} vocabulary entries (sha256 `{tok.vocab_sha256[:16]}`), "
            f"{len(tok.added_tokens)} added tokens, from {tok.source}"
            if tok else "none recorded (the `from` model had no tokenizer files)"
        )
        n_values = sum(length for t in fp.lineage.tensors for _, length in t.spans)
        ctx["lineage_text"] = (
            f"{n_values} weights sampled (seed {fp.lineage.seed}) from "
            + ", ".join(_code(t.name, False) for t in fp.lineage.tensors)
            + "; a target must correlate with them to count as a sibling"
        )
    return ctx
