"""``inspect``: what a vector looks like, per layer and per module type, and how two vectors compare.

Every number is accumulated in float64 from the decoded float32 deltas, one row block at a time (the chunks
``apply`` adds), so an embedding delta never has to be held whole. For the lora form, the deltas are those
the adapter gives (``B·A`` per module, plus its exact residual), and its spectrum is the singular values of
each ``B·A``, computed from the rank-r factors (QR of both, SVD of an r×r core).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import MissingExtraError, ShapeMismatchError

if TYPE_CHECKING:
    from .formats import AdapterFolder, VectorFolder
    from .sources import ModelSource

_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")


def layer_of(name: str) -> str:
    """``"3"`` for ``model.layers.3.mlp.up_proj.weight``; ``"-"`` for a tensor outside the layers."""
    m = _LAYER.search(name)
    return m.group(1) if m else "-"


def module_type(name: str) -> str:
    """``mlp.up_proj.weight`` for ``model.layers.3.mlp.up_proj.weight``; the name itself outside the layers."""
    m = _LAYER.search(name)
    return name[m.end():] if m else name


@dataclass
class Stats:
    """Sums over some tensors of one vector (and, compared, of a second one), float64."""

    elements: int = 0
    nonzero: int = 0
    sq_norm: float = 0.0
    from_sq_norm: float | None = None  # ‖θ_from‖² over the same tensors, when the from model is at hand
    # two vectors
    other_nonzero: int = 0
    other_sq_norm: float = 0.0
    dot: float = 0.0
    both: int = 0  # elements nonzero in both
    same_sign: int = 0  # of those, with the same sign

    def add(self, s: Stats) -> None:
        for f in ("elements", "nonzero", "sq_norm", "other_nonzero", "other_sq_norm", "dot", "both", "same_sign"):
            setattr(self, f, getattr(self, f) + getattr(s, f))
        if s.from_sq_norm is not None:
            self.from_sq_norm = (self.from_sq_norm or 0.0) + s.from_sq_norm

    def summary(self, compared: bool) -> dict[str, Any]:
        out: dict[str, Any] = {
            "elements": self.elements,
            "changed_fraction": self.nonzero / self.elements if self.elements else 0.0,
            "norm": math.sqrt(self.sq_norm),
            "relative_norm": math.sqrt(self.sq_norm / self.from_sq_norm) if self.from_sq_norm else None,
        }
        if compared:
            den = math.sqrt(self.sq_norm * self.other_sq_norm)
            union = self.nonzero + self.other_nonzero - self.both
            out.update(
                other_norm=math.sqrt(self.other_sq_norm),
                cosine=self.dot / den if den > 0 else None,
                norm_ratio=math.sqrt(self.sq_norm / self.other_sq_norm) if self.other_sq_norm > 0 else None,
                sign_agreement=self.same_sign / self.both if self.both else None,
                jaccard=self.both / union if union else None,
            )
        return out


@dataclass(frozen=True)
class ModuleSpectrum:
    """Singular values of one LoRA module's delta, and the fraction of its energy each carries."""

    name: str
    rank: int
    singular_values: list[float]
    energy: list[float]  # σᵢ² / Σσ²


@dataclass
class InspectReport:
    """``inspect``'s numbers: per tensor, per layer, per module type and in total (``to_dict`` for JSON)."""

    vector: str
    other: str | None
    from_model: str | None
    format: str
    total: dict[str, Any]
    layers: dict[str, dict[str, Any]]
    modules: dict[str, dict[str, Any]]
    tensors: dict[str, dict[str, Any]]
    only_in_vector: list[str] = field(default_factory=list)
    only_in_other: list[str] = field(default_factory=list)
    spectrum: list[ModuleSpectrum] = field(default_factory=list)
    plot: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def inspect_vector(
    vector: str | Path,
    other: str | Path | None = None,
    *,
    from_model: str | None = None,
    plot: str | Path | None = None,
) -> InspectReport:
    """Norms per layer and module type, the changed fraction, ‖v‖/‖θ_from‖ when the `from` model is at hand
    (``from_model``, else the card's local `from` folder if it exists) and a lora form's spectrum; with
    ``other``, cosine, norm ratio, sign agreement on the common support and Jaccard of the supports. ``plot``:
    a PNG of the per-layer numbers (needs ``rvhub[plot]``)."""
    from .formats import AdapterFolder, open_vector

    if plot is not None:
        _pyplot()  # a missing extra is said before the work
    vec = open_vector(Path(vector))
    oth = open_vector(Path(other)) if other is not None else None
    src = _from_source(vec, from_model)
    # a tensor one vector stores and the other lists as unchanged is compared against zeros
    known_v = set(vec.entries) | set(vec.card.unchanged)
    known_o = (set(oth.entries) | set(oth.card.unchanged)) if oth is not None else known_v
    stored = set(vec.entries) | (set(oth.entries) if oth is not None else set())
    common = sorted(n for n in stored if n in known_v and n in known_o)
    tensors: dict[str, Stats] = {}
    for name in common:
        tensors[name] = _tensor_stats(name, vec, oth, src)
    layers: dict[str, Stats] = {}
    modules: dict[str, Stats] = {}
    total = Stats()
    for name, s in tensors.items():
        layers.setdefault(layer_of(name), Stats()).add(s)
        modules.setdefault(module_type(name), Stats()).add(s)
        total.add(s)
    compared = oth is not None
    report = InspectReport(
        vector=str(vector),
        other=str(other) if other is not None else None,
        from_model=str(src.ref) if src is not None else None,
        format=vec.card.format,
        total=total.summary(compared),
        layers={k: s.summary(compared) for k, s in sorted(layers.items(), key=lambda kv: _layer_key(kv[0]))},
        modules={k: s.summary(compared) for k, s in sorted(modules.items())},
        tensors={k: s.summary(compared) for k, s in tensors.items()},
        only_in_vector=sorted(n for n in vec.entries if n not in known_o),
        only_in_other=sorted(n for n in (oth.entries if oth is not None else {}) if n not in known_v),
        spectrum=_spectrum(vec) if isinstance(vec, AdapterFolder) else [],
    )
    if plot is not None:
        _plot(report, Path(plot))
        report.plot = str(plot)
    return report


