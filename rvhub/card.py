"""The typed metadata stored as ``rvhub.json`` (and rendered as ``README.md``) in every vector folder.

Frozen pydantic models with ``extra="forbid"``: a typo or a hand edit fails loudly instead of vanishing.
The card says what the vector is (formula, form, recommended scale), where it came from (pinned sources,
recommended bases), whether a model can take it (fingerprints, computed by :mod:`rvhub.compat`), what it
does (benchmark deltas), and what the folder holds (every file's sha256).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    ValidationError,
    field_validator,
    model_validator,
)

from . import __version__
from ._untrusted import MAX_CARD_BYTES
from .errors import IntegrityError, VectorFormatError

CARD_FILE = "rvhub.json"
README_FILE = "README.md"
# 1: no card had been published when fingerprints, benchmarks and the Hub card were added (with defaults, so
# a card written before them still reads). 2: combined vectors (formula "combination" + provenance); every
# version-1 card is a valid version-2 card. 3: the architecture fingerprint's shape_hash (what the Hub search
# by fingerprint finds a vector by); every older card is a valid version-3 card. Bump it for any change an
# older rvhub cannot read.
SCHEMA_VERSION: Literal[3] = 3
READABLE_SCHEMA_VERSIONS = (1, 2, 3)
HUB_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9_.\-]+$"
HubId = Annotated[str, Field(pattern=HUB_ID_PATTERN, description="a Hugging Face Hub model id, org/name")]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
Finite = Annotated[float, Field(allow_inf_nan=False)]
Dim = Annotated[int, Field(ge=0)]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ModelRef(_Frozen):
    """Where a model came from, pinned: a Hub repo at a resolved commit, or a local folder by content."""

    kind: Literal["hub", "local"] = Field(description="hub: a Hugging Face Hub repo; local: a folder")
    id: str = Field(description="Hub repo id, or the folder path as given")
    revision: str | None = Field(default=None, description="revision asked for (Hub only)")
    commit: str | None = Field(default=None, description="resolved commit hash (Hub only)")
    content_sha256: str | None = Field(
        default=None,
        description="sha256 over the sorted (file name, file sha256) pairs of the weight files (local only)",
    )

    def __str__(self) -> str:
        if self.kind == "hub":
            return f"{self.id}@{self.commit or self.revision or 'main'}"
        return f"{self.id} (sha256 {self.content_sha256[:12]})" if self.content_sha256 else str(self.id)


class TensorEntry(_Frozen):
    """One tensor of the vector."""

    name: str
    shape: tuple[Dim, ...]
    source_dtype: Literal["BF16", "F16", "F32", "F64"] = Field(description="dtype of the tensor in the models")
    changed: int = Field(ge=0, description="number of elements that differ between the two models")
    fixups: int = Field(
        ge=0, default=0,
        description="changed elements whose float32 difference is not a value of the stored dtype; they are "
        "stored as that exact float32 (float64) difference in fix_hi",
    )


class FileEntry(_Frozen):
    """A file of the vector folder and its sha256."""

    path: str = Field(description="a plain file name inside the folder (no directories)")
    size: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")

    @field_validator("path")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        if not v or v in (".", "..") or "/" in v or "\\" in v or v.startswith(".") or "\0" in v:
            raise ValueError(f"{v!r} is not a plain file name")
        return v


class ModuleReport(_Frozen):
    """How well one module's delta is carried by its LoRA factors."""

    name: str = Field(description="vector tensor (a 2-D weight) that the LoRA pair replaces")
    shape: tuple[Dim, Dim]
    rank: int = Field(ge=1)
    energy: float = Field(ge=0, le=1, description="retained fraction ‖ΔW_r‖²/‖ΔW‖²")
    rel_error: float = Field(ge=0, description="‖ΔW − ΔW_r‖_F / ‖ΔW‖_F")
    params: int = Field(ge=0, description="LoRA parameters: rank·(rows + columns)")


