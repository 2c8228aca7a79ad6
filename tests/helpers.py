"""Small helpers shared by the tests: read a folder's tensors, compare them bit for bit, compute what
``apply`` should write with plain torch, edit model folders, run the CLI in a real process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from rvhub.toy import rewrite_weights

EMBED = "model.embed_tokens.weight"
HEAD = "lm_head.weight"
_INT_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def load_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every ``*.safetensors`` file in ``folder`` (one shard or many)."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        for name, t in load_file(str(f)).items():
            assert name not in out, f"{name} is stored twice in {folder}"
            out[name] = t
    return out


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a float tensor as integers (so -0.0 != +0.0 and NaN payloads count)."""
    return t.contiguous().view(_INT_VIEW[t.element_size()]) if t.is_floating_point() else t


def assert_bitwise_equal(
    actual: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], what: str = ""
) -> None:
    """Same tensor names, dtypes, shapes and bits."""
    prefix = f"{what}: " if what else ""
    only_a, only_e = sorted(set(actual) - set(expected)), sorted(set(expected) - set(actual))
    assert not only_a and not only_e, f"{prefix}tensors only in actual {only_a}, only in expected {only_e}"
    for name in sorted(expected):
        a, e = actual[name], expected[name]
        assert (a.dtype, tuple(a.shape)) == (e.dtype, tuple(e.shape)), (
            f"{prefix}{name}: {a.dtype} {tuple(a.shape)} vs expected {e.dtype} {tuple(e.shape)}"
        )
        differ = (bits(a) != bits(e)).reshape(-1)
        n = int(differ.sum())
        if n:
            i = int(differ.nonzero()[0])
            raise AssertionError(
                f"{prefix}{name}: {n} of {a.numel()} elements differ in bits; first at flat index {i}: "
                f"{a.reshape(-1)[i].item()!r} vs expected {e.reshape(-1)[i].item()!r}"
            )


def expected_apply(
    target: Mapping[str, torch.Tensor],
    sft: Mapping[str, torch.Tensor],
    rl: Mapping[str, torch.Tensor],
    alpha: float,
    *,
    out_dtype: torch.dtype | None = None,
    delta_of: Mapping[str, str] | None = None,
) -> dict[str, torch.Tensor]:
    """θ_T + α·(θ_RL − θ_SFT) in float32, rounded once: the reference ``apply`` must match bit for bit.

    ``delta_of`` maps a target tensor to the source tensor whose delta it gets (e.g. lm_head ← embeddings).
    """
    delta_of = delta_of or {}
    out = {}
    for name, t in target.items():
        src = delta_of.get(name, name)
        delta = rl[src].float() - sft[src].float() if src in rl else torch.zeros(())
        out[name] = (t.float() + alpha * delta).to(out_dtype or t.dtype)
    return out


def write_model(src: Path, dst: Path, tensors: Mapping[str, torch.Tensor], **config: Any) -> Path:
    """A copy of the model folder ``src`` (config, tokenizer…) with new weights and config entries."""
    rewrite_weights(src, dst, {k: v.contiguous() for k, v in tensors.items()})
    if config:
        edit_json(dst / "config.json", **config)
    return dst


def edit_json(path: Path, **changes: Any) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data, indent=2) + "\n")


def copy_folder(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def tmp_siblings(out: Path) -> list[str]:
    """The hidden temporary folders an (interrupted) run for ``out`` builds in."""
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.rvhub-tmp-"))


def assert_no_output(out: Path) -> None:
    assert not out.exists(), f"{out} was created although the command failed"
    assert not tmp_siblings(out), f"temporary folders left next to {out}: {tmp_siblings(out)}"


def folder_snapshot(folder: Path) -> dict[str, bytes]:
    """Relative path → bytes of every file under ``folder`` (to show it was not touched)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def unpack_mask(packed: torch.Tensor, count: int) -> torch.Tensor:
    """The sparse format's bitmask (packed little-endian) as a bool tensor of ``count`` elements."""
    return torch.from_numpy(np.unpackbits(packed.numpy(), count=count, bitorder="little").astype(bool))


def cache_hub_repo(repo_id: str, folder: Path, commit: str) -> None:
    """Put ``folder`` into the (test-private) Hub cache as ``repo_id`` at ``commit`` on main, the layout
    huggingface_hub reads offline."""
    repo = Path(os.environ["HF_HUB_CACHE"]) / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)


# ------------------------------------------------------------------ the CLI in a real process

def rvhub_command() -> list[str]:
    """The installed ``rvhub`` console script of this interpreter's environment (or ``-m rvhub.cli``)."""
    script = Path(sys.executable).with_name("rvhub")
    return [str(script)] if script.exists() else [sys.executable, "-m", "rvhub.cli"]


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_DISABLE_PROGRESS_BARS", "RVHUB_DEBUG")}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **extra)
    return env


_IMPORTS_RUNNER = """
import json, sys
from rvhub.cli import app
try:
    app(sys.argv[3:])
except SystemExit as e:
    code = e.code or 0
with open(sys.argv[1], "w") as f:
    json.dump({"code": code, "heavy": [m for m in json.loads(sys.argv[2]) if m in sys.modules]}, f)
"""


def run_cli_imports(
    report: Path, heavy: Sequence[str], *args: object, timeout: float = 300
) -> tuple[list[str], subprocess.CompletedProcess[str]]:
    """Run ``rvhub ARGS`` in a fresh interpreter and return which of the ``heavy`` modules it had imported at its
    end (written to ``report``), with the finished process; the command must succeed."""
    done = subprocess.run([sys.executable, "-c", _IMPORTS_RUNNER, str(report), json.dumps(list(heavy)),
                           *map(str, args)], capture_output=True, text=True, env=cli_env(), timeout=timeout)
    result = json.loads(report.read_text())
    assert result["code"] == 0, done.stderr
    return list(result["heavy"]), done


def run_cli(*args: object, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``rvhub`` and capture its output as text, keeping carriage returns (text=True would turn a
    progress bar's \r into line breaks)."""
    done = subprocess.run([*rvhub_command(), *map(str, args)], capture_output=True, env=env or cli_env(), timeout=300)
    return subprocess.CompletedProcess(done.args, done.returncode, done.stdout.decode(), done.stderr.decode())


def popen_cli(*args: object, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*rvhub_command(), *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=env or cli_env(),
    )


def save_tensors(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})