def _layer_key(layer: str) -> tuple[int, int]:
    return (1, 0) if layer == "-" else (0, int(layer))


def _from_source(vec: VectorFolder | AdapterFolder, from_model: str | None) -> ModelSource | None:
    from .sources import open_model

    if from_model is not None:
        return open_model(from_model, hash_content=False)
    ref = vec.card.source_from
    if ref.kind == "local" and Path(ref.id).is_dir():
        try:
            return open_model(ref.id, hash_content=False)
        except Exception:  # noqa: BLE001 (an optional extra: a folder that moved or changed is simply not used)
            return None
    return None


def _blocks(vec: VectorFolder | AdapterFolder, name: str, shape: tuple[int, ...]) -> Any:
    """The decoded float32 delta of ``name`` (zeros if ``vec`` lists it as unchanged), one flat row block at
    a time."""
    import torch

    from .sources import CHUNK_ELEMS, row_blocks

    rows = shape[0] if shape else 1
    row_elems = math.prod(shape[1:])
    blocks = (row_blocks(shape, CHUNK_ELEMS) if shape else []) or [(0, rows if shape else 1)]
    if name not in vec.entries:
        for a, b in blocks:
            yield torch.zeros((b - a) * row_elems if shape else 1, dtype=torch.float32)
        return
    for (a, b), d in zip(blocks, vec.delta_chunks(name, rows, CHUNK_ELEMS, 1.0, torch.float32), strict=True):
        out = torch.zeros((b - a) * row_elems if shape else 1, dtype=torch.float32)
        d.add_to(out)
        yield out


def _tensor_stats(
    name: str, vec: VectorFolder | AdapterFolder, oth: VectorFolder | AdapterFolder | None, src: ModelSource | None
) -> Stats:
    import torch

    shape = vec.entries[name].shape if name in vec.entries else oth.entries[name].shape  # type: ignore[union-attr]
    s = Stats(elements=math.prod(shape))
    if oth is not None and name in oth.entries and oth.entries[name].shape != shape:
        raise ShapeMismatchError(name, shape, oth.entries[name].shape, "the vector", "the other vector")
    others = _blocks(oth, name, shape) if oth is not None else None
    for a in _blocks(vec, name, shape):
        a64 = a.double()
        nz = a != 0
        s.nonzero += int(nz.sum())
        s.sq_norm += float(a64.square().sum())
        if others is not None:
            b = next(others)
            b64 = b.double()
            nzb = b != 0
            both = nz & nzb
            s.other_nonzero += int(nzb.sum())
            s.other_sq_norm += float(b64.square().sum())
            s.dot += float((a64 * b64).sum())
            s.both += int(both.sum())
            s.same_sign += int((both & (torch.sign(a) == torch.sign(b))).sum())
    if src is not None and name in src.tensors and src.tensors[name].shape == shape and src.tensors[name].is_float:
        from .sources import CHUNK_ELEMS

        s.from_sq_norm = sum(float(c.double().square().sum()) for c in src.iter_chunks(name, CHUNK_ELEMS))
    return s


