"""The streaming commands' malloc set-up (rvhub._malloc): freed chunk-sized blocks stay in the heap."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest
from typer.testing import CliRunner

import rvhub._malloc as malloc_mod
from rvhub.cli import app

glibc = pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc only"
)

# Three 12 MB arrays, freed together, twenty times, on the main thread and then on another: the pattern of a
# chunk's arrays. With glibc's defaults the heap top they leave is handed back and faulted in again each time.
WORKLOAD = """
import resource, sys, threading
import numpy as np
from rvhub._malloc import keep_freed_blocks
tuned = keep_freed_blocks()
def work():
    for _ in range(20):
        held = [np.ones(3 << 20, np.float32) for _ in range(3)]
        del held
r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
work()
t = threading.Thread(target=work)
t.start()
t.join()
print(tuned, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
"""


def _faults(**env: str) -> tuple[bool, int]:
    clean = {k: v for k, v in os.environ.items() if k not in (*malloc_mod._USER_KNOBS, "RVHUB_MALLOC")}
    out = subprocess.run([sys.executable, "-c", WORKLOAD], env={**clean, **env}, capture_output=True, text=True,
                         check=True, timeout=120).stdout.split()
    return out[0] == "True", int(out[1])


@glibc
def test_freed_blocks_are_reused_instead_of_faulted_in_again():
    tuned, tuned_faults = _faults()
    untuned, default_faults = _faults(RVHUB_MALLOC="default")
    assert tuned and not untuned
    # 40 rounds × 36 MB: the defaults fault them in again every round (51,500 faults here, where numpy's
    # arrays get 2 MB pages; ~350,000 with 4 KB pages), the set-up once (3,070 here)
    assert default_faults > 10_000
    assert tuned_faults < default_faults / 5


@glibc
@pytest.mark.parametrize("knob", ["MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES"])
def test_the_users_own_malloc_settings_win(knob):
    value = "glibc.malloc.trim_threshold=1" if knob == "GLIBC_TUNABLES" else "4096"
    tuned, _ = _faults(**{knob: value})
    assert not tuned


def test_streaming_commands_set_it_up_and_eval_does_not(monkeypatch, tmp_path):
    calls: list[str] = []
    monkeypatch.setattr(malloc_mod, "keep_freed_blocks", lambda: calls.append("set") or True)
    missing = tmp_path / "missing"
    runner = CliRunner()
    for args in (
        ["extract", "--from", str(missing), "--to", str(missing), "-o", str(tmp_path / "o1")],
        ["apply", str(missing), "--base", str(missing), "-o", str(tmp_path / "o2")],
        ["combine", str(missing), str(missing), "-o", str(tmp_path / "o3")],
        ["compress", str(missing), "-o", str(tmp_path / "o4")],
        ["inspect", str(missing)],
    ):
        calls.clear()
        result = runner.invoke(app, [*args, "--quiet"] if args[0] != "inspect" else args)
        assert result.exit_code != 0  # the missing input is refused ...
        assert calls == ["set"], args  # ... after the set-up ran, once
    calls.clear()
    runner.invoke(app, ["eval", str(missing), "--base", str(missing), "--tasks", "x"])
    assert calls == []  # eval holds a whole model: its RSS budget is not spent on kept blocks
