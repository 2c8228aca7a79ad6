"""Model sources: a local folder or a Hub repo (``org/name@rev``), read one tensor (chunk) at a time.

Only safetensors are ever read; pickle checkpoints are refused. Network happens here and in the registry
only, never in pure steps.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from safetensors import SafetensorError, safe_open

from ._io import FLOAT_CODES, ITEMSIZE, check_stop, nbytes, sha256_file
from ._npdtype import RAW_NUMPY, raw_view
from .card import ModelRef
from .errors import CorruptFileError, HubModelError, ModelNotFoundError, PickleOnlyError, RvhubError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

# Files that make a model usable besides its weights. The output of `apply` takes these from the TARGET.
SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "tokenizer.model",
    "spiece.model",
    "chat_template.jinja",
    "chat_template.json",
)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# (output embedding, input embedding) names of the architectures that tie them
TIED_PAIRS = (
    ("lm_head.weight", "model.embed_tokens.weight"),
    ("lm_head.weight", "transformer.wte.weight"),
    ("embed_out.weight", "gpt_neox.embed_in.weight"),
)
_REPO_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9_.\-]+(@[A-Za-z0-9_.\-/]+)?")  # ASCII, in full
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,255}")
CHUNK_ELEMS = 1 << 22
# The row block the numpy streaming paths on the CPU (extract, apply, combine's sum) compute in. Measured on the
# 0.5B benchmark shape against 4M-element blocks, files byte-identical: apply 12-15% faster (its system time
# 2.0-2.5 s -> 1.2 s), extract's peak RSS 218 -> 146 MB at the same speed, combine's sum 10% less CPU.
STREAM_CHUNK_ELEMS = 1 << 20


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return nbytes(self.dtype, self.shape)

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_CODES


class Reader:
    """Reads tensors, or rows [a, b) of them, from safetensors files as raw numpy arrays (bf16 as uint16).

    Each file's header is checked by ``safe_open`` (the format's own validation) and parsed once; data is then
    read with ``pread`` into a fresh, writable array: nothing stays mapped, so resident memory is what the
    caller holds, whatever the model's size. :meth:`read` gives the same bytes as a torch tensor.
    """

    def __init__(self) -> None:
        self._files: dict[Path, _StFile] = {}
        self._lock = threading.Lock()  # worker threads read chunks of one file at once (pread is safe)

    def file(self, path: Path) -> _StFile:
        f = self._files.get(path)
        if f is None:
            with self._lock:
                f = self._files.get(path)
                if f is None:
                    f = self._files[path] = _StFile(path)
        return f

    def read_np(self, path: Path, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        """Tensor ``name`` (or rows [a, b) of it, clamped as a slice is) in its shape, as raw values."""
        return self.file(path).read(name, rows)

    def read(self, path: Path, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """As :meth:`read_np`, as a torch tensor of the stored dtype."""
        from ._npbridge import to_torch

        return to_torch(self.read_np(path, name, rows), self.file(path).tensors[name][0])

    def close(self, path: Path | None = None) -> None:
        for p in [path] if path is not None else list(self._files):
            f = self._files.pop(p, None)
            if f is not None:
                f.close()


class _StFile:
    """One safetensors file: its header (validated by safe_open, then parsed for the data offsets)."""

    def __init__(self, path: Path):
        self.path = path
        with open_safetensors(path) as f:  # the format's own checks: offsets, sizes, dtypes, file length
            try:
                keys = list(f.keys())
            except SafetensorError as e:
                raise CorruptFileError(str(path), str(e)) from e
        self._fd = os.open(path, os.O_RDONLY)
        self._closer = weakref.finalize(self, os.close, self._fd)
        try:
            n = int.from_bytes(os.pread(self._fd, 8, 0), "little")
            head = json.loads(os.pread(self._fd, n, 8))
        except (OSError, ValueError) as e:
            self.close()
            raise CorruptFileError(str(path), f"header: {e}") from e
        self._data = 8 + n
        # name -> (dtype code, shape, begin byte offset in the file)
        self.tensors: dict[str, tuple[str, tuple[int, ...], int]] = {
            k: (head[k]["dtype"], tuple(head[k]["shape"]), self._data + int(head[k]["data_offsets"][0])) for k in keys
        }

    def read(self, name: str, rows: tuple[int, int] | None) -> np.ndarray:
        code, shape, begin = self.tensors[name]
        if rows is not None and shape:
            a, b, _ = slice(*rows).indices(shape[0])
            b = max(a, b)
            row = ITEMSIZE[code] * math.prod(shape[1:])
            begin += a * row
            shape = (b - a, *shape[1:])
        out = np.empty(shape, dtype=np.dtype(RAW_NUMPY[code]).newbyteorder("<"))
        buf = out.reshape(-1).view(np.uint8).data
        done = 0
        while done < len(buf):
            got = os.preadv(self._fd, [buf[done:]], begin + done)
            if got <= 0:
                raise CorruptFileError(str(self.path), f"{name}: the file ends before the tensor's data")
            done += got
        return out

    def close(self) -> None:
        self._closer()


@dataclass
class ModelSource:
    """An opened checkpoint: its tensors' headers, config and side files, read lazily."""

    ref: ModelRef
    root: Path
    tensors: dict[str, TensorInfo]
    config: dict[str, Any]
    _hash: _ContentHasher | None = field(default=None, repr=False)
    _reader: Reader = field(default_factory=Reader, repr=False)

    @property
    def model_type(self) -> str | None:
        mt = self.config.get("model_type")
        return str(mt) if mt is not None else None

    @property
    def tied(self) -> bool:
        return tied_embeddings(self.config, self.tensors)

    @property
    def tied_pair(self) -> tuple[str, str] | None:
        """(lm_head name, embedding name) if this architecture has such a pair (tied or not)."""
        for head, emb in TIED_PAIRS:
            if emb in self.tensors:
                return head, emb
        return None

    @property
    def vocab_tensors(self) -> set[str]:
        pair = self.tied_pair
        return set(pair) if pair else set()

    def side_files(self) -> list[Path]:
        return [self.root / n for n in SIDE_FILES if (self.root / n).is_file()]

    def read_np(self, name: str) -> np.ndarray:
        """The tensor in its shape, as raw values (bf16 as uint16 bit patterns)."""
        return self._reader.read_np(self.tensors[name].file, name)

    def read(self, name: str) -> torch.Tensor:
        return _torch(self.read_np(name), self.tensors[name].dtype)

    def iter_chunks_np(self, name: str, chunk_elems: int = CHUNK_ELEMS) -> Iterator[np.ndarray]:
        """Yield the tensor's raw values flattened, in contiguous chunks of about ``chunk_elems`` elements.

        Chunk boundaries fall on row boundaries and on multiples of 8 elements (so bitmasks pack per chunk),
        except at the end. The same ``chunk_elems`` gives the same boundaries for equal shapes.
        """
        for block in self.chunk_blocks(name, chunk_elems):
            check_stop()
            yield self.read_block_np(name, block)

    def chunk_blocks(self, name: str, chunk_elems: int = CHUNK_ELEMS) -> list[tuple[int, int] | None]:
        """The row blocks :meth:`iter_chunks_np` reads, in order (``None``: the whole tensor, one chunk)."""
        info = self.tensors[name]
        # the blocks must be exactly those of row_blocks (apply zips them with the vector's): a tensor of
        # at most chunk_elems elements can still span several blocks when its row is not a multiple of 8
        blocks = row_blocks(info.shape, chunk_elems) if info.shape and info.numel else []
        return list(blocks) if len(blocks) > 1 else [None]

    def read_block_np(self, name: str, block: tuple[int, int] | None) -> np.ndarray:
        """One chunk of :meth:`iter_chunks_np` (a block of :meth:`chunk_blocks`), flat, in a fresh array;
        safe to call from several threads at once."""
        info = self.tensors[name]
        return self._reader.read_np(info.file, name, block).reshape(-1)

    def iter_chunks(self, name: str, chunk_elems: int = CHUNK_ELEMS) -> Iterator[torch.Tensor]:
        """:meth:`iter_chunks_np` as torch tensors."""
        code = self.tensors[name].dtype
        for c in self.iter_chunks_np(name, chunk_elems):
            yield _torch(c, code)

    def content_sha256(self) -> str | None:
        return self._hash.result() if self._hash else None

    def read_span_np(self, name: str, start: int, length: int) -> np.ndarray:
        """Flat raw elements [start, start + length) of a tensor, reading only the rows that hold them."""
        info = self.tensors[name]
        if not info.shape:
            return self.read_np(name).reshape(-1)[start : start + length]
        row = math.prod(info.shape[1:]) or 1
        r0, r1 = start // row, -(-(start + length) // row)
        t = self._reader.read_np(info.file, name, (r0, r1)).reshape(-1)
        return t[start - r0 * row : start - r0 * row + length]

    def read_span(self, name: str, start: int, length: int) -> torch.Tensor:
        return _torch(self.read_span_np(name, start, length), self.tensors[name].dtype)


