"""Low-level file plumbing shared by every command: dtype names, a streaming safetensors writer,
sharding with an index, atomic output folders and file hashing."""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import stat
import struct
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import InvalidOptionError, OutputExistsError

if TYPE_CHECKING:
    import numpy as np
    import torch

    ST_TO_TORCH: dict[str, torch.dtype]
    TORCH_TO_ST: dict[torch.dtype, str]

logger = logging.getLogger(__name__)

# torch loads only where tensors are computed: `rvhub --help`, info, search and card never import it
_ST_TORCH_NAMES = {  # safetensors dtype codes -> torch dtypes (the codes the format defines for what torch holds)
    "BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
}


def __getattr__(name: str) -> Any:
    """``ST_TO_TORCH`` and ``TORCH_TO_ST``, built (importing torch) on first use."""
    if name in ("ST_TO_TORCH", "TORCH_TO_ST"):
        import torch

        st_to_torch = {k: getattr(torch, v) for k, v in _ST_TORCH_NAMES.items()}
        globals().update(ST_TO_TORCH=st_to_torch, TORCH_TO_ST={v: k for k, v in st_to_torch.items()})
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


FLOAT_CODES = ("BF16", "F16", "F32", "F64")
# user-facing names for --dtype options
DTYPE_NAMES: dict[str, str] = {
    "bfloat16": "BF16", "bf16": "BF16",
    "float16": "F16", "fp16": "F16", "half": "F16",
    "float32": "F32", "fp32": "F32", "float": "F32",
}


def dtype_code(name: str) -> str:
    """Map a user dtype name (``bfloat16``, ``fp16``, ``float32``…) to a safetensors code."""
    code = DTYPE_NAMES.get(name.lower())
    if code is None:
        raise InvalidOptionError("--dtype", name, "use one of bfloat16, float16, float32")
    return code


ITEMSIZE: dict[str, int] = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                             "BOOL": 1}


def nbytes(code: str, shape: Sequence[int]) -> int:
    return ITEMSIZE[code] * math.prod(shape)


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A zero-copy byte view of a contiguous CPU tensor (works for bfloat16, which numpy lacks)."""
    import torch

    t = t.contiguous()
    if t.dtype == torch.bool:
        t = t.view(torch.uint8)
    return memoryview(t.view(torch.uint8).numpy()).cast("B") if t.numel() else memoryview(b"")  # type: ignore[arg-type]


@dataclass(frozen=True)
class TensorSpec:
    """Name, safetensors dtype code and shape of one tensor to write."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return nbytes(self.dtype, self.shape)


