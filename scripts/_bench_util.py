"""Shared helpers for the rvhub benchmarks: synthetic Qwen2 checkpoints, measured subprocesses, reports.

Only the standard library is imported at module level; torch, safetensors and transformers are imported
inside the functions that need them, so that importing this module stays cheap.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
ROLES = ("sft", "rl", "target")
RECIPE_VERSION = 2  # bump when the synthetic weights change, to invalidate cached models
CHANGED_FRACTION = 0.2  # share of RL elements that differ from SFT
LARGE_MOVE = 0.05  # "large" deltas: moved elements get N(0, 5% of the tensor's rms)
DELTAS = {
    "small": "RL = SFT with ~20% of elements moved by 1–3 bf16 ulps",
    "large": "RL = SFT with 20% of elements moved by N(0, 5% of the tensor's rms) in float32, rounded to bf16 "
             "(small elements change sign; many deltas need float32 fix-ups)",
}
TARGET_NOISE_STD = 0.002
INIT_STD = 0.02
MIB = 1024 * 1024
QWEN_EOS_ID = 151643
MAX_OTHER_CORES = 0.1  # a rep during which other processes used more CPU than this is run again (up to 2×reps tries)

# Runs the measured command as its own child and reports the child's wall time and peak RSS. A lean
# launcher is needed because Linux carries the forking process's peak RSS into its child's ru_maxrss
# (the pre-exec address space counts), so a benchmark process holding gigabytes would inflate every
# measurement. This launcher's own footprint (~11 MB) is the lowest RSS any measurement can show.
_LAUNCHER = """
import json, os, subprocess, sys, time
log, cmd = sys.argv[1], sys.argv[2:]
with open(log, "wb") as out:
    start = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
code = os.waitstatus_to_exitcode(status)
print(json.dumps({"wall_s": wall, "maxrss_kib": usage.ru_maxrss, "status": code}))
"""


@dataclass(frozen=True)
class Shape:
    """Dimensions of a Qwen2-architecture decoder (tied embeddings, biases on q/k/v)."""

    name: str
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    max_positions: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def tensor_specs(self) -> list[tuple[str, tuple[int, ...]]]:
        """Names and shapes in Qwen2ForCausalLM's state-dict order, without the tied lm_head."""
        kv = self.kv_heads * self.head_dim
        specs: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (self.vocab, self.hidden))]
        for i in range(self.layers):
            p = f"model.layers.{i}."
            specs += [
                (p + "self_attn.q_proj.weight", (self.hidden, self.hidden)),
                (p + "self_attn.q_proj.bias", (self.hidden,)),
                (p + "self_attn.k_proj.weight", (kv, self.hidden)),
                (p + "self_attn.k_proj.bias", (kv,)),
                (p + "self_attn.v_proj.weight", (kv, self.hidden)),
                (p + "self_attn.v_proj.bias", (kv,)),
                (p + "self_attn.o_proj.weight", (self.hidden, self.hidden)),
                (p + "mlp.gate_proj.weight", (self.intermediate, self.hidden)),
                (p + "mlp.up_proj.weight", (self.intermediate, self.hidden)),
                (p + "mlp.down_proj.weight", (self.hidden, self.intermediate)),
                (p + "input_layernorm.weight", (self.hidden,)),
                (p + "post_attention_layernorm.weight", (self.hidden,)),
            ]
        specs.append(("model.norm.weight", (self.hidden,)))
        return specs

    def n_params(self) -> int:
        return sum(math.prod(dims) for _, dims in self.tensor_specs())


SHAPES = {
    "tiny": Shape("tiny", vocab=512, hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2,
                  max_positions=2048),
    "0.5b": Shape("0.5b", vocab=151936, hidden=896, intermediate=4864, layers=24, heads=14, kv_heads=2,
                  max_positions=32768),
    "1.5b": Shape("1.5b", vocab=151936, hidden=1536, intermediate=8960, layers=28, heads=12, kv_heads=2,
                  max_positions=131072),
    "3b": Shape("3b", vocab=151936, hidden=2048, intermediate=11008, layers=36, heads=16, kv_heads=2,
                max_positions=32768),
}


@dataclass(frozen=True)
class Trio:
    """Folders of the three synthetic checkpoints of one shape."""

    sft: Path
    rl: Path
    target: Path