def _torch(raw: np.ndarray, code: str) -> torch.Tensor:
    from ._npbridge import to_torch

    return to_torch(raw, code)


def row_blocks(shape: tuple[int, ...], chunk_elems: int) -> list[tuple[int, int]]:
    """Row ranges [a, b) of about ``chunk_elems`` elements, a multiple of 8 elements each but the last."""
    rows = shape[0]
    row = math.prod(shape[1:])
    step = 8 // math.gcd(row, 8) if row else 1
    per = max(step, (chunk_elems // max(row, 1)) // step * step)
    return [(a, min(a + per, rows)) for a in range(0, rows, per)]


def tied_embeddings(config: dict[str, Any], tensors: dict[str, Any]) -> bool:
    """Whether the model ties its output head to its input embeddings.

    The config decides when it says so; transformers' default when it is silent is to tie, and a
    checkpoint without an lm_head tensor can only be tied.
    """
    value = config.get("tie_word_embeddings")
    if value is None and isinstance(config.get("text_config"), dict):
        value = config["text_config"].get("tie_word_embeddings")
    if value is not None:
        return bool(value)
    for head, emb in TIED_PAIRS:
        if emb in tensors:
            return head not in tensors
    return False


class _ContentHasher:
    """Hashes weight files in a background thread (hashlib releases the GIL) while tensors are read."""

    def __init__(self, files: list[Path]):
        self._files = files
        self._value: str | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True, name="rvhub-hash")
        self._thread.start()

    def _run(self) -> None:
        try:
            h = hashlib.sha256()
            for p in sorted(self._files, key=lambda p: p.name):
                h.update(f"{p.name}\0{sha256_file(p)}\n".encode())
            self._value = h.hexdigest()
        except BaseException as e:  # surfaced in result()
            self._error = e

    def result(self) -> str:
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._value is not None
        return self._value


def open_safetensors(path: Path) -> Any:
    """``safe_open`` with format errors turned into :class:`CorruptFileError`."""
    try:
        return safe_open(str(path), framework="numpy")
    except (SafetensorError, OSError) as e:
        raise CorruptFileError(str(path), str(e)) from e


def open_model(ref: str, *, hash_content: bool = True) -> ModelSource:
    """Open a model by local folder path or Hub repo id (``org/name`` or ``org/name@revision``)."""
    path = Path(ref).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelNotFoundError(ref, "expected a folder with config.json and *.safetensors")
        return _open_folder(path, ModelRef(kind="local", id=ref), hash_content)
    if not _REPO_RE.fullmatch(ref) or ref.startswith((".", "/", "~")):
        raise ModelNotFoundError(ref, "no such folder, and it is not a Hub repo id (org/name[@revision])")
    return _open_hub(ref)


def _open_folder(root: Path, ref: ModelRef, hash_content: bool) -> ModelSource:
    files = _weight_files(root, str(ref.id))
    tensors: dict[str, TensorInfo] = {}
    for file in files:
        with open_safetensors(file) as f:
            try:
                for name in f.keys():
                    sl = f.get_slice(name)
                    tensors[name] = TensorInfo(name, sl.get_dtype(), tuple(sl.get_shape()), file)
            except SafetensorError as e:
                raise CorruptFileError(str(file), str(e)) from e
    bad = [t for t in tensors.values() if t.dtype not in RAW_NUMPY]
    if bad:
        raise CorruptFileError(str(bad[0].file), f"tensor {bad[0].name} has unsupported dtype {bad[0].dtype}")
    config = _read_json(root / "config.json") if (root / "config.json").is_file() else {}
    hasher = _ContentHasher(files) if hash_content and ref.kind == "local" else None
    return ModelSource(ref=ref, root=root, tensors=tensors, config=config, _hash=hasher)


def _weight_files(root: Path, ref: str) -> list[Path]:
    indexes = sorted(root.glob("*.safetensors.index.json"))
    if indexes:
        index = _read_json(indexes[0])
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CorruptFileError(str(indexes[0]), "no weight_map")
        names = sorted(set(weight_map.values()))
        for n in names:
            if not isinstance(n, str) or Path(n).name != n:
                raise CorruptFileError(str(indexes[0]), f"shard name {n!r} is not a plain file name")
            if not (root / n).is_file():
                raise CorruptFileError(str(indexes[0]), f"shard {n} is missing")
        return [root / n for n in names]
    files = sorted(root.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in root.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise PickleOnlyError(ref, pickles)
    raise ModelNotFoundError(ref, f"{root} has no *.safetensors weights")


def _read_json(path: Path) -> dict[str, Any]:
    from ._untrusted import read_json

    data = read_json(path, error=lambda reason: CorruptFileError(str(path), f"invalid JSON: {reason}"))
    if not isinstance(data, dict):
        raise CorruptFileError(str(path), "expected a JSON object")
    return data


@contextmanager
def _hub_errors(ref: str, revision: str | None) -> Iterator[None]:
    """huggingface_hub's errors while opening model ``ref``, as one-line rvhub errors naming it: each HTTP
    status with its own reason, an answer the library could not use as a refusal, never a traceback."""
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        NotASafetensorsRepoError,
        RevisionNotFoundError,
        SafetensorsParsingError,
    )

    try:
        yield
    except RvhubError:
        raise
    except RevisionNotFoundError as e:
        raise ModelNotFoundError(ref, f"revision {revision!r} does not exist") from e
    except NotASafetensorsRepoError as e:
        raise ModelNotFoundError(ref, "the repo has no *.safetensors weights") from e
    except SafetensorsParsingError as e:
        raise CorruptFileError(ref, f"safetensors header: {_first_line(e)}") from e
    except Exception as e:
        cause = _cause(e)
        if isinstance(cause, RvhubError):
            raise cause from e
        if isinstance(cause, HfHubHTTPError):
            raise _status_error(ref, cause.response, "reading the repo") from e
        if cause is not None:  # a transport error
            raise HubModelError(ref, f"the connection to the Hub failed ({type(cause).__name__})") from e
        if isinstance(e, LocalEntryNotFoundError):
            raise ModelNotFoundError(ref, "not in the local cache and the Hub is unreachable") from e
        if isinstance(e, OSError) and "Consistency check failed" in str(e):
            raise HubModelError(ref, "the server sent a file of another size than it declared") from e
        if isinstance(e, (ValueError, TypeError, KeyError, AttributeError, IndexError)):
            raise HubModelError(ref, f"the server sent an answer rvhub cannot read ({type(e).__name__}: "
                                     f"{_first_line(e)})") from e
        raise


def _first_line(e: BaseException) -> str:
    lines = str(e).splitlines()
    return ascii(lines[0] if lines else "")[1:-1][:200]


def _cause(e: BaseException) -> BaseException | None:
    """The first rvhub error, HTTP status error or transport error in ``e``'s cause chain (``e`` included)."""
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    seen: set[int] = set()
    current: BaseException | None = e
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, (RvhubError, HfHubHTTPError, httpx2.TransportError)):
            return current
        current = current.__cause__ or current.__context__
    return None