def _header(entries: Sequence[TensorSpec], metadata: dict[str, str] | None) -> bytes:
    head: dict[str, Any] = {}
    if metadata:
        head["__metadata__"] = metadata
    offset = 0
    for e in entries:
        head[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    raw = json.dumps(head, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format allows space padding; 8-byte alignment keeps data aligned
    return struct.pack("<Q", len(raw)) + raw


SYNC_AHEAD_BYTES = 64 << 20  # a file being written is flushed to disk in the background every this many bytes


class SafetensorsFileWriter:
    """Writes one safetensors file tensor by tensor, chunk by chunk, without holding a tensor in memory.

    With ``plan`` (every entry known up front) the header goes first and data streams straight into place.
    Without it, data is written after ``reserve`` bytes left for the header, which ``close`` fills in
    (space-padded); only a header that does not fit there makes ``close`` move the data behind it.
    """

    def __init__(
        self, path: Path, metadata: dict[str, str] | None, plan: Sequence[TensorSpec] | None = None,
        reserve: int = 0,
    ):
        self.path = path
        self.metadata = metadata
        self.plan = list(plan) if plan is not None else None
        self.reserve = reserve
        self.entries: list[TensorSpec] = []
        self.data_bytes = 0
        self._pending: TensorSpec | None = None
        self._left = 0
        self._open: TensorSpec | None = None  # a tensor of yet unknown length (see begin_open)
        self._open_bytes = 0
        self._sealed = False  # after pop_last: the file takes no more tensors, only close
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="rvhub-write")
        self._inflight: collections.deque[Future[None]] = collections.deque()
        self._syncer = ThreadPoolExecutor(1, thread_name_prefix="rvhub-sync")
        self._sync: Future[None] | None = None
        self._unsynced = 0
        self._fh = open(path, "wb")
        if self.plan is not None:
            self._fh.write(_header(self.plan, metadata))
        else:
            self._fh.seek(8 + reserve)

    def begin(self, spec: TensorSpec) -> None:
        if self._left or self._open is not None:
            raise RuntimeError(f"{self._pending} is incomplete")
        if self._sealed:
            raise RuntimeError(f"{self.path}: a tensor was taken out; the file takes no more")
        if self.plan is not None and self.plan[len(self.entries)] != spec:
            raise RuntimeError(f"{spec} written out of plan order")
        self.entries.append(spec)
        self.data_bytes += spec.nbytes
        self._pending, self._left = spec, spec.nbytes

    def write(self, chunk: torch.Tensor | np.ndarray | bytes | memoryview) -> None:
        check_stop()
        torch = sys.modules.get("torch")  # a torch tensor comes only from a caller that imported torch
        if torch is not None and isinstance(chunk, torch.Tensor):
            data = tensor_bytes(chunk)
        else:
            data = memoryview(chunk).cast("B")  # type: ignore[arg-type]
        if self._open is not None:
            self._open_bytes += len(data)
        elif len(data) > self._left:
            raise RuntimeError(f"too many bytes for {self._pending}")
        else:
            self._left -= len(data)
        self._submit(self._write, data)

    def _submit(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn`` on the writing thread (file IO releases the GIL) while the caller computes the next
        chunk; at most two are in flight, so the memory they hold stays bounded."""
        while len(self._inflight) >= 2:
            self._inflight.popleft().result()
        self._inflight.append(self._pool.submit(fn, *args))

    def _data_offset(self) -> int:
        """The file offset of the first data byte (reserve mode)."""
        if self.plan is not None:
            raise RuntimeError(f"{self.path}: only a writer without a plan writes out of order")
        return 8 + self.reserve

    def defer(self) -> int:
        """Leave the bytes of the tensor just begun to :meth:`write_at` (in any order, before ``close``) and
        go on with the next tensor after them; the file offset of its first byte."""
        spec = self._pending
        if spec is None or self._left != spec.nbytes:
            raise RuntimeError("defer() must follow begin()")
        end = self._data_offset() + self.data_bytes
        self._left = 0
        self._submit(self._fh.seek, end)  # a hole until written: the writes after it land behind it
        return end - spec.nbytes

    def write_at(self, offset: int, chunk: np.ndarray | bytes) -> None:
        """Write bytes of a deferred tensor at file ``offset`` (from :meth:`defer`)."""
        self._submit(self._pwrite, memoryview(chunk).cast("B"), offset)  # type: ignore[arg-type]

    def _pwrite(self, data: memoryview, offset: int) -> None:
        while data:  # a short write is continued
            n = os.pwrite(self._fh.fileno(), data, offset)
            data, offset = data[n:], offset + n

    def begin_open(self, name: str, dtype: str) -> None:
        """Begin a flat tensor whose length is known only when :meth:`end_open` is called (reserve mode)."""
        self._data_offset()
        self.begin(TensorSpec(name, dtype, (0,)))
        self._open, self._open_bytes = self._pending, 0

    def end_open(self) -> TensorSpec:
        """End the tensor of :meth:`begin_open`: its spec, with the length of what was written."""
        spec = self._open
        if spec is None:
            raise RuntimeError("end_open() without begin_open()")
        n, rest = divmod(self._open_bytes, ITEMSIZE[spec.dtype])
        if rest:
            raise RuntimeError(f"{spec.name}: {self._open_bytes} bytes is not a whole number of {spec.dtype}")
        spec = self.entries[-1] = self._pending = TensorSpec(spec.name, spec.dtype, (n,))
        self.data_bytes += spec.nbytes
        self._open = None
        return spec

    def pop_last(self) -> int:
        """Take the last tensor out of this file, which then takes no more (its bytes stay until ``close``
        truncates them, for :meth:`copy_in` to read); the file offset of its first byte."""
        if self._left or self._open is not None or not self.entries:
            raise RuntimeError("pop_last() needs a complete last tensor")
        self._wait()
        self._fh.flush()
        spec = self.entries.pop()
        self.data_bytes -= spec.nbytes
        self._sealed = True
        return self._data_offset() + self.data_bytes

    def copy_in(self, path: Path, offset: int, n: int) -> None:
        """Write the current tensor's next ``n`` bytes from file ``path`` at ``offset`` (a few MB at a time)."""
        if n > self._left:
            raise RuntimeError(f"too many bytes for {self._pending}")
        with open(path, "rb") as src:
            src.seek(offset)
            while n:
                block = src.read(min(n, 8 << 20))
                if not block:
                    raise RuntimeError(f"{path} ends before the bytes to copy")
                self.write(block)
                n -= len(block)

    def _write(self, data: memoryview) -> None:
        """On the writing thread: write, and every SYNC_AHEAD_BYTES have a third thread start flushing what is
        written to disk, so the fsync that ``close`` must do finds little left to wait for."""
        self._fh.write(data)
        self._unsynced += len(data)
        if self._unsynced >= SYNC_AHEAD_BYTES and (self._sync is None or self._sync.done()):
            self._fh.flush()
            self._unsynced = 0
            self._sync = self._syncer.submit(os.fdatasync, self._fh.fileno())

    def _wait(self) -> None:
        while self._inflight:
            self._inflight.popleft().result()

    def _drain(self) -> None:
        self._wait()
        self._pool.shutdown()
        self._syncer.shutdown()  # waits for a flush in flight
        if self._sync is not None:
            self._sync.result()

    def close(self) -> None:
        if self._left or self._open is not None:
            raise RuntimeError(f"{self._pending} is incomplete")
        self._drain()
        if self.plan is not None:
            if len(self.entries) != len(self.plan):
                raise RuntimeError(f"{self.path}: {len(self.plan) - len(self.entries)} planned tensors unwritten")
            _fsync_close(self._fh)
            return
        self._fh.flush()  # the data ends where its entries say: a deferred tail is filled, a popped one dropped
        os.ftruncate(self._fh.fileno(), self._data_offset() + self.data_bytes)
        head = _header(self.entries, self.metadata)
        if len(head) <= 8 + self.reserve:
            self._fh.seek(0)  # the format allows the header to be padded with spaces
            self._fh.write(struct.pack("<Q", self.reserve) + head[8:] + b" " * (8 + self.reserve - len(head)))
            _fsync_close(self._fh)
            return
        self._fh.close()  # the header does not fit the reserve: move the data behind it
        body = self.path.with_name(self.path.name + ".body")
        with open(self.path, "rb") as src, open(body, "wb") as dst:
            src.seek(8 + self.reserve)
            shutil.copyfileobj(src, dst, 16 << 20)
        with open(self.path, "wb") as out, open(body, "rb") as src:
            out.write(head)
            shutil.copyfileobj(src, out, 16 << 20)
            _fsync_close(out)
        body.unlink()

    def abort(self) -> None:
        for f in self._inflight:
            f.cancel()
        self._pool.shutdown(wait=True)
        self._syncer.shutdown(wait=True)
        self._fh.close()


def _fsync_close(fh: Any) -> None:
    fh.flush()
    os.fsync(fh.fileno())
    fh.close()


class ShardedWriter:
    """Writes tensors into size-bounded safetensors shards named like ``save_pretrained`` does
    (``{stem}.safetensors`` or ``{stem}-00001-of-00003.safetensors`` + ``{stem}.safetensors.index.json``).

    Give ``plan`` when every tensor is known up front (header first; tensors then come in plan order);
    otherwise give ``header_reserve``, room for the largest header a shard can get.
    """

    def __init__(
        self,
        folder: Path,
        stem: str,
        max_shard_bytes: int,
        metadata: dict[str, str] | None = None,
        plan: Sequence[TensorSpec] | None = None,
        index_metadata: dict[str, Any] | None = None,
        header_reserve: int = 0,
    ):
        if max_shard_bytes <= 0:
            raise InvalidOptionError("--max-shard-size", max_shard_bytes, "must be positive")
        self.folder, self.stem, self.max = folder, stem, max_shard_bytes
        self.metadata = metadata
        self.index_metadata = index_metadata or {}
        self.header_reserve = header_reserve
        self._shard_plans: list[list[TensorSpec]] | None = None
        if plan is not None:
            self._shard_plans = _split(plan, max_shard_bytes)
        self._done: list[tuple[Path, list[TensorSpec]]] = []
        self._cur: SafetensorsFileWriter | None = None

    def _open_next(self) -> SafetensorsFileWriter:
        i = len(self._done)
        path = self.folder / f".shard-{i:05d}.safetensors"
        plan = self._shard_plans[i] if self._shard_plans is not None else None
        return SafetensorsFileWriter(path, self.metadata, plan, self.header_reserve)

    def _finish_current(self) -> None:
        if self._cur is not None:
            self._cur.close()
            self._done.append((self._cur.path, list(self._cur.entries)))
            self._cur = None

    def begin(self, spec: TensorSpec) -> SafetensorsFileWriter:
        """Start a tensor; returns the file writer to stream its bytes into with ``write``."""
        cur = self._cur
        if self._shard_plans is not None:
            if cur is not None and len(cur.entries) == len(cur.plan or []):
                self._finish_current()
                cur = None
        elif cur is not None and cur.entries and cur.data_bytes + spec.nbytes > self.max:
            self._finish_current()
            cur = None
        if cur is None:
            cur = self._cur = self._open_next()
        cur.begin(spec)
        return cur

    def begin_open(self, name: str, dtype: str) -> SafetensorsFileWriter:
        """Start a flat tensor of yet unknown length, in the current shard (a new one if none is open);
        stream its bytes with ``write``, then call :meth:`end_open`."""
        if self._shard_plans is not None:
            raise RuntimeError("a planned writer has no tensor of unknown length")
        if self._cur is None:
            self._cur = self._open_next()
        self._cur.begin_open(name, dtype)
        return self._cur

    def end_open(self) -> TensorSpec:
        """End the tensor of :meth:`begin_open`. It lands where :meth:`begin` would have put it had its size
        been known: when it overfills a shard that holds other tensors, it moves to the next one."""
        cur = self._cur
        assert cur is not None
        spec = cur.end_open()
        if len(cur.entries) > 1 and cur.data_bytes > self.max:
            offset = cur.pop_last()
            nxt = SafetensorsFileWriter(self.folder / f".shard-{len(self._done) + 1:05d}.safetensors", self.metadata,
                                        None, self.header_reserve)
            try:
                nxt.begin(spec)
                nxt.copy_in(cur.path, offset, spec.nbytes)
            except BaseException:
                nxt.abort()
                raise
            self._finish_current()  # truncates the moved bytes away
            self._cur = nxt
        return spec

    def add(self, spec: TensorSpec, chunks: Iterable[torch.Tensor | np.ndarray | bytes]) -> None:
        """Write a whole tensor from its chunks."""
        w = self.begin(spec)
        for c in chunks:
            w.write(c)
        if w._left:
            raise RuntimeError(f"{spec} is missing {w._left} bytes")

    def close(self) -> list[str]:
        """Finish the last shard, give shards their final names, write the index; return file names."""
        self._finish_current()
        n = len(self._done)
        if self._shard_plans is not None and n not in (0, len(self._shard_plans)):
            raise RuntimeError("planned shards were not all written")
        if n == 0:  # an empty vector still gets one (empty) file so readers need no special case
            w = SafetensorsFileWriter(self.folder / f".shard-{0:05d}.safetensors", self.metadata, [])
            w.close()
            self._done.append((w.path, []))
            n = 1
        names: list[str] = []
        weight_map: dict[str, str] = {}
        total = 0
        for i, (path, entries) in enumerate(self._done):
            name = f"{self.stem}.safetensors" if n == 1 else f"{self.stem}-{i + 1:05d}-of-{n:05d}.safetensors"
            path.rename(self.folder / name)
            names.append(name)
            for e in entries:
                weight_map[e.name] = name
                total += e.nbytes
        if n > 1:
            index = {"metadata": {**self.index_metadata, "total_size": total}, "weight_map": weight_map}
            index_name = f"{self.stem}.safetensors.index.json"
            write_text(self.folder / index_name, json.dumps(index, indent=2, sort_keys=True) + "\n")
            names.append(index_name)
        return names

    def abort(self) -> None:
        if self._cur is not None:
            self._cur.abort()

    def __enter__(self) -> ShardedWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:  # the caller's atomic_dir removes the half-written folder
            self.abort()


def _split(plan: Sequence[TensorSpec], max_bytes: int) -> list[list[TensorSpec]]:
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in plan:
        if shards[-1] and size + spec.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def copy_file(src: Path, dst: Path) -> None:
    """Copy a small file and fsync it (part of an atomic output folder)."""
    shutil.copyfile(src, dst)
    with open(dst, "rb+") as fh:
        os.fsync(fh.fileno())


def sha256_file(path: Path, block: int = 8 << 20) -> str:
    """The file's sha256: the one :func:`hash_ahead` computed, when the file is still the one it read (same
    device, inode, size, mtime and ctime before, after and now), else read here."""
    with _AHEAD_LOCK:
        ahead = _AHEAD.pop(_identity(os.stat(path)), None)
    if ahead is not None:
        digest, before, after = ahead.result()
        if digest is not None and before == after == _identity(os.stat(path)):
            return digest
    return _sha256(path, block)


def _sha256(path: Path, block: int = 8 << 20) -> str:
    with open(path, "rb") as fh:
        return _digest(fh, None, block)


def _digest(fh: Any, limit: int | None, block: int = 8 << 20) -> str:
    """sha256 of what ``fh`` reads from here to its end, or of at most ``limit`` bytes."""
    h = hashlib.sha256()
    while limit is None or limit > 0:
        chunk = fh.read(block if limit is None else min(block, limit))
        if not chunk:
            break
        h.update(chunk)
        if limit is not None:
            limit -= len(chunk)
    return h.hexdigest()


_Identity = tuple[int, int, int, int, int]
_AHEAD_LOCK = threading.Lock()
_AHEAD: dict[_Identity, Future[tuple[str | None, _Identity, _Identity]]] = {}
_AHEAD_MAX_FILES = 256


def _identity(st: os.stat_result) -> _Identity:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def hash_ahead(paths: Iterable[Path]) -> None:
    """Start hashing these files, in order, on one background thread, so that a later :func:`sha256_file` of
    an unchanged file takes the result instead of reading it again. Hashing that must come before a file is read
    (a vector's verification) then overlaps the imports and set-up before it, on another core. Only regular
    files (not through a link) are hashed, and a file that changes while it is read is hashed again when asked."""
    jobs: list[tuple[Path, Future[tuple[str | None, _Identity, _Identity]]]] = []
    with _AHEAD_LOCK:
        for path in paths:
            try:
                st = os.lstat(path)
            except OSError:
                continue
            key = _identity(st)
            if stat.S_ISREG(st.st_mode) and key not in _AHEAD and len(_AHEAD) < _AHEAD_MAX_FILES:
                fut: Future[tuple[str | None, _Identity, _Identity]] = Future()
                _AHEAD[key] = fut
                jobs.append((path, fut))
    if jobs:  # a daemon thread: an exit need not wait for hashes nobody asked for
        threading.Thread(target=_hash_jobs, args=(jobs,), daemon=True, name="rvhub-hash-ahead").start()


def hash_folder_ahead(folder: Path, suffix: str = ".safetensors") -> None:
    """:func:`hash_ahead` of the regular ``*.safetensors`` files directly in ``folder`` (at most 256); nothing
    for anything else (a repo id, a missing folder)."""
    try:
        with os.scandir(folder) as it:
            files = [Path(e.path) for e, _ in zip((e for e in it if e.name.endswith(suffix)),
                                                  range(_AHEAD_MAX_FILES), strict=False)]
    except OSError:
        return
    hash_ahead(sorted(files))


def _hash_jobs(jobs: Sequence[tuple[Path, Future[tuple[str | None, _Identity, _Identity]]]]) -> None:
    for path, fut in jobs:
        if not fut.set_running_or_notify_cancel():
            continue
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
            with open(fd, "rb") as fh:
                before = _identity(os.fstat(fh.fileno()))
                digest = _digest(fh, before[2])  # never more than the size it had: a grown file is hashed again
                after = _identity(os.fstat(fh.fileno()))
            fut.set_result((digest, before, after))
        except OSError:
            fut.set_result((None, (0, 0, 0, 0, 0), (0, 0, 0, 0, 0)))


_MAX_SIZE = 10**15


def parse_size(text: str | int) -> int:
    """``"2GB"``, ``"500MB"``, ``"64KiB"`` or an integer number of bytes."""
    if isinstance(text, int) and not isinstance(text, bool):
        if not 1 <= text <= _MAX_SIZE:
            raise InvalidOptionError("size", text, "must be a positive number of bytes, at most 1PB")
        return text
    if not isinstance(text, str):
        raise InvalidOptionError("size", text, "use bytes or a number with KB/MB/GB (or KiB/MiB/GiB)")
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    s = text.strip().upper()
    num = s.rstrip("KMGTIB")
    try:
        value = float(num) * units[s[len(num):]]
    except (KeyError, ValueError) as e:
        raise InvalidOptionError("size", text, "use bytes or a number with KB/MB/GB (or KiB/MiB/GiB)") from e
    if not math.isfinite(value) or value < 1 or value > _MAX_SIZE:
        raise InvalidOptionError("size", text, "must be a positive, finite number of bytes, at most 1PB")
    return int(value)


# ---------------------------------------------------------------- stopping at a safe point

_STOP: list[int] = []  # the signal that asked us to stop, if any


class Interrupted(BaseException):
    """Raised at the next chunk after a stop was requested (SIGINT/SIGTERM in the CLI)."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"interrupted by signal {signum}")


def request_stop(signum: int) -> None:
    """Ask running work to stop at its next chunk (safe to call from a signal handler)."""
    _STOP.append(signum)


def check_stop() -> None:
    if _STOP:
        raise Interrupted(_STOP[0])


# ---------------------------------------------------------------- atomic output folders

_TMP_MARK = ".rvhub-tmp-"


def check_output(out: Path, overwrite: bool, inputs: Iterable[Path] = ()) -> None:
    """Refuse early (before any work) an OUT that cannot be written or would touch an input: OUT exists
    without ``overwrite``; a folder on its way is a file; OUT is, contains or lies inside one of ``inputs``
    (the command's input folders and files, and the folders its registry keeps). Symlinks are followed."""
    out = out.absolute()
    for parent in out.parents:
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                raise InvalidOptionError("output", str(out), f"{parent} is a file, not a folder; choose another path")
            break
    check_apart(out, inputs)
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise OutputExistsError(str(out))


def check_apart(out: Path, inputs: Iterable[Path], what: str = "output") -> None:
    """Refuse ``out`` when it is, contains or lies inside one of ``inputs`` (after resolving symlinks)."""
    real = Path(os.path.realpath(out))
    for p in inputs:
        other = Path(os.path.realpath(p))
        if real == other:
            how = "is"
        elif other in real.parents:
            how = "lies inside"
        elif real in other.parents:
            how = "contains"
        else:
            continue
        raise InvalidOptionError(
            what, str(out),
            f"it {how} {p}, an input of this command or a folder its registry keeps; choose a path outside it",
        )


def _clean_stale(out: Path) -> None:
    """Remove temporary siblings left by a killed run of ours (their process is gone)."""
    prefix = f".{out.name}{_TMP_MARK}"
    for p in out.parent.glob(prefix + "*"):
        pid = p.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def atomic_dir(out: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary sibling of OUT to build in; on success fsync it and rename it to OUT.

    On any error the temporary folder is removed and OUT is untouched. A killed process leaves only a
    hidden ``.OUT.rvhub-tmp-PID-…`` sibling, which the next run for the same OUT removes.
    """
    out = out.absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale(out)
    tmp = out.with_name(f".{out.name}{_TMP_MARK}{os.getpid()}-{os.urandom(4).hex()}")
    tmp.mkdir()
    try:
        yield tmp
        _fsync_dir(tmp)
        if out.exists() or out.is_symlink():
            if not overwrite:
                raise OutputExistsError(str(out))
            trash = tmp.with_name(tmp.name + "-old")
            os.rename(out, trash)
            os.rename(tmp, out)
            shutil.rmtree(trash) if trash.is_dir() else trash.unlink()
        else:
            os.rename(tmp, out)
        _fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
