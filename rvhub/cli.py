"""The ``rvhub`` command line: parse, call one library function, print. Library errors become one line
on stderr and exit code 1 (the traceback only with ``--debug`` or RVHUB_DEBUG=1)."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from . import __version__
from ._io import Interrupted, request_stop
from ._secrets import format_exception, scrub, scrub_logging
from ._untrusted import printable
from .errors import RvhubError

app = typer.Typer(
    name="rvhub",
    help="Extract, apply and share reasoning vectors: v = θ_RL − θ_SFT, applied as θ_target + α·v.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(__version__)
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the rvhub version.")
    ] = False,
) -> None:
    """Extract, apply and share reasoning vectors: v = θ_RL − θ_SFT, applied as θ_target + α·v."""


class VectorFormat(str, Enum):
    sparse = "sparse"
    dense = "dense"


class SortChoice(str, Enum):  # registry.SORTS (not imported here: search's --help stays light)
    downloads = "downloads"
    likes = "likes"
    last_modified = "last_modified"


# Options shared by several commands, defined once.
QuietOpt = Annotated[
    bool, typer.Option("--quiet", "-q", help="No progress bar (also off with HF_HUB_DISABLE_PROGRESS_BARS=1).")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print a machine-readable JSON summary on stdout.")]
DebugOpt = Annotated[
    bool, typer.Option("--debug", help="Show the full traceback on errors (or set RVHUB_DEBUG=1).")
]
OverwriteOpt = Annotated[
    bool, typer.Option("--overwrite", help="Replace OUT if it exists (it is replaced only after success).")
]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Output folder (must not exist, unless --overwrite).")]
ShardOpt = Annotated[
    str, typer.Option("--max-shard-size", help="Largest safetensors shard, e.g. 2GB, 500MB, 1GiB (bytes).")
]
RegistryOpt = Annotated[
    str | None,
    typer.Option(
        "--registry",
        help="A local registry folder instead of the Hub (default: $RVHUB_REGISTRY if set, else the Hub at "
        "$HF_ENDPOINT or huggingface.co).",
    ),
]
ScaleOpt = Annotated[float, typer.Option("--scale", "-a", help="α in θ_base + α·v; -1 subtracts the vector.")]
DtypeOpt = Annotated[
    str | None, typer.Option(help="Output dtype (bfloat16, float16, float32); default: the base's own.")
]
DeviceOpt = Annotated[str, typer.Option(help="Where the arithmetic runs: cpu or cuda[:N].")]
VocabOpt = Annotated[
    bool,
    typer.Option(
        "--allow-vocab-mismatch",
        help="If vocabulary sizes differ, apply the delta to the common rows and report the rest.",
    ),
]
ForceOpt = Annotated[
    bool, typer.Option("--force", help="Apply even if the base fails the compatibility check (rvhub check).")
]
ScalePatternOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--scale-pattern",
        help="REGEX=α: tensors whose name REGEX is found in (re.search) get α; repeat for several, the first "
        "match wins, --scale covers the rest. E.g. 'layers\\.(0|1|2)\\.=0.5' or mlp=1.2.",
    ),
]

T = TypeVar("T")


def _streaming(*folders: str | Path | None) -> None:
    """The start of a command that streams tensors: glibc's malloc keeps freed chunk-sized blocks
    (``_malloc``), and these vector folders' weight files are hashed on another core while the command's
    imports load, so the verification that must come before reading them finds the work done
    (``_io.hash_ahead``)."""
    from ._io import hash_folder_ahead
    from ._malloc import keep_freed_blocks

    keep_freed_blocks()
    for folder in folders:
        if folder is not None:
            hash_folder_ahead(Path(folder))


def _run(
    debug: bool, json_out: bool, call: Callable[[], T], human: Callable[[T], str],
    exit_code: Callable[[T], int] = lambda result: 0,
) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_PrintableFormatter("warning: %(message)s"))
    logging.basicConfig(level=logging.WARNING, handlers=[handler])
    scrub_logging()  # a token a server echoes back never reaches stderr, tracebacks included
    debug = debug or os.environ.get("RVHUB_DEBUG", "") not in ("", "0")
    # Ctrl-C and SIGTERM stop the work at the next chunk (an exception raised inside a library call could
    # come out as another error); the temporary output is then removed and OUT left as it was
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: request_stop(signum))
    try:
        result = call()
    except RvhubError as e:
        if debug:
            sys.stderr.write(format_exception(e))
        typer.echo(" ".join(printable(scrub(f"error: {e}")).splitlines()), err=True)  # one line, whatever e holds
        raise typer.Exit(1) from None
    except (Interrupted, KeyboardInterrupt) as e:
        typer.echo("interrupted; nothing was written", err=True)
        raise typer.Exit(128 + (e.signum if isinstance(e, Interrupted) else signal.SIGINT)) from None
    except Exception as e:  # a bug: its traceback is shown as Python would, but scrubbed
        sys.stderr.write(format_exception(e))
        raise typer.Exit(1) from None
    if json_out:
        typer.echo(json.dumps(_to_dict(result), indent=2))
    else:
        typer.echo(printable(human(result)))  # card values may hold terminal escapes
    code = exit_code(result)
    if code:
        raise typer.Exit(code)


class _PrintableFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return printable(super().format(record))


def _to_dict(result: Any) -> Any:
    if hasattr(result, "model_dump"):  # a pydantic card
        return result.model_dump(mode="json")
    return result.to_dict() if hasattr(result, "to_dict") else result


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


@app.command()
def extract(
    from_model: Annotated[
        str, typer.Option("--from", help="The model v starts from (SFT): folder or org/name\\[@rev].")
    ],
    to_model: Annotated[str, typer.Option("--to", help="The model v leads to (RL): folder or org/name\\[@rev].")],
    out: OutOpt,
    format: Annotated[
        VectorFormat,
        typer.Option(help="sparse: exact bitmask + changed deltas (small); dense: a full delta per tensor."),
    ] = VectorFormat.sparse,
    dtype: Annotated[
        str | None,
        typer.Option(help="Dense only: store deltas as float32 (default, exact) or bfloat16/float16 (lossy)."),
    ] = None,
    max_shard_size: ShardOpt = "2GB",
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Compute the vector v = θ_to − θ_from (float32 differences), streaming tensor by tensor."""
    _streaming()
    from .extract import extract as run

    def human(r: Any) -> str:
        pct = 100 * r.changed_elements / max(r.elements, 1)
        return (
            f"wrote {r.out}: {r.format} vector, {r.tensors} tensors ({r.unchanged_tensors} unchanged), "
            f"{pct:.1f}% of {r.elements:,} elements changed, {_mb(r.vector_bytes)} "
            f"({r.vector_bytes / max(r.model_bytes, 1):.2f}x the model), {'exact' if r.exact else 'lossy'}, "
            f"{r.seconds:.1f}s"
        )

    _run(debug, json_out, lambda: run(
        from_model, to_model, out, format=format.value, dtype=dtype, max_shard_size=max_shard_size,
        overwrite=overwrite, progress=not quiet,
    ), human)