class SvdCheck(_Frozen):
    """Randomized against exact truncation error on one module at the same rank."""

    name: str
    rank: int = Field(ge=1)
    randomized_error: float = Field(ge=0)
    exact_error: float = Field(ge=0)


class CompressionReport(_Frozen):
    """What ``rvhub compress`` kept: per module and in total, as fractions of ‖v‖²."""

    svd: Literal["randomized", "exact"]
    rule: Literal["rank", "energy", "budget"]
    rule_value: float = Field(description="the --rank, --energy or --budget value")
    embeddings: Literal["residual", "lora"] = Field(description="where embed_tokens/lm_head deltas went")
    adapter_dtype: Literal["BF16", "F16", "F32"]
    residual_format: Literal["sparse", "dense"] = Field(description="encoding of residual.safetensors")
    modules: list[ModuleReport]
    residual: list[str] = Field(description="tensors carried exactly, as in the source vector, in the residual file")
    total_sq_norm: float = Field(ge=0, description="‖v‖² over every tensor of the source vector")
    adapter_energy: float = Field(ge=0, le=1, description="fraction of ‖v‖² the LoRA factors carry")
    residual_energy: float = Field(ge=0, le=1, description="fraction of ‖v‖² in the residual file")
    dropped_energy: float = Field(ge=0, le=1, description="fraction of ‖v‖² lost to rank truncation")
    rel_error: float = Field(ge=0, description="‖v − v̂‖ / ‖v‖ over the whole vector")
    adapter_params: int = Field(ge=0)
    adapter_bytes: int = Field(ge=0)
    residual_bytes: int = Field(ge=0)
    vector_bytes: int = Field(ge=0, description="size of the source vector's tensor files")
    svd_checks: list[SvdCheck] = Field(default_factory=list)


# ---------------------------------------------------------------- fingerprints


class TensorShape(_Frozen):
    """A tensor name and its shape."""

    name: str
    shape: tuple[Dim, ...]


class ArchitectureFingerprint(_Frozen):
    """model_type and every tensor the vector touches, with its shape, as in the ``from`` model."""

    model_type: str | None = Field(description="config.json model_type of the `from` model")
    tensors: list[TensorShape] = Field(description="every tensor the vector touches, sorted by name")
    sha256: Sha256 = Field(description="sha256 of model_type and the (name, shape) list, see architecture_sha256")
    shape_hash: str | None = Field(
        default=None, pattern=r"^[0-9a-f]{16}$",
        description="16 hex digits over every tensor name and shape of the `from` model, the vector's or not "
        "(rvhub.compat.shape_hash; schema 3): push tags the repo rvhub-shape-<shape_hash>, and search --base finds "
        "it by the target's own; None in cards written before it",
    )

    @model_validator(mode="after")
    def _hash_matches(self) -> ArchitectureFingerprint:
        _unique("tensors", [t.name for t in self.tensors])
        if self.sha256 != architecture_sha256(self.model_type, self.tensors):
            raise ValueError("sha256 does not match model_type and tensors (hand-edited?)")
        return self


class ConfigFingerprint(_Frozen):
    """The config.json fields that change what equal-shaped weights mean, normalised (see rvhub.compat)."""

    values: dict[str, JsonValue] = Field(
        description="field -> value; rope settings flattened as rope.<key> from rope_parameters, rope_scaling "
        "and the top-level rope_theta; norm_eps from rms_norm_eps/layer_norm_eps/layer_norm_epsilon"
    )
    sha256: Sha256 = Field(description="sha256 of the canonical JSON of values")

    @model_validator(mode="after")
    def _hash_matches(self) -> ConfigFingerprint:
        if self.sha256 != canonical_sha256(self.values):
            raise ValueError("sha256 does not match values (hand-edited?)")
        return self


