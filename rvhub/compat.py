"""Compatibility: fingerprints of the ``from`` model (stored in the card at extract) and the checks a target
model must pass before a vector is applied to it (``rvhub check``, and ``rvhub apply`` before any output).

Four checks, each pass / warn / fail with the numbers behind it:

- architecture: model_type, and every tensor the vector touches present in the target with its shape;
- config: the config.json fields that change what equal-shaped weights mean (rope, activation, norm eps,
  head layout …); see :data:`FAIL_FIELDS` and :data:`WARN_FIELDS`;
- tokenizer: the model vocabulary and merges (a difference fails: token ids mean other things) and the
  added/special tokens (a difference warns: instruct models add chat tokens to an unchanged vocabulary);
- lineage: the Pearson correlation between a seeded sample of the ``from`` model's weights and the target's
  weights at the same positions. Fine-tunes of one pretrained model stay strongly correlated (a noisy
  sibling: r ≈ 0.99); a model of the same shape initialised or pretrained independently gives r ≈ 0.
  The thresholds (:data:`LINEAGE_PASS`, :data:`LINEAGE_FAIL`) are heuristics, not measured on real families.
"""

from __future__ import annotations

import base64
import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ._npdtype import narrow, to_work
from .card import (
    ArchitectureFingerprint,
    ConfigFingerprint,
    Fingerprints,
    LineageSketch,
    SketchTensor,
    TensorShape,
    TokenizerFingerprint,
    VectorCard,
    architecture_sha256,
    canonical_sha256,
)
from .errors import IncompatibleError, RvhubError
from .sources import ModelSource, open_model, open_remote

logger = logging.getLogger(__name__)

Status = Literal["pass", "warn", "fail"]
_RANK = {"pass": 0, "warn": 1, "fail": 2}

# config fields that change what the weights mean at equal shapes: a difference fails
FAIL_FIELDS = (
    "hidden_act",
    "norm_eps",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "partial_rotary_factor",
)  # and every rope.* key
# fields that matter but that apply handles or that only limit use: a difference warns
WARN_FIELDS = (
    "vocab_size",
    "tie_word_embeddings",
    "max_position_embeddings",
    "sliding_window",
    "use_sliding_window",
)
_NORM_EPS = ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", "norm_epsilon", "norm_eps")

SKETCH_SEED = 0
_MAX_TOKENIZER_JSON = 256 << 20
SKETCH_TENSORS = 4
SKETCH_SPANS = 4
SKETCH_SPAN = 128  # contiguous elements per span: a Hub target costs one Range request per span
LINEAGE_PASS = 0.5
LINEAGE_FAIL = 0.2

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
    "tokenizer.model", "added_tokens.json",
)


# ---------------------------------------------------------------- fingerprints (at extract)


def fingerprints(src: ModelSource, touched: list[tuple[str, tuple[int, ...]]], seed: int = SKETCH_SEED) -> Fingerprints:
    """The fingerprints of ``src`` (the ``from`` model) for a vector that touches ``touched`` (name, shape)."""
    shapes = sorted((TensorShape(name=n, shape=s) for n, s in touched), key=lambda t: t.name)
    values = config_values(src.config)
    return Fingerprints(
        architecture=ArchitectureFingerprint(
            model_type=src.model_type, tensors=shapes, sha256=architecture_sha256(src.model_type, shapes),
            shape_hash=shape_hash(src),
        ),
        config=ConfigFingerprint(values=values, sha256=canonical_sha256(values)),
        tokenizer=tokenizer_fingerprint(src.root),
        lineage=lineage_sketch(src, seed),
    )


def shape_hash(src: ModelSource) -> str:
    """16 hex digits of the sha256 over every tensor name and shape of ``src`` as its checkpoint stores them
    (a tied model has no lm_head; dtypes do not count). Equal for two models exactly when they hold the same
    tensors with the same shapes: the vector's tag ``rvhub-shape-<hash>`` (of its `from` model) and a target's
    own hash meet in one Hub listing (``rvhub search --base``). A model read by headers (a Hub id) gives the
    same hash as its folder."""
    return canonical_sha256(sorted([name, list(t.shape)] for name, t in src.tensors.items()))[:16]