def _status_error(ref: str, response: Any, step: str) -> RvhubError:
    """One reason per HTTP status: denied (401/403), not found (404), rate-limited (429), server error (5xx)."""
    from huggingface_hub import get_token

    status = int(response.status_code)
    if status == 401:
        why = ("the Hub refused the token (from HF_TOKEN or `hf auth login`); check that it is valid, or the repo "
               "is private" if get_token() else "the Hub asks for a token (the repo may be private or gated)")
        return HubModelError(ref, f"{step}: {why}")
    if status == 403:
        return HubModelError(ref, f"{step}: access denied (403); the token may not read this repo")
    if status == 404:
        return ModelNotFoundError(ref, f"{step}: the Hub answered 404 (not found), or the token may not read it")
    if status == 429:
        wait = response.headers.get("Retry-After", "")
        after = f"try again in {wait.strip()} s" if re.fullmatch(r"\s*\d{1,7}\s*", wait) else "wait and try again"
        return HubModelError(ref, f"{step}: the Hub is rate-limiting requests (429); {after}")
    if status >= 500:
        return HubModelError(ref, f"{step}: the Hub answered {status} (server error); try again later")
    return HubModelError(ref, f"{step}: the Hub answered HTTP {status}")


def _hub_files(repo_id: str, commit: str, declared: dict[str, int | None], weights: set[str]) -> Path:
    """Download ``declared`` (name -> size the listing declares) one at a time into the Hugging Face cache, each
    capped at its declared size (side files also at :data:`_hub_guard.MAX_SIDE_FILE_BYTES`); the snapshot
    folder, every file proven to lie inside the repo's cache folder."""
    from huggingface_hub import hf_hub_download

    from . import _hub_guard as guard

    root = guard.repo_cache(repo_id)
    for name, size in declared.items():
        limit = size if size is not None else (1 << 60 if name in weights else guard.MAX_SIDE_FILE_BYTES)
        if name not in weights:
            limit = min(limit, guard.MAX_SIDE_FILE_BYTES)
        guard.check_tree_cache(repo_id, commit)
        with guard.bounded(repo_id, name, limit, declared=size is not None):
            path = Path(hf_hub_download(repo_id, name, revision=commit))
        guard.contained(path, root, repo_id, f"the cached {name}")
    return root / "snapshots" / commit