# --------------------------------------------------------------------------- synthetic checkpoints


def _generator(seed: int) -> torch.Generator:
    import torch

    return torch.Generator().manual_seed(seed)


def _sft_tensor(name: str, dims: tuple[int, ...], seed: int) -> torch.Tensor:
    """N(0, 0.02) weights; RMSNorm weights are centred on 1 as in a trained model."""
    import torch

    values = torch.randn(dims, generator=_generator(seed)) * INIT_STD
    if name.endswith("norm.weight"):
        values += 1.0
    return values.to(torch.bfloat16)


def _rl_tensor(sft: torch.Tensor, seed: int) -> torch.Tensor:
    """SFT with ~20% of elements moved by 1-3 bf16 ulps (a nonzero step added to the bit pattern)."""
    import torch

    g = _generator(seed)
    n = sft.numel()
    bits = sft.reshape(-1).view(torch.int16)
    changed = torch.rand(n, generator=g) < CHANGED_FRACTION
    changed &= (bits & 0x7FFF) >= 3  # leave (near-)zeros alone: a step past ±0 would wrap to a NaN pattern
    steps = torch.randint(1, 4, (n,), generator=g, dtype=torch.int16)
    steps *= torch.randint(0, 2, (n,), generator=g, dtype=torch.int16) * 2 - 1
    bits = bits + steps * changed
    rl = bits.view(torch.bfloat16).reshape(sft.shape)
    if not torch.isfinite(rl).all():
        raise RuntimeError("perturbing the bit patterns produced a non-finite value")
    return rl


def _rl_tensor_large(sft: torch.Tensor, seed: int) -> torch.Tensor:
    """SFT with 20% of elements moved by N(0, LARGE_MOVE·rms of the tensor), rounded once to bf16."""
    import torch

    g = _generator(seed)
    flat = sft.reshape(-1).float()
    changed = torch.rand(flat.numel(), generator=g) < CHANGED_FRACTION
    rms = float(flat.square().mean().sqrt())
    moved = flat + changed * (torch.randn(flat.numel(), generator=g) * (LARGE_MOVE * rms))
    return moved.to(torch.bfloat16).reshape(sft.shape)


def _target_tensor(sft: torch.Tensor, seed: int) -> torch.Tensor:
    """SFT plus N(0, 0.002) noise on every element, rounded to bf16."""
    import torch

    noise = torch.randn(sft.shape, generator=_generator(seed)) * TARGET_NOISE_STD
    return (sft.float() + noise).to(torch.bfloat16)


def _write_hf_folder(folder: Path, shape: Shape, tensors: dict[str, torch.Tensor]) -> None:
    """Write config.json, generation_config.json and model.safetensors in the Hugging Face layout."""
    import transformers
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    special = min(QWEN_EOS_ID, shape.vocab - 1)  # Qwen2.5's <|endoftext|>, kept inside a tiny vocabulary
    transformers.Qwen2Config(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=shape.max_positions,
        max_window_layers=shape.layers,
        rope_theta=1e6,
        rms_norm_eps=1e-6,
        hidden_act="silu",
        tie_word_embeddings=True,
        use_sliding_window=False,
        bos_token_id=special,
        eos_token_id=special,
        dtype="bfloat16",
        architectures=["Qwen2ForCausalLM"],
    ).save_pretrained(folder)
    transformers.GenerationConfig(
        bos_token_id=special, eos_token_id=special, do_sample=False, max_new_tokens=2048
    ).save_pretrained(folder)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def build_trio(shape: Shape, models_dir: Path, seed: int = 0, deltas: str = "small") -> Trio:
    """Build (or reuse from models_dir/<shape>) the SFT, RL and TARGET checkpoints of a shape, with RL's
    deltas of the regime ``deltas`` (one of DELTAS).

    Models are written one at a time (peak memory ~2 models) into a scratch folder that is renamed into
    place only when complete, so an interrupted build is never mistaken for a cached one.
    """
    final = models_dir / shape.name
    trio = Trio(*(final / role for role in ROLES))
    stamp = final / "recipe.json"
    recipe = {"version": RECIPE_VERSION, "seed": seed, "shape": shape.__dict__}
    if deltas != "small":  # the small regime keeps the recipe (and the cache) it always had
        recipe["deltas"] = deltas
    rl_tensor = {"small": _rl_tensor, "large": _rl_tensor_large}[deltas]
    if stamp.is_file() and json.loads(stamp.read_text()) == recipe:
        return trio
    scratch = models_dir / f"{shape.name}.partial"
    remove(scratch)
    remove(final)
    specs = shape.tensor_specs()
    seeds = [seed * 1_000_003 + 3 * i for i in range(len(specs))]  # one stream per tensor and role
    sft = {name: _sft_tensor(name, dims, s) for (name, dims), s in zip(specs, seeds, strict=True)}
    _write_hf_folder(scratch / "sft", shape, sft)
    rl = {name: rl_tensor(sft[name], s + 1) for (name, _), s in zip(specs, seeds, strict=True)}
    _write_hf_folder(scratch / "rl", shape, rl)
    del rl
    target = {name: _target_tensor(sft[name], s + 2) for (name, _), s in zip(specs, seeds, strict=True)}
    _write_hf_folder(scratch / "target", shape, target)
    (scratch / "recipe.json").write_text(json.dumps(recipe))
    scratch.rename(final)
    return trio