def config_values(config: dict[str, Any]) -> dict[str, Any]:
    """The meaning-bearing fields of a config.json, normalised across transformers versions.

    A multimodal config's ``text_config`` fields count as the model's own. Rope settings from the old
    top-level ``rope_theta``, ``rope_scaling`` (``type`` read as ``rope_type``) and transformers 5's
    ``rope_parameters`` become ``rope.<key>``; a missing rope_type means ``default``.
    """
    text = config.get("text_config")
    cfg = {**config, **text} if isinstance(text, dict) else dict(config)
    out: dict[str, Any] = {}
    for key in FAIL_FIELDS + WARN_FIELDS:
        if key in cfg and key != "norm_eps" and cfg[key] is not None:
            out[key] = cfg[key]
    for key in _NORM_EPS:
        if cfg.get(key) is not None:
            out["norm_eps"] = cfg[key]
            break
    rope: dict[str, Any] = {}
    if cfg.get("rope_theta") is not None:
        rope["rope_theta"] = cfg["rope_theta"]
    for part in ("rope_scaling", "rope_parameters"):
        if isinstance(cfg.get(part), dict):
            for k, v in cfg[part].items():
                rope["rope_type" if k == "type" else k] = v
    if rope:
        rope.setdefault("rope_type", "default")
    out.update({f"rope.{k}": v for k, v in rope.items() if v is not None})
    for k, v in list(out.items()):  # 10000 and 10000.0 mean the same; JSON keeps the difference
        if isinstance(v, int) and not isinstance(v, bool) and k.startswith("rope.") and k != "rope.rope_type":
            out[k] = float(v)
    plain: dict[str, Any] = json.loads(json.dumps(out, allow_nan=False))  # plain JSON values
    return plain


def tokenizer_fingerprint(root: Path) -> TokenizerFingerprint | None:
    """Hash what token ids mean, from the files of ``root``; None when it has none. Never runs remote code."""
    config = _json(root / "tokenizer_config.json") or {}
    special = _special_tokens(config, _json(root / "special_tokens_map.json") or {})
    added: dict[int, tuple[str, bool]] = {}
    for key, tok in (config.get("added_tokens_decoder") or {}).items():
        if isinstance(tok, dict) and str(key).isdigit():
            added[int(key)] = (str(tok.get("content")), bool(tok.get("special")))
    tok_json = _json(root / "tokenizer.json")
    vocab: list[tuple[str, int]]
    merges: list[str] = []
    if tok_json is not None:
        source = "tokenizer.json"
        for tok in tok_json.get("added_tokens") or []:
            added[int(tok["id"])] = (str(tok["content"]), bool(tok.get("special")))
        model = tok_json.get("model") or {}
        raw_vocab = model.get("vocab") or {}
        if isinstance(raw_vocab, dict):
            vocab = [(str(k), int(v)) for k, v in raw_vocab.items()]
        else:  # Unigram: a list of [piece, score]
            vocab = [(str(p[0]), i) for i, p in enumerate(raw_vocab)]
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    elif (root / "vocab.json").is_file():
        source = "vocab.json+merges.txt"
        vocab = [(str(k), int(v)) for k, v in (_json(root / "vocab.json") or {}).items()]
        if (root / "merges.txt").is_file():
            lines = (root / "merges.txt").read_text(encoding="utf-8").splitlines()
            merges = [m for m in lines if m and not m.startswith("#version")]
    elif (root / "tokenizer.model").is_file():
        source = "tokenizer.model"  # sentencepiece: the file's bytes stand for vocabulary and merges
        vocab = [(base64.b64encode((root / "tokenizer.model").read_bytes()).decode(), 0)]
    else:
        return None
    added_contents = {c for c, _ in added.values()}
    model_vocab = sorted((i, t) for t, i in vocab if t not in added_contents)
    added_list = [(i, c, s) for i, (c, s) in sorted(added.items())]
    return TokenizerFingerprint(
        source=source,  # type: ignore[arg-type]
        vocab_size=len(model_vocab) if source != "tokenizer.model" else 0,
        vocab_sha256=canonical_sha256([model_vocab, merges]),
        added_tokens=[c for _, c, _ in added_list],
        special_tokens=special,
        added_sha256=canonical_sha256([added_list, special]),
    )