class TokenizerFingerprint(_Frozen):
    """What token ids mean: the model vocabulary and merges, and the added/special tokens, hashed apart
    (an instruct model often adds chat tokens to an unchanged vocabulary)."""

    source: Literal["tokenizer.json", "vocab.json+merges.txt", "tokenizer.model"] = Field(
        description="the file(s) hashed"
    )
    vocab_size: int = Field(ge=0, description="entries of the model vocabulary, added tokens excluded")
    vocab_sha256: Sha256 = Field(description="sha256 of the vocabulary (token, id) and merges, added tokens excluded")
    added_tokens: list[str] = Field(description="added tokens' contents, in id order")
    special_tokens: dict[str, str] = Field(
        description="role -> token from tokenizer_config.json (bos_token, eos_token, pad_token, unk_token)"
    )
    added_sha256: Sha256 = Field(description="sha256 of the added tokens (id, content, special) and special_tokens")


class SketchTensor(_Frozen):
    """Values of one tensor of the ``from`` model at fixed positions."""

    name: str
    shape: tuple[Dim, ...]
    spans: list[tuple[Dim, Dim]] = Field(description="(flat start, length) runs of elements, sorted")
    values: str = Field(description="the elements of the spans in order, float32 little-endian, base64")

    @model_validator(mode="after")
    def _sizes_agree(self) -> SketchTensor:
        n = sum(length for _, length in self.spans)
        try:
            raw = base64.b64decode(self.values, validate=True)
        except ValueError as e:
            raise ValueError(f"values is not base64: {e}") from e
        if len(raw) != 4 * n:
            raise ValueError(f"values hold {len(raw) // 4} float32, the spans cover {n}")
        return self


class LineageSketch(_Frozen):
    """A seeded sample of the ``from`` model's weights: a sibling (a fine-tune of the same pretrained model)
    correlates with it, a same-shaped model with another initialisation does not."""

    seed: int
    tensors: list[SketchTensor]


class Fingerprints(_Frozen):
    """Computed by extract from the ``from`` model; ``rvhub check`` compares a target against them."""

    architecture: ArchitectureFingerprint
    config: ConfigFingerprint
    tokenizer: TokenizerFingerprint | None = Field(description="None when the `from` model has no tokenizer files")
    lineage: LineageSketch


def _unique(what: str, names: list[str]) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ValueError(f"{name!r} appears twice in {what}; each name may appear once")
        seen.add(name)