# --------------------------------------------------------------------------- files


def safetensors_files(path: Path) -> list[Path]:
    """The *.safetensors files of a folder (recursively), or the path itself if it is a file."""
    return [path] if path.is_file() else sorted(path.rglob("*.safetensors"))


def tree_size(path: Path) -> int:
    """Total apparent size in bytes of every file under path."""
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def warm_page_cache(paths: Iterable[Path]) -> None:
    """Read every file under the given paths once, so timed runs start from a warm page cache."""
    buf = bytearray(64 * MIB)
    for root in paths:
        for f in [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()):
            with open(f, "rb", buffering=0) as fh:
                while fh.readinto(buf):
                    pass


def remove(path: Path) -> None:
    """Delete a file or folder if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


# --------------------------------------------------------------------------- measured subprocesses


@dataclass(frozen=True)
class Measurement:
    """Wall time (median over reps) and peak RSS (max over reps) of one benchmarked command."""

    wall_s: float
    peak_rss_mb: float

    @staticmethod
    def combine(parts: Sequence[Measurement]) -> Measurement:
        """Steps run one after the other: times add up, peak RSS is the largest."""
        return Measurement(sum(p.wall_s for p in parts), max(p.peak_rss_mb for p in parts))


def child_env() -> dict[str, str]:
    """Environment for benchmarked commands: CPU only, no network access attempts."""
    env = dict(os.environ)
    env.update(CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_HUB_DISABLE_TELEMETRY="1", TOKENIZERS_PARALLELISM="false")
    return env


def run_once(cmd: Sequence[str], log: Path) -> Measurement:
    """Run cmd as a separate process (output to log); return its wall time and peak RSS."""
    log.parent.mkdir(parents=True, exist_ok=True)
    launcher = [sys.executable, "-S", "-c", _LAUNCHER, str(log), *map(str, cmd)]
    res = subprocess.run(launcher, capture_output=True, text=True, env=child_env(), check=True)
    stats: dict[str, Any] = json.loads(res.stdout)
    if stats["status"] != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-30:])
        raise RuntimeError(f"exit code {stats['status']} from {' '.join(map(str, cmd))}\n{tail}")
    return Measurement(stats["wall_s"], stats["maxrss_kib"] * 1024 / 1e6)


def measure(cmd: Sequence[str], log: Path, reps: int, inputs: Sequence[Path], outputs: Sequence[Path]
            ) -> Measurement:
    """Run cmd reps times, each from a warm page cache, clean outputs and flushed dirty pages."""
    runs = []
    for _ in range(reps):
        for out in outputs:
            remove(out)
        os.sync()
        warm_page_cache(inputs)
        runs.append(run_once(cmd, log))
        os.sync()
    return Measurement(statistics.median(r.wall_s for r in runs), max(r.peak_rss_mb for r in runs))


def cpu_seconds() -> tuple[float, float]:
    """(CPU seconds the whole machine has been busy since boot, CPU seconds used by this process and by its
    descendants that have been waited for). Their differences over an interval, subtracted, give the CPU
    time that other processes took from a measurement."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    t = os.times()
    busy = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    return busy, t.user + t.system + t.children_user + t.children_system