def _special_tokens(*configs: dict[str, Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    for cfg in configs:
        for role in ("bos_token", "eos_token", "unk_token", "pad_token"):
            value = cfg.get(role)
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str) and role not in out:
                out[role] = value
    return out


def _json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    from ._untrusted import read_json

    try:  # a tokenizer.json can hold tens of MB (Gemma's: 33 MB)
        data = read_json(path, max_bytes=_MAX_TOKENIZER_JSON, allow_nan=True)
    except RvhubError as e:
        logger.warning("%s is not usable JSON (%s); left out of the tokenizer fingerprint", path, e)
        return None
    return data if isinstance(data, dict) else None


def lineage_sketch(src: ModelSource, seed: int = SKETCH_SEED) -> LineageSketch:
    """Sample a few spans of a few tensors of ``src`` at seeded positions.

    Tensors: evenly spread over the sorted 2-D weights that are not embeddings (a target may have another
    vocabulary size); spans of :data:`SKETCH_SPAN` contiguous elements, so a Hub target needs few reads.
    """
    floats = {n: t for n, t in src.tensors.items() if t.is_float and t.numel > 0}
    vocab = src.vocab_tensors
    names = sorted(n for n, t in floats.items() if len(t.shape) == 2 and n not in vocab)
    names = names or sorted(n for n in floats if n not in vocab) or sorted(floats)
    if len(names) > SKETCH_TENSORS:
        step = (len(names) - 1) / (SKETCH_TENSORS - 1)
        names = [names[round(i * step)] for i in range(SKETCH_TENSORS)]
    rng = np.random.default_rng(seed)
    tensors = []
    for name in names:
        info = floats[name]
        length = min(SKETCH_SPAN, info.numel)
        starts = sorted({int(s) for s in rng.integers(0, info.numel - length + 1, size=SKETCH_SPANS)})
        spans: list[tuple[int, int]] = []
        for s in starts:  # merge overlapping spans: each element once
            if spans and s < spans[-1][0] + spans[-1][1]:
                a, n = spans[-1]
                spans[-1] = (a, s + length - a)
            else:
                spans.append((s, length))
        values = np.concatenate([narrow(to_work(src.read_span_np(name, a, n), info.dtype), "F32") for a, n in spans])
        tensors.append(SketchTensor(
            name=name, shape=info.shape, spans=spans,
            values=base64.b64encode(values.astype("<f4").tobytes()).decode(),
        ))
    return LineageSketch(seed=seed, tensors=tensors)


def sketch_values(t: SketchTensor) -> np.ndarray:
    return np.frombuffer(base64.b64decode(t.values), dtype="<f4").astype(np.float64)


# ---------------------------------------------------------------- checks


@dataclass(frozen=True)
class Check:
    """One compatibility check: its verdict, one line saying why, and the numbers behind it."""

    name: str
    status: Status
    summary: str
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CompatReport:
    """Every check of one vector against one target. ``ok`` when none fails."""

    vector: str
    target: str
    checks: list[Check]

    @property
    def ok(self) -> bool:
        return all(c.status != "fail" for c in self.checks)

    @property
    def status(self) -> Status:
        return max((c.status for c in self.checks), key=_RANK.__getitem__, default="pass")

    def failures(self) -> list[Check]:
        return [c for c in self.checks if c.status == "fail"]

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "status": self.status, **asdict(self)}


def check(vector: str | Path, base: str, *, allow_vocab_mismatch: bool = False) -> CompatReport:
    """Check whether the model ``base`` (a folder or a Hub id) can take the vector in folder ``vector``.

    A Hub target is read without downloading its weights: its safetensors headers, config and tokenizer
    files, and the few byte ranges the lineage sketch needs.
    """
    card = VectorCard.read(Path(vector))
    target = open_target(base)
    return check_model(card, target, str(vector), allow_vocab_mismatch=allow_vocab_mismatch)


def open_target(base: str) -> ModelSource:
    """A local folder as it is; a Hub id by headers and byte ranges (:func:`rvhub.sources.open_remote`)."""
    if Path(base).expanduser().exists():
        return open_model(base, hash_content=False)
    return open_remote(base)


def require_compatible(report: CompatReport) -> None:
    """Raise :class:`IncompatibleError` when a check failed (``apply`` calls this unless ``--force``)."""
    failures = report.failures()
    if failures:
        raise IncompatibleError(report.target, [(c.name, c.summary) for c in failures])
    for c in report.checks:
        if c.status == "warn":
            logger.info("%s: %s", c.name, c.summary)  # `rvhub check` shows warnings; apply goes on


class TargetFacts:
    """What the checks read from one target, read once: checking many cards against the same target (a search)
    reads its tokenizer files and the sampled weight spans once, not once per card."""

    def __init__(self, target: ModelSource) -> None:
        self.target = target
        self._tokenizer: tuple[TokenizerFingerprint | None] | None = None
        self._spans: dict[tuple[str, int, int], np.ndarray] = {}

    def tokenizer(self) -> TokenizerFingerprint | None:
        if self._tokenizer is None:
            self._tokenizer = (tokenizer_fingerprint(self.target.root),)
        return self._tokenizer[0]

    def span(self, name: str, start: int, count: int) -> np.ndarray:
        """Elements ``start … start+count`` of tensor ``name``, in float64 (read-only: shared by the callers)."""
        key = (name, start, count)
        got = self._spans.get(key)
        if got is None:
            info = self.target.tensors[name]
            got = to_work(self.target.read_span_np(name, start, count), info.dtype).astype(np.float64)
            got.setflags(write=False)
            self._spans[key] = got
        return got