def _listing(repo_id: str, revision: str | None, ref: str, files_metadata: bool) -> tuple[str, dict[str, int | None]]:
    """The commit ``revision`` resolves to and the repo's top-level files there (name -> declared size)."""
    from huggingface_hub import HfApi

    from . import _hub_guard as guard

    with guard.bounded(repo_id, "the repo info", guard.MAX_API_BYTES):
        info = HfApi().model_info(repo_id, revision=revision, files_metadata=files_metadata)
    if not isinstance(info.sha, str) or not guard.SHA1.fullmatch(info.sha):
        raise HubModelError(ref, f"the Hub sent a commit id that is not a 40-digit hex sha1 ({ascii(info.sha)[:60]})")
    files: dict[str, int | None] = {}
    for sibling in info.siblings or []:
        name = sibling.rfilename
        if not isinstance(name, str) or not _PLAIN_NAME.fullmatch(name) or name in (".", ".."):
            continue  # files in sub-folders (or odd names) are never read
        size = sibling.size
        files[name] = size if isinstance(size, int) and size >= 0 else None
    return info.sha, files


def _check_cached(root: Path, repo_id: str) -> None:
    """Every file of a cached snapshot (offline) lies inside the repo's cache folder."""
    from . import _hub_guard as guard

    for path in root.iterdir():
        guard.contained(path, guard.repo_cache(repo_id), repo_id, f"the cached {path.name}")