class Embeddings(str, Enum):
    residual = "residual"
    lora = "lora"


@app.command()
def compress(
    vector: Annotated[Path, typer.Argument(help="A vector folder written by `rvhub extract` (sparse or dense).")],
    out: OutOpt,
    rank: Annotated[int | None, typer.Option(help="Uniform rank R for every module.")] = None,
    energy: Annotated[
        float | None,
        typer.Option(help="Per module, the smallest rank keeping this fraction of ‖ΔW‖² (0 < E ≤ 1)."),
    ] = None,
    budget: Annotated[
        int | None,
        typer.Option(help="Total LoRA parameters (Σ rank·(rows+cols)), spent where they keep the most energy."),
    ] = None,
    exact: Annotated[bool, typer.Option("--exact", help="Exact SVD (slower) instead of randomized.")] = False,
    embeddings: Annotated[
        Embeddings,
        typer.Option(help="residual: embeddings stay exact beside the adapter (servers such as vLLM load it); "
                     "lora: embed_tokens/lm_head deltas go into the LoRA (untied models only)."),
    ] = Embeddings.residual,
    dtype: Annotated[str, typer.Option(help="dtype of the LoRA factors: float32, bfloat16 or float16.")] = "float32",
    device: Annotated[str, typer.Option(help="Where the SVDs run: cpu or cuda[:N].")] = "cpu",
    base_model: Annotated[
        str | None,
        typer.Option(help="base_model_name_or_path written into adapter_config.json (the model to load the "
                     "adapter on); a Hub id also becomes the card's first recommended base. Default: the card's "
                     "first recommended base, else the `from` model's Hub id."),
    ] = None,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Compress a vector into a PEFT LoRA adapter (truncated SVD) + an exact residual, with a quality report.

    Give one rank rule: --rank, --energy or --budget.
    """
    _streaming(vector)
    from .compress import compress as run

    _run(debug, json_out, lambda: run(
        vector, out, rank=rank, energy=energy, budget=budget, exact=exact, embeddings=embeddings.value,
        dtype=dtype, device=device, base_model=base_model, overwrite=overwrite, progress=not quiet,
    ), _compress_table)


def _compress_table(r: Any) -> str:
    rep = r.report
    width = max(len(m.name) for m in rep.modules)
    lines = [f"{'module':<{width}}  {'shape':>13}  {'rank':>5}  {'energy':>8}  {'rel.err':>8}"]
    for m in rep.modules:
        shape = "x".join(map(str, m.shape))
        lines.append(f"{m.name:<{width}}  {shape:>13}  {m.rank:>5}  {m.energy:>8.4f}  {m.rel_error:>8.4f}")
    checks = "".join(
        f"\nsvd check {c.name} rank {c.rank}: randomized error {c.randomized_error:.4g} vs exact "
        f"{c.exact_error:.4g} ({100 * (c.randomized_error / c.exact_error - 1) if c.exact_error else 0:+.2f}%)"
        for c in rep.svd_checks
    )
    lines.append(
        f"\nof ‖v‖²: adapter {100 * rep.adapter_energy:.2f}%, residual {100 * rep.residual_energy:.2f}% (exact, "
        f"{len(rep.residual)} tensors), dropped {100 * rep.dropped_energy:.2f}%; total relative error "
        f"{rep.rel_error:.4f}{checks}\n"
        f"wrote {r.out}: {len(rep.modules)} LoRA modules, {rep.adapter_params:,} parameters, adapter "
        f"{_mb(rep.adapter_bytes)} + residual {_mb(rep.residual_bytes)} = "
        f"{(rep.adapter_bytes + rep.residual_bytes) / max(rep.vector_bytes, 1):.2f}x the vector "
        f"({_mb(rep.vector_bytes)}), {rep.svd} SVD, {r.seconds:.1f}s"
    )
    return "\n".join(lines)


@app.command()
def check(
    vector: Annotated[Path, typer.Argument(help="A vector folder (rvhub.json with fingerprints).")],
    base: Annotated[str, typer.Option("--base", help="The target model: folder or org/name\\[@rev].")],
    allow_vocab_mismatch: Annotated[
        bool, typer.Option("--allow-vocab-mismatch", help="Count differing embedding row counts as a warning.")
    ] = False,
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Check whether TARGET can take the vector: architecture, config, tokenizer and weight lineage.

    Each check passes, warns or fails, with its numbers. Exit code 0 when none fails, 1 otherwise. A Hub
    TARGET is read by safetensors headers and a few byte ranges, never downloaded."""
    from .compat import check as run

    def human(r: Any) -> str:
        lines = [f"{r.target}: {r.status.upper()} for {r.vector}"]
        lines += [f"  {c.status:<4}  {c.name:<12}  {c.summary}" for c in r.checks]
        return "\n".join(lines)

    _run(debug, json_out, lambda: run(vector, base, allow_vocab_mismatch=allow_vocab_mismatch), human,
         lambda r: 0 if r.ok else 1)


@app.command()
def apply(
    vector: Annotated[
        Path, typer.Argument(help="A vector folder (`rvhub extract`) or an adapter folder (`rvhub compress`).")
    ],
    base: Annotated[str, typer.Option("--base", help="The target model: folder or org/name\\[@rev].")],
    out: OutOpt,
    scale: ScaleOpt = 1.0,
    dtype: DtypeOpt = None,
    device: DeviceOpt = "cpu",
    allow_vocab_mismatch: VocabOpt = False,
    force: ForceOpt = False,
    scale_pattern: ScalePatternOpt = None,
    max_shard_size: ShardOpt = "5GB",
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Write θ_base + α·v: float32 arithmetic rounded once; config and tokenizer from the base.

    The base must first pass the compatibility check (`rvhub check`); --force skips it."""
    _streaming(vector)
    from .apply import apply as run

    _run(debug, json_out, lambda: run(
        vector, base, out, scale=scale, dtype=dtype, device=device, overwrite=overwrite,
        allow_vocab_mismatch=allow_vocab_mismatch, force=force, max_shard_size=max_shard_size, progress=not quiet,
        scale_patterns=scale_pattern,
    ), _applied)




@app.command("eval")
def eval_(
    vector: Annotated[str, typer.Argument(help="A vector or adapter folder, or a registry repo id org/name\\[@rev].")],
    base: Annotated[str, typer.Option("--base", help="The target model: folder or org/name\\[@rev].")],
    tasks: Annotated[str, typer.Option("--tasks", help="lm-eval task names, comma-separated.")],
    scale: Annotated[
        float | None, typer.Option("--scale", "-a", help="α of the ±α·v and control runs (default: the card's).")
    ] = None,
    scales: Annotated[
        str | None, typer.Option("--scales", help="Sweep α, e.g. 0.25,0.5,1,1.5: +α·v at each; best α per task.")
    ] = None,
    control: Annotated[
        str, typer.Option("--control", help="Control r with v's per-tensor norm: gaussian, permute or none.")
    ] = "gaussian",
    control_seed: Annotated[int, typer.Option("--control-seed", help="Seed of the control.")] = 0,
    no_minus: Annotated[bool, typer.Option("--no-minus", help="Skip the target − α·v run.")] = False,
    include_path: Annotated[
        Path | None, typer.Option("--include-path", help="A folder of local lm-eval task YAMLs.")
    ] = None,
    limit: Annotated[float | None, typer.Option("--limit", help="Examples per task (or a fraction < 1).")] = None,
    num_fewshot: Annotated[int | None, typer.Option("--num-fewshot", help="Few-shot examples per prompt.")] = None,
    apply_chat_template: Annotated[
        bool, typer.Option("--apply-chat-template", help="Format prompts with the target's chat template.")
    ] = False,
    batch_size: Annotated[str, typer.Option("--batch-size", help="lm-eval batch size (a number or auto).")] = "1",
    gen_kwargs: Annotated[
        str | None, typer.Option("--gen-kwargs", help="Generation arguments, e.g. temperature=0,max_gen_toks=256.")
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="lm-eval's random seeds (python, numpy, torch, few-shot).")] = 0,
    device: DeviceOpt = "cpu",
    dtype: Annotated[
        str | None, typer.Option(help="dtype to run the model in (default: the target's own).")
    ] = None,
    output_dir: Annotated[
        Path | None, typer.Option("--output-dir", help="Write the harness's results and per-sample logs here.")
    ] = None,
    no_card: Annotated[bool, typer.Option("--no-card", help="Do not write the deltas into the card.")] = False,
    allow_vocab_mismatch: VocabOpt = False,
    force: ForceOpt = False,
    registry: RegistryOpt = None,
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Measure what the vector does: lm-eval on the target, +α·v, −α·v and a random control, in memory.

    One model load, no merged model on disk; paired tests say which differences are distinguishable from
    noise. The deltas go into the card (rvhub.json, README.md; a sweep's plot into eval.png). Needs
    `pip install 'rvhub\\[eval]'`."""
    from .eval import evaluate_vector, noise_table

    def human(r: Any) -> str:
        from .card import BenchmarkDelta

        lines = [f"{'run':<14} {'task':<20} {'metric':<22} {'score':>8} {'stderr':>8} {'n':>6}"]
        for row in r.runs:
            err = f"{row['stderr']:.4f}" if row["stderr"] is not None else "–"
            lines.append(f"{row['run']:<14} {row['task'][:20]:<20} {row['metric'][:22]:<22} {row['score']:>8.4f} "
                         f"{err:>8} {row['n'] if row['n'] is not None else '–':>6}")
        lines += ["", *noise_table([BenchmarkDelta.model_validate(d) for d in r.deltas])]
        lines += [f"best α for {k}: {v:g}" for k, v in r.best_scales.items()]
        lines.append(("card updated: " + r.vector) if r.card_written else "card not written")
        if r.plot:
            lines.append(f"plot: {r.plot}")
        lines += r.notes
        return "\n".join(lines) + f"\n{r.seconds:.1f}s"

    bs: int | str = int(batch_size) if batch_size.isdigit() else batch_size
    _run(debug, json_out, lambda: evaluate_vector(
        vector, base, tasks.split(","), scale=scale, scales=scales, control=control, control_seed=control_seed,
        minus=not no_minus, include_path=include_path, limit=limit, num_fewshot=num_fewshot,
        apply_chat_template=apply_chat_template, batch_size=bs, gen_kwargs=gen_kwargs, seed=seed, device=device,
        dtype=dtype, force=force, allow_vocab_mismatch=allow_vocab_mismatch, registry=registry,
        output_dir=output_dir, write_card=not no_card, progress=not quiet,
    ), human)


def _applied(r: Any) -> str:
    skipped = "".join(f"; {n}: {k} vocab row(s) without delta" for n, k in r.skipped_vocab_rows.items())
    alphas = sorted({a for a in r.scales.values()} - {r.scale})
    per = f" (by --scale-pattern also α={', '.join(f'{a:g}' for a in alphas)})" if alphas else ""
    return (
        f"wrote {r.out}: α={r.scale:g}{per}, {r.tensors_changed} tensors changed, {r.tensors_copied} copied, "
        f"{_mb(r.output_bytes)}, {r.seconds:.1f}s on {r.device}{skipped}"
    )


class CombineMethod(str, Enum):
    sum = "sum"
    ties = "ties"
    dare = "dare"


@app.command()
def combine(
    vectors: Annotated[
        list[str], typer.Argument(help="Vector folders or registry repo ids (org/name\\[@rev], pulled and verified).")
    ],
    out: OutOpt,
    weights: Annotated[
        str | None, typer.Option(help="One weight per vector, comma-separated, e.g. 1,0.5 (default: all 1).")
    ] = None,
    method: Annotated[
        CombineMethod,
        typer.Option(help="sum: Σ wᵢ·vᵢ; ties: trim to --density, elect signs, disjoint mean; dare: drop with "
                     "probability 1 − D, rescale by 1/D, sum."),
    ] = CombineMethod.sum,
    density: Annotated[
        float | None, typer.Option(help="ties/dare: the fraction of elements kept, 0 < D ≤ 1.")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="dare: the random seed (default 0).")] = None,
    scale: Annotated[float, typer.Option("--scale", "-a", help="α multiplying the result (default 1).")] = 1.0,
    scale_pattern: ScalePatternOpt = None,
    force: Annotated[
        bool, typer.Option("--force", help="Combine even if the inputs' `from` fingerprints differ.")
    ] = False,
    registry: RegistryOpt = None,
    max_shard_size: ShardOpt = "2GB",
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Combine vectors into a new (sparse, exact float32) vector folder whose card records its provenance.

    A single vector with --weights -1 is its negation."""
    _streaming(*vectors)
    from .algebra import combine as run

    def human(r: Any) -> str:
        pct = 100 * r.changed_elements / max(r.elements, 1)
        return (
            f"wrote {r.out}: {r.method} of {len(r.inputs)} vector(s), weights {','.join(f'{w:g}' for w in r.weights)}"
            f", {r.tensors} tensors ({r.unchanged_tensors} unchanged), {pct:.1f}% of {r.elements:,} elements "
            f"nonzero, {r.fixups:,} fix-ups, {_mb(r.vector_bytes)}, {r.seconds:.1f}s"
        )

    _run(debug, json_out, lambda: run(
        vectors, out, weights=weights, method=method.value, density=density, seed=seed, scale=scale,
        scale_patterns=scale_pattern, force=force, overwrite=overwrite, registry=registry,
        max_shard_size=max_shard_size, progress=not quiet,
    ), human)


@app.command()
def inspect(
    vector: Annotated[Path, typer.Argument(help="A vector or adapter folder.")],
    other: Annotated[Path | None, typer.Argument(help="A second vector to compare with.")] = None,
    from_model: Annotated[
        str | None,
        typer.Option("--from", help="The `from` model (folder), for ‖v‖/‖θ_from‖ per layer (default: the card's "
                     "local `from` folder, when it still exists)."),
    ] = None,
    plot: Annotated[Path | None, typer.Option(help="Write a per-layer plot to this PNG (needs rvhub[plot]).")] = None,
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Norms per layer and module type, changed fraction, LoRA spectrum; with a second vector, cosine, norm
    ratio, sign agreement and support overlap per tensor and layer."""
    _streaming(vector, other)
    from .inspect import inspect_vector, render

    _run(debug, json_out, lambda: inspect_vector(vector, other, from_model=from_model, plot=plot), render)


@app.command()
def card(
    vector: Annotated[Path, typer.Argument(help="A vector or adapter folder.")],
    license: Annotated[str | None, typer.Option(help="Hub license id, e.g. apache-2.0.")] = None,
    scale: Annotated[float | None, typer.Option("--scale", help="Recommended α.")] = None,
    base_model: Annotated[
        list[str] | None,
        typer.Option("--base-model", help="A recommended base (Hub id); repeat for several. On an adapter folder "
                     "the first also becomes adapter_config.json's base_model_name_or_path."),
    ] = None,
    benchmark: Annotated[str | None, typer.Option(help="Set a delta by hand: task name, e.g. gsm8k.")] = None,
    metric: Annotated[str | None, typer.Option(help="Metric of --benchmark, e.g. exact_match.")] = None,
    target: Annotated[str | None, typer.Option(help="The model evaluated for --benchmark.")] = None,
    score_target: Annotated[float | None, typer.Option(help="Score of the target alone.")] = None,
    score_plus: Annotated[float | None, typer.Option(help="Score of target + α·v.")] = None,
    score_minus: Annotated[float | None, typer.Option(help="Score of target − α·v.")] = None,
    score_control: Annotated[
        float | None, typer.Option(help="Score of target + α·r, r a random vector with the norm of v.")
    ] = None,
    n: Annotated[int | None, typer.Option("--n", help="Number of evaluated examples.")] = None,
    num_fewshot: Annotated[int | None, typer.Option(help="Few-shot examples per prompt.")] = None,
    chat_template: Annotated[
        bool | None, typer.Option("--chat-template/--no-chat-template", help="Whether a chat template was applied.")
    ] = None,
    prompt: Annotated[str | None, typer.Option(help="The prompt template used.")] = None,
    delta_scale: Annotated[
        float | None, typer.Option(help="α of the ±v runs (default: the recommended scale).")
    ] = None,
    lm_eval_target: Annotated[
        Path | None, typer.Option(help="lm-evaluation-harness results JSON of the target alone.")
    ] = None,
    lm_eval_plus: Annotated[
        Path | None, typer.Option(help="lm-evaluation-harness results JSON of target + α·v.")
    ] = None,
    lm_eval_minus: Annotated[
        Path | None, typer.Option(help="lm-evaluation-harness results JSON of target − α·v.")
    ] = None,
    lm_eval_control: Annotated[
        Path | None, typer.Option(help="lm-evaluation-harness results JSON of target + a random vector of v's norm.")
    ] = None,
    task: Annotated[list[str] | None, typer.Option(help="Import only this lm-eval task; repeat for several.")] = None,
    clear_benchmarks: Annotated[bool, typer.Option(help="Drop the recorded deltas first.")] = False,
    render: Annotated[bool, typer.Option(help="Re-render README.md even without edits.")] = False,
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Show a vector's card; set its license, recommended scale and bases and benchmark deltas (by hand or
    from lm-evaluation-harness results), and re-render README.md from it."""
    from .benchmarks import edit_card

    delta = None
    if benchmark is not None or score_plus is not None:
        harness = {"num_fewshot": num_fewshot, "chat_template": chat_template, "prompt": prompt}
        delta = {"benchmark": benchmark, "metric": metric, "target": target, "n": n,
                 "harness": {k: v for k, v in harness.items() if v is not None},
                 "scores": {"target": score_target, "plus": score_plus, "minus": score_minus,
                            "control": score_control}}
    lm_eval = {"target": lm_eval_target, "plus": lm_eval_plus, "minus": lm_eval_minus, "control": lm_eval_control}

    def human(c: Any) -> str:
        from ._readme import describe

        return describe(c, str(vector))

    _run(debug, json_out, lambda: edit_card(
        vector, license=license, recommended_scale=scale, recommended_bases=base_model, delta=delta,
        lm_eval=lm_eval if any(v is not None for v in lm_eval.values()) else None, lm_eval_tasks=task or (),
        delta_scale=delta_scale, clear_benchmarks=clear_benchmarks, render=render,
    ), human)


@app.command()
def push(
    vector: Annotated[Path, typer.Argument(help="A vector folder (rvhub.json and the files it lists).")],
    repo_id: Annotated[str, typer.Argument(help="Where to publish it: org/name (created if needed).")],
    private: Annotated[bool, typer.Option("--private", help="Create the repo private (a new repo only).")] = False,
    revision: Annotated[
        str | None, typer.Option("--revision", help="Branch to commit to (created from main if needed).")
    ] = None,
    message: Annotated[str | None, typer.Option("--message", "-m", help="Commit message.")] = None,
    keep_local_paths: Annotated[bool, typer.Option(
        "--keep-local-paths", help="Publish local model paths in full (default: the folder name and content hash)."
    )] = False,
    registry: RegistryOpt = None,
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Publish a vector in one commit (card and sha256 checked first); an identical push makes no commit.

    The Hub token comes from HF_TOKEN or `hf auth login`; it is never printed."""
    from .registry import push as run

    def human(r: Any) -> str:
        where = f"{r.repo_id}@{r.branch}"
        scrubbed = (f"\nlocal paths published as folder name + content hash only ({', '.join(r.scrubbed)}); "
                    "--keep-local-paths keeps them") if r.scrubbed else ""
        if not r.committed:
            return f"{where} already holds this vector (commit {r.commit[:12]}): no new commit{scrubbed}"
        deleted = f", removed {len(r.deleted)} stale" if r.deleted else ""
        return (f"pushed {where}: commit {r.commit[:12]}, {len(r.uploaded)} of {len(r.files)} files uploaded"
                f"{deleted}{scrubbed}")

    _run(debug, json_out, lambda: run(
        vector, repo_id, registry=registry, private=private, revision=revision, message=message, progress=not quiet,
        keep_local_paths=keep_local_paths,
    ), human)


@app.command()
def pull(
    ref: Annotated[str, typer.Argument(help="org/name or org/name@revision (a branch or a commit hash).")],
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", "-o",
            help="Where the result goes: a copy of the vector, or with --apply the merged model. Without it "
            "(and without --apply) the vector stays in the cache and its path is printed.",
        ),
    ] = None,
    apply_: Annotated[bool, typer.Option("--apply", help="Apply the vector to --base and write -o OUT.")] = False,
    base: Annotated[
        str | None, typer.Option("--base", help="With --apply: the target model, folder or org/name\\[@rev].")
    ] = None,
    scale: Annotated[float | None, typer.Option("--scale", "-a", help="With --apply: α (default 1).")] = None,
    dtype: DtypeOpt = None,
    device: Annotated[str | None, typer.Option(help="With --apply: cpu (default) or cuda[:N].")] = None,
    allow_vocab_mismatch: VocabOpt = False,
    scale_pattern: ScalePatternOpt = None,
    max_shard_size: ShardOpt = "5GB",
    overwrite: OverwriteOpt = False,
    registry: RegistryOpt = None,
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Download a vector (only its files), verify every sha256 against its card; optionally apply it."""
    from .errors import InvalidOptionError
    from .registry import pull as run
    from .registry import pull_apply

    def human(r: Any) -> str:
        line = f"pulled {r.repo_id}@{r.commit[:12]}: {len(r.files)} files, {_mb(r.bytes)}, sha256 verified → {r.path}"
        return line + ("\n" + _applied(r.applied) if r.applied else "")

    def call() -> Any:
        if apply_:
            if base is None or out is None:
                raise InvalidOptionError("--apply", True, "needs --base TARGET and -o OUT")
            return pull_apply(
                ref, base, out, registry=registry, scale=1.0 if scale is None else scale, dtype=dtype,
                device=device or "cpu", overwrite=overwrite, allow_vocab_mismatch=allow_vocab_mismatch,
                max_shard_size=max_shard_size, progress=not quiet, scale_patterns=scale_pattern,
            )
        given = [o for o, v in (("--base", base), ("--scale", scale), ("--dtype", dtype), ("--device", device))
                 if v is not None] + (["--allow-vocab-mismatch"] if allow_vocab_mismatch else []) + (
                 ["--scale-pattern"] if scale_pattern else [])
        if given:
            raise InvalidOptionError(given[0], "without --apply", "add --apply (and -o OUT for the merged model)")
        return run(ref, registry=registry, out=out, overwrite=overwrite, progress=not quiet)

    _run(debug, json_out, call, human)


@app.command()
def mirror(
    source: Annotated[str, typer.Argument(
        help="What to copy: \\[REGISTRY::]org/name\\[@rev]. REGISTRY is `hub` or a registry folder; without it, "
        "$RVHUB_REGISTRY if set, else the Hub. rev: a branch or a commit (default main).", show_default=False)],
    destination: Annotated[str, typer.Argument(
        help="Where to: \\[REGISTRY::]org/name\\[@branch] (created if needed; branch default main).",
        show_default=False)],
    private: Annotated[bool, typer.Option("--private", help="Create DST's repo private (a new repo only).")] = False,
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Copy a vector revision between registries (Hub → folder, folder → Hub, folder → folder), every file
    checked against the card before DST is written; same card, same commit message; a repeat makes no commit.

    E.g. `rvhub mirror user/vec /srv/rv::user/vec`, `rvhub mirror /srv/rv::user/vec@dev hub::org/vec`."""
    from .mirror import mirror as run

    def human(r: Any) -> str:
        src = f"{r.source} @ {r.source_commit[:12]} ({r.source_registry})"
        dst = f"{r.repo_id}@{r.branch} ({r.registry})"
        if not r.committed:
            return f"{dst} already holds {src} (commit {r.commit[:12]}): no change"
        return (f"mirrored {src} → {dst}: commit {r.commit[:12]}, {len(r.files)} files ({_mb(r.bytes)}), sha256 "
                f"verified, {len(r.uploaded)} uploaded")

    _run(debug, json_out, lambda: run(source, destination, private=private, progress=not quiet), human)


@app.command()
def info(
    ref: Annotated[str, typer.Argument(help="org/name or org/name@revision.")],
    registry: RegistryOpt = None,
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Show a vector's card (reads rvhub.json only): sources, form and quality, files."""
    from .registry import info as run

    _run(debug, json_out, lambda: run(ref, registry=registry), lambda r: "\n".join(r.describe()))


@app.command()
def search(
    query: Annotated[str | None, typer.Option("--query", help="Text the repo id must contain.")] = None,
    base: Annotated[
        str | None,
        typer.Option("--base", help="Only vectors that fit this target (folder or org/name; headers only)."),
    ] = None,
    limit: Annotated[int, typer.Option("--limit", help="Limit the number of results.")] = 50,
    sort: Annotated[
        SortChoice | None, typer.Option("--sort", help="Sort results, largest or newest first (as `hf models ls`).")
    ] = None,
    include_untagged: Annotated[bool, typer.Option(
        "--include-untagged", help="With --base: also read, card by card, vectors pushed without fit tags (slow)."
    )] = False,
    registry: RegistryOpt = None,
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """List vector repos (on the Hub: models tagged reasoning-vector); with --base, those a target can take,
    found by its shape tag in one listing."""
    from .registry import search as run

    def human(r: Any) -> str:
        if not r.hits:
            lines = [f"no vectors found in {r.registry}"]
        else:
            lines = [f"{len(r.hits)} vector(s) in {r.registry}:"]
        for h in r.hits:
            commit = f"@{h.commit[:12]}" if h.commit else ""
            lines.append(f"  {h.repo_id}{commit}" + (f"  fits: {h.fit.reason}" if h.fit else ""))
        if r.rejected:
            lines.append(f"{len(r.rejected)} more do not fit {r.base}:" if r.base else f"{len(r.rejected)} skipped:")
            lines += [f"  {h.repo_id}: {h.fit.reason}" for h in r.rejected]
        if r.base is not None and r.untagged_read is None:
            lines.append(f"searched the vectors tagged {r.shape_tag}; vectors pushed without fit tags were skipped "
                         "(--include-untagged reads them card by card)")
        elif r.base is not None:
            lines.append(f"also read {r.untagged_read} untagged vector(s) card by card; skipped "
                         f"{r.other_shapes_skipped} tagged with another shape, unread")
        return "\n".join(lines)

    _run(debug, json_out, lambda: run(query, base, registry=registry, limit=limit,
                                      sort=sort.value if sort else None, include_untagged=include_untagged), human)


@app.command()
def version() -> None:
    """Print the rvhub version."""
    typer.echo(__version__)


def main() -> None:
    """The ``rvhub`` console script: run the command, then leave without the interpreter's teardown.

    Tearing down torch and the other imported modules takes ~0.5 s on a 2-core machine (measured: 1.85 s vs
    1.3 s for a process that only imports them) and does nothing a finished command needs: its outputs are
    fsynced and renamed and its threads joined before it returns. So the streams are flushed and the process
    exits at once, unless coverage (which saves its data at exit) is running.
    """
    try:
        app()
        code = 0
    except SystemExit as e:
        code = _exit_code(e.code)
    if "coverage" in sys.modules:
        sys.exit(code)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`rvhub search | head`): nothing more can be said
            pass
    os._exit(code)


def _exit_code(code: object) -> int:
    """The exit status ``sys.exit(code)`` would give, printing a message code as Python does."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


if __name__ == "__main__":
    main()