def check_model(
    card: VectorCard, target: ModelSource, vector: str = "the vector", *, allow_vocab_mismatch: bool = False,
    facts: TargetFacts | None = None,
) -> CompatReport:
    """Compare an opened target model with a vector's card (``facts``: what was read of ``target`` already)."""
    if facts is None or facts.target is not target:
        facts = TargetFacts(target)
    fp = card.fingerprints
    checks = [_check_architecture(card, target, allow_vocab_mismatch)]
    if fp is None:
        for name in ("config", "tokenizer", "lineage"):
            checks.append(Check(name, "warn", "the card has no fingerprints (written before rvhub recorded them)"))
    else:
        checks.append(_check_config(fp.config, config_values(target.config)))
        checks.append(_check_tokenizer(fp.tokenizer, facts.tokenizer()))
        checks.append(_check_lineage(fp.lineage, facts))
    return CompatReport(vector=vector, target=str(target.ref), checks=checks)


def _check_architecture(card: VectorCard, target: ModelSource, allow_vocab_mismatch: bool) -> Check:
    fp = card.fingerprints
    model_type = fp.architecture.model_type if fp else card.model_type
    tensors = [(t.name, t.shape) for t in fp.architecture.tensors] if fp else [(t.name, t.shape) for t in card.tensors]
    head, emb = target.tied_pair or (None, None)
    missing, shapes, vocab_rows = [], {}, {}
    tied_head = False
    for name, shape in tensors:
        info = target.tensors.get(name)
        if name == head and target.tied:
            tied_head = True
            continue
        if info is None and name == head and emb in target.tensors:
            info = target.tensors[emb]  # an untied name missing from a checkpoint that stores one matrix
        if info is None:
            missing.append(name)
        elif info.shape != shape:
            if name in target.vocab_tensors and info.shape[1:] == shape[1:] and shape:
                vocab_rows[name] = [shape[0], info.shape[0]]
            else:
                shapes[name] = [list(shape), list(info.shape)]
    details: dict[str, Any] = {
        "model_type": [model_type, target.model_type],
        "tensors": len(tensors),
        "matched": len(tensors) - len(missing) - len(shapes) - len(vocab_rows) - int(tied_head),
        "missing": missing,
        "shape_mismatch": shapes,
        "vocab_rows": vocab_rows,
    }
    if fp:
        target_shapes = [TensorShape(name=n, shape=target.tensors[n].shape) for n, _ in tensors if n in target.tensors]
        details["sha256_equal"] = architecture_sha256(target.model_type, target_shapes) == fp.architecture.sha256
    problems = []
    if model_type and target.model_type and model_type != target.model_type:
        problems.append(f"model_type {model_type} vs {target.model_type}")
    if missing:
        problems.append(f"{len(missing)} tensor(s) missing in the target (first: {missing[0]})")
    if shapes:
        name, (a, b) = next(iter(shapes.items()))
        problems.append(f"{len(shapes)} shape mismatch(es) (first: {name} {a} vs {b})")
    if tied_head:
        problems.append(f"the vector changes {head} separately but the target ties it to {emb}")
    if vocab_rows and not allow_vocab_mismatch:
        name, (ra, rb) = next(iter(vocab_rows.items()))
        problems.append(f"vocabulary rows differ ({name}: {ra} vs {rb}; --allow-vocab-mismatch applies common rows)")
    if problems:
        return Check("architecture", "fail", "; ".join(problems), details)
    if vocab_rows:
        name, (ra, rb) = next(iter(vocab_rows.items()))
        return Check("architecture", "warn", f"vocabulary rows differ ({name}: {ra} vs {rb}); common rows only",
                     details)
    return Check("architecture", "pass", f"{details['matched']} of {len(tensors)} tensors match by name and shape"
                 + (f" (model_type {model_type})" if model_type else ""), details)