def wait_for_idle(max_wait_s: float, threshold_cores: float = 0.25, window_s: float = 2.0) -> float:
    """Wait (at most max_wait_s) until other processes use less than threshold_cores over a window_s sample;
    return the seconds waited. On a shared machine this keeps a measurement from starting under someone
    else's load (OpenMP threads slow down badly when they share cores)."""
    start = time.monotonic()
    while True:
        busy0, own0 = cpu_seconds()
        time.sleep(window_s)
        busy1, own1 = cpu_seconds()
        waited = time.monotonic() - start
        if (busy1 - busy0) - (own1 - own0) < threshold_cores * window_s or waited >= max_wait_s:
            return waited
        time.sleep(3.0)


class Rep(NamedTuple):
    """One timed run: its wall time and peak RSS, the CPU other processes used meanwhile (in cores), and
    how long it waited for an idle machine first."""

    wall_s: float
    peak_rss_mb: float
    other_cores: float
    waited_s: float


@dataclass
class QuietRuns:
    """The kept reps of a step, and the (wall s, other cores) of those discarded because the machine was busy."""

    reps: list[Rep]
    discarded: list[tuple[float, float]]

    @property
    def measurement(self) -> Measurement:
        return Measurement(statistics.median(r.wall_s for r in self.reps), max(r.peak_rss_mb for r in self.reps))


def measure_quiet(cmd: Sequence[str], log: Path, reps: int, inputs: Sequence[Path], outputs: Sequence[Path],
                  idle_wait: float, label: str) -> QuietRuns:
    """Run cmd ``reps`` times as :func:`measure` does, each after waiting (up to ``idle_wait`` s) for an
    idle machine; a rep during which other processes used more than MAX_OTHER_CORES is run again (at most
    2×reps tries in all)."""
    kept: list[Rep] = []
    discarded: list[tuple[float, float]] = []
    tries = 0
    while len(kept) < reps:
        tries += 1
        waited = wait_for_idle(idle_wait) if idle_wait > 0 else 0.0
        busy0, own0 = cpu_seconds()
        one = measure(cmd, log, 1, inputs, outputs)
        busy1, own1 = cpu_seconds()
        other = max(0.0, (busy1 - busy0) - (own1 - own0)) / one.wall_s
        contended = other > MAX_OTHER_CORES and tries <= 2 * reps
        print(f"{label}   {one.wall_s:.2f} s, {one.peak_rss_mb:,.0f} MB, other processes {other:.2f} cores,"
              f" waited {waited:.0f} s for an idle machine" + (" -> discarded, run again" if contended else ""),
              flush=True)
        if contended:
            discarded.append((one.wall_s, other))
        else:
            kept.append(Rep(one.wall_s, one.peak_rss_mb, other, waited))
    return QuietRuns(kept, discarded)


def quiet_note(runs: Mapping[str, QuietRuns], idle_wait: float) -> str:
    """How the reps were kept quiet, for a report: the idle wait, the discard rule, and the reps discarded,
    under each step's label (the keys of ``runs``)."""
    waited = sum(r.waited_s for q in runs.values() for r in q.reps)
    dropped = "; ".join(f"{label} " + ", ".join(f"{w:.2f} s ({o:.2f} cores)" for w, o in q.discarded)
                        for label, q in runs.items() if q.discarded)
    return ("\"other processes, cores\": CPU time used by processes other than the measured one during each rep"
            " (from /proc/stat, less this script's and its children's CPU time), divided by the rep's wall time;"
            " near 0 means the rep had the machine to itself. Before each rep the script waits (up to"
            f" {idle_wait:.0f} s) for a 2 s window with other processes under 0.25 cores; it waited {waited:.0f} s"
            f" in all. A rep during which other processes used more than {MAX_OTHER_CORES} cores is discarded and"
            " run again" + (f": {dropped}" if dropped else " (none was)"))


# --------------------------------------------------------------------------- output comparison