def canonical_sha256(value: Any) -> str:
    """sha256 of the canonical JSON of ``value`` (sorted keys, no spaces, UTF-8)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def architecture_sha256(model_type: str | None, tensors: list[TensorShape]) -> str:
    return canonical_sha256([model_type, sorted([t.name, list(t.shape)] for t in tensors)])


# ---------------------------------------------------------------- benchmark deltas


class HarnessSettings(_Frozen):
    """How the scores were measured. Deltas from different settings are not comparable."""

    name: str = Field(default="lm-evaluation-harness", min_length=1, description="the evaluation harness")
    version: str | None = Field(default=None, description="harness version or git hash")
    num_fewshot: int | None = Field(default=None, ge=0, description="few-shot examples per prompt")
    chat_template: bool | None = Field(default=None, description="whether prompts went through the chat template")
    chat_template_sha256: str | None = Field(default=None, description="hash of the chat template used, if any")
    fewshot_as_multiturn: bool | None = Field(default=None, description="few-shot examples as chat turns")
    system_instruction: str | None = Field(default=None, description="system prompt, if any")
    prompt: str | None = Field(default=None, description="the prompt template (e.g. the task's doc_to_text)")
    filter: str | None = Field(default=None, description="answer filter, e.g. strict-match or flexible-extract")
    task_version: str | None = Field(default=None, description="the task's version, as the harness reports it")
    task_hash: str | None = Field(default=None, description="the harness's hash of the task's data and prompts")
    limit: float | None = Field(default=None, gt=0, description="--limit: examples (or fraction) per task")
    seed: int | None = Field(default=None, description="the harness's random seeds (python, numpy, torch, few-shot)")
    gen_kwargs: str | None = Field(default=None, description="generation arguments of generate_until tasks")
    dtype: str | None = Field(default=None, description="dtype the model ran in")


class Scores(_Frozen):
    """A metric on the target alone, with +αv, with −αv, and with a norm-matched random vector."""

    target: Finite = Field(description="the target model alone")
    plus: Finite = Field(description="target + α·v")
    minus: Finite | None = Field(default=None, description="target − α·v")
    control: Finite | None = Field(
        default=None, description="target + α·r, r a random vector with the norm of v (the control)"
    )


class PairedTest(_Frozen):
    """A paired test of target + α·v against another run, on per-example results of the same examples."""

    against: Literal["target", "control"] = Field(description="the run +α·v is compared with")
    method: Literal["mcnemar", "bootstrap"] = Field(
        description="mcnemar: exact McNemar test (0/1 metrics); bootstrap: seeded paired bootstrap of the mean"
    )
    n: int = Field(ge=0, description="paired examples")
    diff: Finite = Field(description="mean score of +α·v minus that of the other run")
    p_value: float = Field(ge=0, le=1, description="two-sided p-value (McNemar: exact)")
    mid_p: float | None = Field(default=None, ge=0, le=1, description="McNemar mid-p value")
    plus_only: int | None = Field(default=None, ge=0, description="McNemar: examples right with +α·v only")
    other_only: int | None = Field(default=None, ge=0, description="McNemar: examples right in the other run only")
    distinguishable: bool = Field(description="p_value < 0.05: the difference is distinguishable from noise")


class SweepPoint(_Frozen):
    """The score of target + α·v at one α of a sweep."""

    scale: Finite
    score: Finite
    stderr: Finite | None = None


class BenchmarkDelta(_Frozen):
    """What the vector does to one metric of one benchmark on one target model."""

    benchmark: str = Field(min_length=1, description="task name, e.g. gsm8k")
    metric: str = Field(min_length=1, description="metric name, e.g. exact_match")
    higher_is_better: bool = Field(default=True, description="whether a larger value is better")
    n: int | None = Field(default=None, ge=1, description="number of evaluated examples")
    harness: HarnessSettings = Field(default_factory=HarnessSettings)
    target: str = Field(min_length=1, description="the model evaluated (Hub id or name)")
    scale: Finite = Field(default=1.0, description="α used for the +αv, −αv and control runs")
    scores: Scores
    stderr: Scores | None = Field(default=None, description="standard errors of the scores, when known")
    control_kind: Literal["gaussian", "permute"] | None = Field(
        default=None, description="how the control r was made: per-tensor Gaussian or v's values shuffled per "
        "tensor, both with v's per-tensor L2 norm"
    )
    control_seed: int | None = Field(default=None, description="seed of the control")
    tests: list[PairedTest] = Field(default_factory=list, description="paired tests of +α·v against other runs")
    sweep: list[SweepPoint] = Field(default_factory=list, description="+α·v scores over a sweep of α")
    best_scale: Finite | None = Field(default=None, description="the α of the sweep with the best score")

    @property
    def key(self) -> tuple[str, str, str | None, str]:
        """Deltas with the same key replace each other."""
        return (self.benchmark, self.metric, self.harness.filter, self.target)


# ---------------------------------------------------------------- provenance of a combined vector (schema 2)


class CombineInput(_Frozen):
    """One input of ``rvhub combine``, pinned."""

    ref: str = Field(description="registry repo@commit, or the local folder as given")
    card_sha256: Sha256 = Field(description="sha256 of the input's rvhub.json (pins a local folder's content)")
    weight: Finite = Field(description="wᵢ in the formula")
    source_from: ModelRef = Field(description="the input's `from` model")
    source_to: ModelRef = Field(description="the input's `to` model")


class ScalePatternEntry(_Frozen):
    """A --scale-pattern: tensors whose name ``re.search``-matches ``pattern`` (first match wins) get ``alpha``."""

    pattern: str = Field(min_length=1)
    alpha: Finite


class Provenance(_Frozen):
    """How a combined vector was made from other vectors (``rvhub combine``)."""

    expression: str = Field(description="the formula in words, e.g. 1·v1 + 0.5·v2 (vᵢ: inputs[i-1])")
    method: Literal["sum", "ties", "dare"] = Field(
        description="sum: Σ wᵢ·vᵢ; ties: trim, elect sign, disjoint mean (Yadav et al. 2023); dare: random drop "
        "with probability 1 − density, rescale by 1/density, then sum (Yu et al. 2023); see rvhub.algebra"
    )
    density: float | None = Field(default=None, gt=0, le=1, description="D of ties/dare, the kept fraction")
    seed: int | None = Field(default=None, description="dare's random seed")
    inputs: list[CombineInput] = Field(min_length=1)
    scale: Finite = Field(default=1.0, description="α applied to the result for tensors no pattern matches")
    scale_patterns: list[ScalePatternEntry] = Field(default_factory=list, description="per-tensor α, in order")
    forced: bool = Field(default=False, description="combined with --force despite differing `from` fingerprints")


class VectorCard(_Frozen):
    """Manifest of a reasoning-vector folder (``rvhub.json``)."""

    schema_version: Literal[1, 2, 3] = Field(default=SCHEMA_VERSION, description="version of this schema")
    rvhub_version: str = Field(default=__version__, description="the rvhub version that wrote the card")
    formula: Literal["to - from", "combination"] = Field(
        default="to - from",
        description="to - from: v = θ_to − θ_from, per tensor; combination: made by rvhub combine from other "
        "vectors, as its provenance says (source_from/source_to are then those of the first input)",
    )
    format: Literal["sparse", "dense", "lora"] = Field(
        description="sparse: bitmask of changed elements + their deltas; dense: a full delta per tensor; "
        "lora: a PEFT LoRA adapter plus a residual file for what LoRA cannot carry"
    )
    values_dtype: Literal["source", "BF16", "F16", "F32"] = Field(
        description="dtype of the stored deltas; 'source' = each tensor's own dtype, with float32 fix-ups where "
        "a difference is not a value of it (exact)"
    )
    exact: bool = Field(
        description="every decoded element equals fl32(to) − fl32(from) bit for bit (float64 for F64 tensors; up "
        "to the sign of zero), so θ + α·v in float32, rounded once, is the reference on any base and α; for a "
        "combination: every input was exact and every decoded element is exactly the float32 result of the formula"
    )
    source_from: ModelRef
    source_to: ModelRef
    model_type: str | None = Field(default=None, description="config.json model_type of the sources")
    tie_word_embeddings: bool = Field(
        description="true when both sources tie lm_head to the input embeddings (the vector then has no "
        "lm_head delta: the embedding delta moves both)"
    )
    tensors: list[TensorEntry]
    unchanged: list[str] = Field(default_factory=list, description="tensors equal in both models (omitted)")
    files: list[FileEntry]
    compression: CompressionReport | None = Field(default=None, description="set for the lora form")
    recommended_scale: Finite = Field(default=1.0, description="α the author recommends in θ_target + α·v")
    recommended_bases: list[HubId] = Field(
        default_factory=list, description="Hub ids of models the author recommends applying the vector to"
    )
    fingerprints: Fingerprints | None = Field(
        default=None, description="compatibility fingerprints of the `from` model (None: not computed)"
    )
    benchmarks: list[BenchmarkDelta] = Field(default_factory=list, description="measured effects of the vector")
    license: str | None = Field(
        default=None, pattern=r"^[a-z0-9][a-z0-9.\-]*$",
        description="Hub license id (e.g. apache-2.0, mit, other); mind the sources' licenses",
    )
    provenance: Provenance | None = Field(
        default=None, description="for formula 'combination' (schema 2): how rvhub combine made the vector"
    )

    @model_validator(mode="after")
    def _lora_has_report(self) -> VectorCard:
        if (self.format == "lora") != (self.compression is not None):
            raise ValueError("a compression report goes with format 'lora', and only with it")
        if (self.formula == "combination") != (self.provenance is not None):
            raise ValueError("a provenance goes with formula 'combination', and only with it")
        if self.provenance is not None and self.schema_version < 2:
            raise ValueError("a provenance needs schema_version 2")
        return self

    @model_validator(mode="after")
    def _names_unique(self) -> VectorCard:
        listed = [t.name for t in self.tensors]
        _unique("tensors", listed)
        _unique("unchanged", self.unchanged)
        _unique("files", [f.path for f in self.files])
        both = sorted({t.name for t in self.tensors if t.changed} & set(self.unchanged))
        if both:  # (a dense vector lists its unchanged tensors in both, with changed 0)
            raise ValueError(f"{both[0]!r} is listed in unchanged but has changed elements in tensors")
        return self

    def write(self, folder: Path, files: Mapping[str, str | bytes] | None = None) -> None:
        """Write ``rvhub.json`` and ``README.md`` (rendered from this card) together, so they always agree.

        Both are written to hidden temporary files and fsynced before either is renamed into place; neither
        is in the file manifest, so rewriting them keeps the folder valid. ``files``: other text files to
        replace the same way, renamed before the card (whose manifest must already list their new hashes).
        """
        from ._readme import render_readme

        _replace_files(folder, {**(files or {}), CARD_FILE: self.to_json(), README_FILE: render_readme(self)})

    def to_json(self) -> str:
        return self.model_dump_json(indent=2) + "\n"

    def to_readme(self, repo_id: str | None = None) -> str:
        """The Hub model card (README.md) for this card; pure, no network. ``repo_id`` fills the how-to."""
        from ._readme import render_readme

        return render_readme(self, repo_id)

    @classmethod
    def from_readme(cls, text: str, where: str = README_FILE) -> VectorCard:
        """The card embedded in a README.md that :meth:`to_readme` rendered."""
        from ._readme import embedded_json

        return cls.from_json(embedded_json(text, where), where)

    @classmethod
    def read(cls, folder: Path) -> VectorCard:
        path = folder / CARD_FILE
        if not path.is_file():
            raise VectorFormatError(str(folder), f"no {CARD_FILE}")
        try:
            with open(path, "rb") as fh:
                raw = fh.read(MAX_CARD_BYTES + 1)  # never more than a card may hold
        except OSError as e:
            raise VectorFormatError(str(folder), f"cannot read {CARD_FILE}: {e}") from e
        if len(raw) > MAX_CARD_BYTES:
            raise VectorFormatError(str(folder), f"{CARD_FILE} is larger than the {MAX_CARD_BYTES:,} bytes allowed")
        try:
            text = raw.decode("utf-8")
        except ValueError as e:
            raise VectorFormatError(str(folder), f"cannot read {CARD_FILE}: {e}") from e
        return cls.from_json(text, str(folder))

    @classmethod
    def from_json(cls, text: str, where: str) -> VectorCard:
        """Parse a card's JSON; errors name the field, what was found and what is allowed.

        The text is untrusted: its size, depth and longest string are bounded before it is parsed, and it
        is validated strictly (``1.0`` or ``true`` is not the integer 1).
        """
        from ._untrusted import MAX_STRING, parse_json

        raw = parse_json(
            text, where, max_bytes=MAX_CARD_BYTES, max_string=MAX_STRING,
            error=lambda reason: VectorFormatError(where, f"{CARD_FILE}: {reason}"),
        )
        if not isinstance(raw, dict):
            raise VectorFormatError(where, f"{CARD_FILE} must hold a JSON object", field="")
        version = raw.get("schema_version")
        if type(version) is not int or version not in READABLE_SCHEMA_VERSIONS:
            newer = type(version) is int and version > SCHEMA_VERSION
            writer = f", written by rvhub {str(raw.get('rvhub_version'))[:40]}" if raw.get("rvhub_version") else ""
            hint = "read it with a newer rvhub" if newer else "it is not an rvhub card"
            *older, last = READABLE_SCHEMA_VERSIONS
            raise VectorFormatError(
                where,
                f"{CARD_FILE} has schema_version {version!r}{writer}; this rvhub ({__version__}) reads schema "
                f"versions {', '.join(map(str, older))} and {last} only: {hint}",
                field="schema_version",
            )
        try:
            return cls.model_validate_json(text, strict=True)
        except ValidationError as e:
            errors = e.errors()
            where_first = ".".join(str(p) for p in errors[0]["loc"])
            shown = "; ".join(_explain(err) for err in errors[:3])
            more = f" (+{len(errors) - 3} more)" if len(errors) > 3 else ""
            raise VectorFormatError(where, f"{CARD_FILE} {shown}{more}", field=where_first) from e


def _explain(err: Any) -> str:
    loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
    if err["type"] == "extra_forbidden":
        if len(err["loc"]) == 1:
            return f"field {loc}: unknown field; the card's fields are {', '.join(VectorCard.model_fields)}"
        return f"field {loc}: unknown field (the schema is cards/vector-card.schema.json)"
    if err["type"] == "missing":
        return f"field {loc}: required but missing"
    got = json.dumps(err.get("input"), default=str)
    got = got if len(got) <= 60 else got[:57] + "..."
    return f"field {loc}: {err['msg']} (got {got})"


def _replace_files(folder: Path, contents: Mapping[str, str | bytes]) -> None:
    """Write every file to a temporary sibling and fsync it, then rename them all into place."""
    from ._io import write_bytes, write_text

    tmps = {}
    try:
        for name, text in contents.items():
            tmp = folder / f".{name}.rvhub-tmp-{os.getpid()}-{os.urandom(4).hex()}"
            tmps[name] = tmp
            if isinstance(text, bytes):
                write_bytes(tmp, text)
            else:
                write_text(tmp, text)
        for name, tmp in tmps.items():
            os.replace(tmp, folder / name)
    finally:
        for tmp in tmps.values():
            tmp.unlink(missing_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_entry(folder: Path, name: str) -> FileEntry:
    """The manifest entry (size, sha256) of ``folder/name``."""
    from ._io import sha256_file

    path = folder / name
    return FileEntry(path=name, size=path.stat().st_size, sha256=sha256_file(path))


def file_entries(folder: Path, names: Sequence[str]) -> list[FileEntry]:
    """The manifest entries of ``folder``'s new files ``names``. They are hashed on a background thread while
    this one imports what rendering the README needs (the card's next step): the two overlap on two cores."""
    from ._io import hash_ahead
    from ._readme import preload

    hash_ahead(folder / n for n in names)
    preload()
    return [file_entry(folder, n) for n in names]


def verify_files(folder: Path, card: VectorCard) -> None:
    """Check every file the card lists against its recorded size and sha256, before anything reads it."""
    from ._io import hash_ahead, sha256_file

    hash_ahead(folder / e.path for e in card.files[1:])  # the rest on another core while this one does the first
    for entry in card.files:
        path = folder / entry.path
        if not path.is_file():
            raise IntegrityError(str(path), "listed in the card but missing")
        if path.stat().st_size != entry.size:
            raise IntegrityError(str(path), f"size {path.stat().st_size} differs from the card's {entry.size}")
        if sha256_file(path) != entry.sha256:
            raise IntegrityError(str(path), "sha256 differs from the card's")