def _spectrum(adapter: AdapterFolder) -> list[ModuleSpectrum]:
    """Singular values of each LoRA module's ``scale·B·A``, from QR of the factors."""
    import torch

    report = adapter.card.compression
    out = []
    for m in report.modules if report else []:
        ka, kb, _ = adapter._lora_keys(m.name)
        a = adapter._reader.read(adapter._weights, ka).double()
        b = adapter._reader.read(adapter._weights, kb).double()
        _, ra = torch.linalg.qr(a.mT)  # A = Raᵀ·Qaᵀ, B = Qb·Rb: B·A and Rb·Raᵀ share singular values
        _, rb = torch.linalg.qr(b)
        sv = torch.linalg.svdvals(rb @ ra.mT) * abs(adapter._scale(m.name.removesuffix(".weight")))
        sq = sv.square()
        total = float(sq.sum())
        out.append(ModuleSpectrum(m.name, m.rank, sv.tolist(), (sq / total).tolist() if total > 0 else []))
    return out


# ---------------------------------------------------------------- output


def render(r: InspectReport) -> str:
    """The report as a table per layer and per module type."""
    compared = r.other is not None
    cols = ["norm", "changed", "rel.norm"] + (["cosine", "ratio", "sign", "jaccard"] if compared else [])
    keys = ["norm", "changed_fraction", "relative_norm"] + (
        ["cosine", "norm_ratio", "sign_agreement", "jaccard"] if compared else [])

    def row(label: str, d: dict[str, Any], width: int) -> str:
        cells = [f"{'-' if d.get(k) is None else format(d[k], '.4g'):>9}" for k in keys]
        return f"{label:<{width}}  " + "  ".join(cells)

    head = f"{r.vector}" + (f" vs {r.other}" if compared else "") + f" ({r.format})"
    lines = [head]
    for title, table in (("layer", r.layers), ("module type", r.modules)):
        width = max([len(title), *map(len, table)])
        lines.append("")
        lines.append(f"{title:<{width}}  " + "  ".join(f"{c:>9}" for c in cols))
        lines += [row(k, d, width) for k, d in table.items()]
        lines.append(row("total", r.total, width))
    if r.only_in_vector or r.only_in_other:
        lines.append(f"\nnot compared: {len(r.only_in_vector)} tensor(s) only in the vector, "
                     f"{len(r.only_in_other)} only in the other")
    if r.spectrum:
        lines.append("\nLoRA spectrum (energy σᵢ²/Σσ² of the first singular values):")
        for m in r.spectrum:
            lines.append(f"  {m.name} (rank {m.rank}): " + " ".join(f"{e:.3f}" for e in m.energy[:8]))
    if r.from_model is None:
        lines.append("\n(rel.norm = ‖v‖/‖θ_from‖ needs the `from` model: --from FOLDER)")
    if r.plot:
        lines.append(f"wrote {r.plot}")
    return "\n".join(lines)


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise MissingExtraError("inspect --plot", "plot", "matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot(r: InspectReport, path: Path) -> None:
    """Per-layer panels: the norm (and ‖v‖/‖θ_from‖); with two vectors, cosine, sign agreement, Jaccard."""
    plt = _pyplot()
    layers = [k for k in r.layers if k != "-"]
    x = [int(k) for k in layers]
    compared = r.other is not None
    fig, axes = plt.subplots(2 if compared else 1, 1, figsize=(7, 6 if compared else 3.5), squeeze=False)
    ax = axes[0][0]
    ax.bar(x, [r.layers[k]["norm"] for k in layers], color="tab:blue", label="‖v‖")
    if compared:
        ax.bar(x, [r.layers[k]["other_norm"] for k in layers], color="tab:orange", alpha=0.5, label="‖other‖")
    ax.set_ylabel("norm per layer")
    ax.set_title(Path(r.vector).name + (f" vs {Path(r.other).name}" if r.other else ""))
    rel = [r.layers[k]["relative_norm"] for k in layers]
    if all(v is not None for v in rel) and rel:
        twin = ax.twinx()
        twin.plot(x, rel, "k.-", label="‖v‖/‖θ_from‖")
        twin.set_ylabel("‖v‖/‖θ_from‖")
    ax.legend(loc="upper left")
    if compared:
        ax2 = axes[1][0]
        for key, label in (("cosine", "cosine"), ("sign_agreement", "sign agreement"), ("jaccard", "Jaccard")):
            ax2.plot(x, [math.nan if r.layers[k][key] is None else r.layers[k][key] for k in layers], ".-",
                     label=label)
        ax2.set_ylim(-1.05, 1.05)
        ax2.set_ylabel("per layer")
        ax2.legend(loc="lower left")
    axes[-1][0].set_xlabel("layer")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.rvhub-tmp")
    try:
        fig.savefig(tmp, format="png", dpi=100)
        tmp.replace(path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
