"""The streaming safetensors writer: every mode produces files that safetensors reads back exactly."""

import pytest
import torch
from safetensors.torch import load_file

from rvhub._io import SafetensorsFileWriter, ShardedWriter, TensorSpec, parse_size
from rvhub.errors import InvalidOptionError

TENSORS = {
    "a": torch.arange(10, dtype=torch.float32),
    "b::mask": torch.tensor([1, 2, 255], dtype=torch.uint8),
    "c": torch.randn(3, 5, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16),
}


def _specs():
    from rvhub._io import TORCH_TO_ST

    return [TensorSpec(k, TORCH_TO_ST[v.dtype], tuple(v.shape)) for k, v in TENSORS.items()]


def _write(w, specs):
    for spec in specs:
        t = TENSORS[spec.name].reshape(-1)
        w.begin(spec)
        w.write(t[: t.numel() // 2])  # two chunks per tensor
        w.write(t[t.numel() // 2 :])
    w.close()


def _same(path):
    back = load_file(str(path))
    assert back.keys() == TENSORS.keys()
    for k, v in TENSORS.items():
        assert torch.equal(back[k], v), k


@pytest.mark.parametrize("mode", ["plan", "spill", "reserve", "reserve-too-small"])
def test_every_mode_round_trips(tmp_path, mode):
    specs = _specs()
    path = tmp_path / "x.safetensors"
    kwargs = {
        "plan": {"plan": specs},
        "spill": {},
        "reserve": {"reserve": 4096},
        "reserve-too-small": {"reserve": 16},  # falls back to moving the data behind the header
    }[mode]
    _write(SafetensorsFileWriter(path, {"format": "pt"}, **kwargs), specs)
    _same(path)
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]  # no side file left
    if mode == "reserve":
        assert path.stat().st_size == 8 + 4096 + sum(s.nbytes for s in specs)


def test_plan_order_and_sizes_are_enforced(tmp_path):
    specs = _specs()
    w = SafetensorsFileWriter(tmp_path / "x.safetensors", None, plan=specs)
    with pytest.raises(RuntimeError, match="out of plan order"):
        w.begin(specs[1])
    w.begin(specs[0])
    with pytest.raises(RuntimeError, match="too many bytes"):
        w.write(torch.zeros(11))
    w.abort()


def test_shards_split_by_size_and_get_an_index(tmp_path):
    w = ShardedWriter(tmp_path, "model", max_shard_bytes=40, metadata={"format": "pt"}, plan=_specs())
    _write_all = [w.add(s, [TENSORS[s.name]]) for s in _specs()]
    assert len(_write_all) == 3
    names = w.close()
    assert names == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                     "model.safetensors.index.json"]
    merged = {**load_file(str(tmp_path / names[0])), **load_file(str(tmp_path / names[1]))}
    assert all(torch.equal(merged[k], v) for k, v in TENSORS.items())


@pytest.mark.parametrize("text,value", [("2GB", 2 * 10**9), ("500MB", 5 * 10**8), ("1GiB", 2**30), ("64", 64)])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "-1GB", "0", "12XB", "GB", "nan", "inf", "-inf", "1e400", "0.5", "2PB", True])
def test_parse_size_rejects(text):
    with pytest.raises(InvalidOptionError):
        parse_size(text)


@pytest.mark.parametrize("text,shown", [
    ("plain text", "plain text"),
    ("a\x1b[31mred\x1b[0m b", "ared b"),
    ("title\x1b]0;owned\x07 end", "title end"),
    ("tab\tand\nnewline", "tab\tand\nnewline"),
    ("cr\rbell\x07nul\x00", "cr bell?nul?"),
    ("bidi \u202eevil", "bidi ?evil"),
    ("wide 日本語 ok", "wide 日本語 ok"),
])
def test_printable_strips_terminal_controls(text, shown):
    from rvhub._untrusted import printable

    assert printable(text) == shown


def _wait_ahead():
    from rvhub import _io

    with _io._AHEAD_LOCK:
        pending = list(_io._AHEAD.values())
    for fut in pending:
        fut.result(timeout=30)


def test_hash_ahead_result_is_used_and_not_read_again(tmp_path, monkeypatch):
    import hashlib

    from rvhub import _io

    f = tmp_path / "w.safetensors"
    f.write_bytes(b"x" * 100_000)
    _io.hash_folder_ahead(tmp_path)
    _wait_ahead()
    monkeypatch.setattr(_io, "_sha256", lambda *a, **k: pytest.fail("read again"))
    assert _io.sha256_file(f) == hashlib.sha256(b"x" * 100_000).hexdigest()
    monkeypatch.undo()
    assert _io.sha256_file(f) == hashlib.sha256(b"x" * 100_000).hexdigest()  # taken once, then read as usual


def test_hash_ahead_of_a_changed_file_is_not_used(tmp_path):
    """Same size and the mtime put back: the ctime still tells, and the file is hashed again."""
    import hashlib
    import os
    import time

    from rvhub import _io

    f = tmp_path / "w.safetensors"
    f.write_bytes(b"a" * 4096)
    _io.hash_ahead([f])
    _wait_ahead()
    st = os.stat(f)
    time.sleep(0.01)
    f.write_bytes(b"b" * 4096)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert _io.sha256_file(f) == hashlib.sha256(b"b" * 4096).hexdigest()


def test_hash_ahead_skips_links_fifos_and_missing_folders(tmp_path):
    import os

    from rvhub import _io

    real = tmp_path / "real.bin"
    real.write_bytes(b"z" * 10)
    (tmp_path / "link.safetensors").symlink_to(real)
    os.mkfifo(tmp_path / "fifo.safetensors")  # opening it to read would block forever
    before = len(_io._AHEAD)
    _io.hash_folder_ahead(tmp_path)
    _io.hash_folder_ahead(tmp_path / "missing")
    _io.hash_folder_ahead(tmp_path / "real.bin")  # not a folder
    assert len(_io._AHEAD) == before