def _open_hub(ref: str) -> ModelSource:
    from huggingface_hub import constants, snapshot_download

    from . import _hub_guard as guard

    repo_id, _, revision = ref.partition("@")
    rev = revision or None
    with _hub_errors(ref, revision):
        guard.install()
        if constants.HF_HUB_OFFLINE:  # the cache alone answers
            root = Path(snapshot_download(
                repo_id, revision=rev, allow_patterns=["*.safetensors", "*.safetensors.index.json", *SIDE_FILES],
            ))
            _check_cached(root, repo_id)
        else:
            commit, files = _listing(repo_id, rev, ref, files_metadata=True)
            if not any(f.endswith(".safetensors") for f in files):
                pickles = [f for f in files if f.endswith(PICKLE_SUFFIXES)]
                if pickles:
                    raise PickleOnlyError(ref, pickles)
                raise ModelNotFoundError(ref, "the repo has no *.safetensors weights")
            weights = {f for f in files if f.endswith((".safetensors", ".safetensors.index.json"))}
            wanted = {f: size for f, size in files.items() if f in weights or f in SIDE_FILES}
            root = _hub_files(repo_id, commit, wanted, weights)
    commit_name = root.name if re.fullmatch(r"[0-9a-f]{40}", root.name) else None
    return _open_folder(root, ModelRef(kind="hub", id=repo_id, revision=rev, commit=commit_name), False)