def _check_config(recorded: ConfigFingerprint, target: dict[str, Any]) -> Check:
    ours = recorded.values
    keys = sorted(set(ours) | set(target))
    differ = {k: [ours.get(k), target.get(k)] for k in keys if ours.get(k) != target.get(k)}
    fails = [k for k, (a, b) in differ.items() if (k in FAIL_FIELDS or k.startswith("rope.")) and None not in (a, b)]
    details = {"compared": len(keys), "differ": differ, "fail_fields": fails}
    if not differ:
        return Check("config", "pass", f"{len(keys)} meaning-bearing fields equal", details)
    text = "; ".join(f"{k} {json.dumps(a)} vs {json.dumps(b)}" for k, (a, b) in differ.items())
    if fails:
        return Check("config", "fail", f"fields that change what the weights mean differ: {text}", details)
    return Check("config", "warn", f"differ (usable): {text}", details)


def _check_tokenizer(recorded: TokenizerFingerprint | None, target: TokenizerFingerprint | None) -> Check:
    if recorded is None:
        return Check("tokenizer", "warn", "no tokenizer fingerprint recorded (the `from` model had no tokenizer)")
    if target is None:
        return Check("tokenizer", "warn", "the target has no tokenizer files to compare")
    details: dict[str, Any] = {
        "vocab_size": [recorded.vocab_size, target.vocab_size],
        "vocab_equal": recorded.vocab_sha256 == target.vocab_sha256,
        "added_equal": recorded.added_sha256 == target.added_sha256,
        "added_only_in_vector_source": sorted(set(recorded.added_tokens) - set(target.added_tokens)),
        "added_only_in_target": sorted(set(target.added_tokens) - set(recorded.added_tokens)),
        "special_tokens": [recorded.special_tokens, target.special_tokens],
    }
    if not details["vocab_equal"]:
        return Check("tokenizer", "fail", f"vocabulary or merges differ ({recorded.vocab_size} vs {target.vocab_size} "
                     "entries): token ids mean different things", details)
    if not details["added_equal"]:
        only_v, only_t = details["added_only_in_vector_source"], details["added_only_in_target"]
        return Check("tokenizer", "warn", f"same vocabulary; added/special tokens differ (only in the vector's "
                     f"source: {only_v[:3]}, only in the target: {only_t[:3]})", details)
    return Check("tokenizer", "pass", f"same vocabulary ({recorded.vocab_size} entries), merges and added tokens",
                 details)


def _check_lineage(sketch: LineageSketch, facts: TargetFacts) -> Check:
    target = facts.target
    per_tensor: dict[str, float | None] = {}
    skipped: dict[str, str] = {}
    identical = True
    for t in sketch.tensors:
        info = target.tensors.get(t.name)
        if info is None or info.shape != t.shape:
            skipped[t.name] = "missing in the target" if info is None else f"shape {list(info.shape)}"
            continue
        x = sketch_values(t)
        y = np.concatenate([facts.span(t.name, a, n) for a, n in t.spans])
        identical = identical and bool(np.array_equal(x.astype(np.float32), y.astype(np.float32)))
        per_tensor[t.name] = _pearson(x, y)
    rs = [r for r in per_tensor.values() if r is not None]
    details: dict[str, Any] = {
        "correlation": None, "per_tensor": per_tensor, "skipped": skipped,
        "values": sum(n for t in sketch.tensors for _, n in t.spans),
        "pass_at": LINEAGE_PASS, "fail_below": LINEAGE_FAIL,
    }
    if per_tensor and identical:
        details["correlation"] = 1.0
        return Check("lineage", "pass", f"identical to the vector's `from` model at all {details['values']} sampled "
                     "weights", details)
    if not rs:
        why = "no sampled tensor is in the target with its shape" if not per_tensor else "constant sampled weights"
        return Check("lineage", "warn", f"cannot compare weights: {why}", details)
    r = float(np.mean(rs))
    details["correlation"] = r
    text = f"correlation {r:.3f} with the `from` model's weights over {len(rs)} tensor(s)"
    if r >= LINEAGE_PASS:
        return Check("lineage", "pass", text + " (a sibling)", details)
    if r >= LINEAGE_FAIL:
        return Check("lineage", "warn", text + f" (below {LINEAGE_PASS}: a distant relative?)", details)
    return Check("lineage", "fail", text + f" (below {LINEAGE_FAIL}: not a fine-tune of the same pretrained model)",
                 details)


def _pearson(x: np.ndarray, y: np.ndarray) -> float | None:
    keep = np.isfinite(x) & np.isfinite(y)  # a NaN in the target is apply's to refuse, not lineage's
    x, y = x[keep], y[keep]
    if x.size < 2:
        return None
    x, y = x - x.mean(), y - y.mean()
    den = math.sqrt(float((x * x).sum()) * float((y * y).sum()))
    return float((x * y).sum()) / den if den > 0 else None