@dataclass(frozen=True)
class Comparison:
    """Tensor-by-tensor comparison of two checkpoints."""

    identical: bool
    n_diff: int
    n_total: int
    max_abs_diff: float
    mismatched_names: tuple[str, ...]

    def describe(self) -> str:
        if self.identical:
            return "bit-identical"
        text = (f"differ: {self.n_diff:,} of {self.n_total:,} elements "
                f"({100 * self.n_diff / max(self.n_total, 1):.4f}%), max |diff| {self.max_abs_diff:.3g}")
        if self.mismatched_names:
            text += f"; tensors missing on one side or of another shape/dtype: {len(self.mismatched_names)}"
        return text


def _tensor_index(path: Path) -> dict[str, Path]:
    from safetensors import safe_open

    index: dict[str, Path] = {}
    for f in safetensors_files(path):
        with safe_open(str(f), framework="pt") as h:
            index.update(dict.fromkeys(h.keys(), f))
    return index


def _iter_pairs(a: Path, b: Path) -> Iterator[tuple[str, torch.Tensor | None, torch.Tensor | None]]:
    """Yield (name, tensor from a, tensor from b) over the union of names, one tensor at a time."""
    from safetensors import safe_open

    ia, ib = _tensor_index(a), _tensor_index(b)
    for name in sorted(ia.keys() | ib.keys()):
        ta = tb = None
        if name in ia:
            with safe_open(str(ia[name]), framework="pt") as h:
                ta = h.get_tensor(name)
        if name in ib:
            with safe_open(str(ib[name]), framework="pt") as h:
                tb = h.get_tensor(name)
        yield name, ta, tb


def compare_checkpoints(a: Path, b: Path) -> Comparison:
    """Compare two checkpoints bit for bit; count differing elements and the largest |a - b|."""
    import torch

    n_diff = n_total = 0
    max_abs = 0.0
    mismatched: list[str] = []
    for name, ta, tb in _iter_pairs(a, b):
        if ta is None or tb is None or ta.shape != tb.shape or ta.dtype != tb.dtype:
            mismatched.append(name)
            continue
        n_total += ta.numel()
        if ta.element_size() == 2:
            differs = ta.view(torch.int16) != tb.view(torch.int16)
        else:
            differs = ta != tb
        count = int(differs.sum())
        if count:
            n_diff += count
            max_abs = max(max_abs, float((ta.float() - tb.float()).abs().max()))
    return Comparison(not n_diff and not mismatched, n_diff, n_total, max_abs, tuple(mismatched))


# --------------------------------------------------------------------------- environment and report


def machine_info() -> dict[str, str]:
    """Cores, RAM and CPU model of this machine."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "unknown")
    mem_kib = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal:"))
    return {"cores": str(len(os.sched_getaffinity(0))), "ram": f"{mem_kib / MIB:.1f} GiB", "cpu": cpu,
            "os": platform.platform(), "python": platform.python_version()}


def package_version(name: str, python: Path | str | None = None) -> str:
    """Installed version of a package, in this interpreter or in another one."""
    if python is None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"
    code = f"import importlib.metadata as m; print(m.version({name!r}))"
    res = subprocess.run([str(python), "-c", code], capture_output=True, text=True)
    return res.stdout.strip() if res.returncode == 0 else "not installed"


def git_state() -> str:
    """Commit of the repository, marked when the working tree has uncommitted changes."""
    def git(*args: str) -> str:
        res = subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True)
        return res.stdout.strip() if res.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown commit"
    return commit + (" + uncommitted changes" if git("status", "--porcelain") else "")


def md_table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A Markdown table, numeric-looking columns right-aligned."""
    body = [list(r) for r in rows]
    align = ["---:" if i and all(_numeric(r[i]) for r in body) else "---" for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines)


def _numeric(cell: str) -> bool:
    return cell.replace(".", "", 1).replace("×", "").replace(",", "").strip().isdigit() or cell == "—"


def replace_section(md_file: Path, key: str, body: str) -> None:
    """Put body between <!-- key:start --> and <!-- key:end --> in md_file, creating what is missing."""
    start, end = f"<!-- {key}:start -->", f"<!-- {key}:end -->"
    block = f"{start}\n{body.strip()}\n{end}"
    text = md_file.read_text() if md_file.exists() else "# Benchmarks\n"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    md_file.parent.mkdir(parents=True, exist_ok=True)
    md_file.write_text(text)


def today() -> str:
    return time.strftime("%Y-%m-%d %H:%M %Z")