@dataclass
class RemoteModel(ModelSource):
    """A Hub model known by its safetensors headers and small side files (config, tokenizer), whose weights
    are read only by byte range: enough for ``rvhub check``, never a download of the weights.

    ``root`` is the local snapshot of the side files; ``TensorInfo.file`` is the weight file's path in the
    repo. :meth:`read_span` is the only way to read weights.
    """

    repo_id: str = ""
    commit: str = ""
    _data_offsets: dict[str, int] = field(default_factory=dict, repr=False)  # tensor -> start in its file's data
    _offsets: dict[str, int] = field(default_factory=dict, repr=False)  # file -> byte offset of its data

    def read_np(self, name: str) -> np.ndarray:
        info = self.tensors[name]
        return self.read_span_np(name, 0, info.numel).reshape(info.shape)

    def iter_chunks_np(self, name: str, chunk_elems: int = CHUNK_ELEMS) -> Iterator[np.ndarray]:
        raise NotImplementedError("a RemoteModel is read by span only; open_model downloads the weights")

    def read_block_np(self, name: str, block: tuple[int, int] | None) -> np.ndarray:
        raise NotImplementedError("a RemoteModel is read by span only; open_model downloads the weights")

    def read_span_np(self, name: str, start: int, length: int) -> np.ndarray:
        from huggingface_hub import get_session, hf_hub_url
        from huggingface_hub.utils import build_hf_headers  # type: ignore[attr-defined]  # public, not in __all__

        from . import _hub_guard as guard

        info = self.tensors[name]
        filename = str(info.file)
        url = hf_hub_url(self.repo_id, filename, revision=self.commit)
        guard.install()
        if filename not in self._offsets:
            head = _range_get(get_session(), url, build_hf_headers(), 0, 8, self.repo_id)
            self._offsets[filename] = 8 + int.from_bytes(head, "little")
        begin = self._offsets[filename] + self._data_offsets[name] + start * ITEMSIZE[info.dtype]
        data = _range_get(get_session(), url, build_hf_headers(), begin, length * ITEMSIZE[info.dtype], self.repo_id)
        return raw_view(bytearray(data), info.dtype)


