"""The typed metadata stored as ``rvhub.json`` in every vector folder.

Frozen pydantic models with ``extra="forbid"``: a typo or a hand edit fails loudly instead of vanishing.
Later schema versions extend this card (benchmarks, fingerprints, compression report).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from . import __version__
from .errors import IntegrityError, VectorFormatError

CARD_FILE = "rvhub.json"
SCHEMA_VERSION = 1


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
        return f"{self.id} (sha256 {str(self.content_sha256)[:12]})"


class TensorEntry(_Frozen):
    """One tensor of the vector."""

    name: str
    shape: tuple[int, ...]
    source_dtype: Literal["BF16", "F16", "F32", "F64"] = Field(description="dtype of the tensor in the models")
    changed: int = Field(ge=0, description="number of elements that differ between the two models")
    fixups: int = Field(
        ge=0, default=0,
        description="elements whose delta is stored in float32 hi+lo parts so that from + v == to exactly",
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
    shape: tuple[int, int]
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


class VectorCard(_Frozen):
    """Manifest of a reasoning-vector folder (``rvhub.json``)."""

    schema_version: Literal[1] = 1
    rvhub_version: str = __version__
    formula: Literal["to - from"] = Field(default="to - from", description="v = θ_to − θ_from, per tensor")
    format: Literal["sparse", "dense", "lora"] = Field(
        description="sparse: bitmask of changed elements + their deltas; dense: a full delta per tensor; "
        "lora: a PEFT LoRA adapter plus a residual file for what LoRA cannot carry"
    )
    values_dtype: Literal["source", "BF16", "F16", "F32"] = Field(
        description="dtype of the stored deltas; 'source' = each tensor's own dtype (exact by construction)"
    )
    exact: bool = Field(description="applying the vector to `from` reproduces `to` (up to the sign of zero)")
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

    @model_validator(mode="after")
    def _lora_has_report(self) -> VectorCard:
        if (self.format == "lora") != (self.compression is not None):
            raise ValueError("a compression report goes with format 'lora', and only with it")
        return self

    def write(self, folder: Path) -> None:
        from ._io import write_text

        write_text(folder / CARD_FILE, self.model_dump_json(indent=2) + "\n")

    @classmethod
    def read(cls, folder: Path) -> VectorCard:
        path = folder / CARD_FILE
        if not path.is_file():
            raise VectorFormatError(str(folder), f"no {CARD_FILE}")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise VectorFormatError(str(folder), f"{CARD_FILE} is not valid JSON: {e}") from e
        version = raw.get("schema_version") if isinstance(raw, dict) else None
        if version != SCHEMA_VERSION:
            raise VectorFormatError(
                str(folder),
                f"{CARD_FILE} has schema_version {version!r}; this rvhub ({__version__}) reads version "
                f"{SCHEMA_VERSION}",
            )
        try:
            return cls.model_validate(raw)
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            raise VectorFormatError(str(folder), f"{CARD_FILE} field {where}: {err['msg']}") from e


def file_entry(folder: Path, name: str) -> FileEntry:
    """The manifest entry (size, sha256) of ``folder/name``."""
    from ._io import sha256_file

    path = folder / name
    return FileEntry(path=name, size=path.stat().st_size, sha256=sha256_file(path))


def verify_files(folder: Path, card: VectorCard) -> None:
    """Check every file the card lists against its recorded size and sha256, before anything reads it."""
    from ._io import sha256_file

    for entry in card.files:
        path = folder / entry.path
        if not path.is_file():
            raise IntegrityError(str(path), "listed in the card but missing")
        if path.stat().st_size != entry.size:
            raise IntegrityError(str(path), f"size {path.stat().st_size} differs from the card's {entry.size}")
        if sha256_file(path) != entry.sha256:
            raise IntegrityError(str(path), "sha256 differs from the card's")