def _range_get(session: Any, url: str, headers: dict[str, str], begin: int, size: int, ref: str) -> bytes:
    """Bytes [begin, begin + size) of ``url``, streamed: never more than ``size`` bytes are read, whatever the
    server declares or sends."""
    import httpx2

    if size == 0:
        return b""
    span = f"bytes {begin}-{begin + size - 1} of {url.rsplit('/', 1)[-1]}"
    wanted = {**headers, "Range": f"bytes={begin}-{begin + size - 1}", "Accept-Encoding": "identity"}
    content = bytearray()
    try:
        with session.stream("GET", url, headers=wanted, timeout=30) as response:
            if response.status_code not in (200, 206):
                raise _status_error(ref, response, f"reading {span}")
            if response.status_code == 200 and begin > 0:
                raise HubModelError(ref, f"reading {span}: the server ignored the Range request (answered 200 "
                                         "with the whole file); refused rather than downloading it")
            if response.headers.get("Content-Encoding", "identity").strip().lower() not in ("", "identity"):
                raise HubModelError(ref, f"reading {span}: the server compressed the answer although rvhub asked "
                                         "for identity")
            for chunk in response.iter_raw():
                content += chunk
                if len(content) >= size:
                    break
    except httpx2.TransportError as e:
        raise HubModelError(ref, f"reading {span}: the connection to the Hub failed ({type(e).__name__}); "
                                 "nothing was written") from e
    if len(content) < size:
        raise CorruptFileError(url, f"expected {size} bytes at {begin}, got {len(content)}")
    return bytes(content[:size])


def open_remote(ref: str) -> ModelSource:
    """Open a Hub model (``org/name[@revision]``) for checking, without downloading its weights.

    Resolves the revision to a commit, reads every safetensors header by HTTP Range requests
    (``get_safetensors_metadata``) and fetches config.json and the tokenizer files. Offline
    (``HF_HUB_OFFLINE=1``) a model in the local cache is opened as a folder instead.
    """
    from huggingface_hub import HfApi, constants

    from . import _hub_guard as guard

    if constants.HF_HUB_OFFLINE:
        return open_model(ref, hash_content=False)
    if not _REPO_RE.fullmatch(ref) or ref.startswith((".", "/", "~")):
        raise ModelNotFoundError(ref, "no such folder, and it is not a Hub repo id (org/name[@revision])")
    repo_id, _, revision = ref.partition("@")
    with _hub_errors(ref, revision):
        guard.install()
        commit, files = _listing(repo_id, revision or None, ref, files_metadata=False)
        with guard.bounded(repo_id, "a safetensors header", guard.SAFETENSORS_HEADER_BYTES):
            meta = HfApi().get_safetensors_metadata(repo_id, revision=commit)
        side = {n: files[n] for n in SIDE_FILES if n in files}
        root = _hub_files(repo_id, commit, side, set())
    tensors: dict[str, TensorInfo] = {}
    offsets: dict[str, int] = {}
    for filename, file_meta in meta.files_metadata.items():
        for name, t in file_meta.tensors.items():
            if t.dtype not in RAW_NUMPY:
                raise CorruptFileError(f"{ref}/{filename}", f"tensor {name} has unsupported dtype {t.dtype}")
            if any(not isinstance(d, int) or d < 0 for d in t.shape) or not isinstance(t.data_offsets[0], int) \
                    or t.data_offsets[0] < 0:
                raise CorruptFileError(f"{ref}/{filename}", f"tensor {name} has an invalid shape or offset")
            tensors[name] = TensorInfo(name, t.dtype, tuple(t.shape), Path(filename))
            offsets[name] = int(t.data_offsets[0])
    config = _read_json(root / "config.json") if (root / "config.json").is_file() else {}
    return RemoteModel(
        ref=ModelRef(kind="hub", id=repo_id, revision=revision or None, commit=commit), root=root,
        tensors=tensors, config=config, repo_id=repo_id, commit=commit, _data_offsets=offsets,
    )
