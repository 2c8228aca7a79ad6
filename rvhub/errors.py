"""Errors rvhub raises. Each carries the fields a user needs to fix the input and says what would be valid.

The CLI prints ``str(error)`` as one line and exits with code 1; library callers can read the fields.
"""

from __future__ import annotations

from collections.abc import Sequence


class RvhubError(Exception):
    """Base class of every error rvhub raises on purpose."""


class ModelNotFoundError(RvhubError):
    """A model reference is neither an existing folder nor a reachable Hub repo (or revision)."""

    def __init__(self, ref: str, reason: str) -> None:
        self.ref = ref
        super().__init__(f"model {ref!r} not found: {reason}")


class PickleOnlyError(RvhubError):
    """The checkpoint has only pickle weights; rvhub never unpickles."""

    def __init__(self, ref: str, files: Sequence[str]) -> None:
        self.ref = ref
        self.files = list(files)
        super().__init__(
            f"{ref!r} has only pickle weights ({', '.join(self.files[:3])}); rvhub reads safetensors only "
            "and never unpickles. Convert it where you trust the file: "
            "AutoModelForCausalLM.from_pretrained(PATH).save_pretrained(NEW_PATH) writes safetensors"
        )


class CorruptFileError(RvhubError):
    """A safetensors file or index is truncated, malformed or inconsistent."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        super().__init__(f"cannot read {path}: {reason}")


class ShapeMismatchError(RvhubError):
    """Two tensors that must have equal shapes do not."""

    def __init__(self, tensor: str, shape_a: Sequence[int], shape_b: Sequence[int], a: str, b: str) -> None:
        self.tensor = tensor
        self.shapes = (tuple(shape_a), tuple(shape_b))
        super().__init__(
            f"shape mismatch for {tensor}: {list(shape_a)} in {a} vs {list(shape_b)} in {b}"
        )


class VocabMismatchError(ShapeMismatchError):
    """Embedding rows differ between the vector and the target model."""

    def __init__(self, tensor: str, rows_vector: int, rows_target: int) -> None:
        self.rows = (rows_vector, rows_target)
        ShapeMismatchError.__init__(self, tensor, (rows_vector,), (rows_target,), "vector", "target")
        self.args = (
            f"vocabulary size differs for {tensor}: {rows_vector} rows in the vector, {rows_target} in the "
            "target; pass --allow-vocab-mismatch to apply the delta to the common rows only",
        )


class MissingTensorError(RvhubError):
    """Tensors present in one model but not in the other."""

    def __init__(self, tensors: Sequence[str], present_in: str, missing_in: str) -> None:
        self.tensors = list(tensors)
        shown = ", ".join(self.tensors[:5]) + (f" (+{len(self.tensors) - 5} more)" if len(self.tensors) > 5 else "")
        super().__init__(
            f"{len(self.tensors)} tensor(s) in {present_in} but not in {missing_in}: {shown}; "
            "both models must have the same architecture"
        )


class NonFiniteError(RvhubError):
    """NaN or Inf in an input of a delta or in a result."""

    def __init__(self, tensor: str, where: str, count: int) -> None:
        self.tensor = tensor
        self.where = where
        self.count = count
        super().__init__(f"{count} NaN/Inf value(s) in {tensor} ({where}); refusing to write a broken model")


class TiedEmbeddingError(RvhubError):
    """The vector changes lm_head separately from the embeddings but the target ties them."""

    def __init__(self, tensor: str) -> None:
        self.tensor = tensor
        super().__init__(
            f"the vector changes {tensor} separately from the input embeddings, but the target ties them "
            "(tie_word_embeddings=true); applying it would need an untied model"
        )


class OutputExistsError(RvhubError):
    """The output path exists and --overwrite was not given."""

    def __init__(self, path: str) -> None:
        self.path = path
        super().__init__(f"output {path} already exists; pass --overwrite to replace it (it was not touched)")


class VectorFormatError(RvhubError):
    """A vector folder is missing files or is inconsistent with its manifest; ``field`` names the card
    field at fault, when it is one."""

    def __init__(self, path: str, reason: str, field: str | None = None) -> None:
        self.path = path
        self.field = field
        super().__init__(f"{path} is not a valid rvhub vector: {reason}")


class InvalidOptionError(RvhubError):
    """An option value that cannot work (e.g. a dtype rvhub does not write)."""

    def __init__(self, option: str, value: object, allowed: str) -> None:
        self.option = option
        self.value = value
        super().__init__(f"invalid {option} {value!r}: {allowed}")


class UnsupportedTensorError(RvhubError):
    """A tensor whose difference rvhub cannot take (not floating point) differs between the models."""

    def __init__(self, tensor: str, dtype: str) -> None:
        self.tensor = tensor
        self.dtype = dtype
        super().__init__(
            f"{tensor} has dtype {dtype} (not floating point) and differs between the models; "
            "only floating-point tensors can carry a delta"
        )


class ExactnessError(RvhubError):
    """An element whose difference cannot be stored so that from + v reproduces to exactly."""

    def __init__(self, tensor: str, count: int) -> None:
        self.tensor = tensor
        self.count = count
        super().__init__(
            f"{count} element(s) of {tensor} cannot be encoded exactly in float32 arithmetic; "
            "use --format dense (lossy for these elements)"
        )


class IntegrityError(RvhubError):
    """A file of a vector folder does not match the sha256 (or size) its card records, or is missing."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        super().__init__(f"{path}: {reason}; the folder was altered or damaged (re-download or re-extract it)")


class IncompatibleError(RvhubError):
    """The target failed a compatibility check against the vector's fingerprints (``rvhub check``)."""

    def __init__(self, target: str, failures: Sequence[tuple[str, str]]) -> None:
        self.target = target
        self.failures = list(failures)
        shown = "; ".join(f"{name}: {why}" for name, why in self.failures)
        super().__init__(
            f"{target} failed the compatibility check ({shown}); `rvhub check VEC --base TARGET` shows every "
            "check; pass --force to apply anyway"
        )


class RegistryError(RvhubError):
    """A registry (the Hub or a local registry folder) cannot do what was asked."""

    def __init__(self, repo_id: str, message: str) -> None:
        self.repo_id = repo_id
        super().__init__(message)


class RepoNotFoundError(RegistryError):
    """The repo does not exist in the registry, or the token may not read it."""

    def __init__(self, repo_id: str, where: str) -> None:
        self.where = where
        super().__init__(
            repo_id,
            f"vector repo {repo_id!r} not found in {where}; check the id (org/name), and for a private repo "
            "that your token may read it",
        )


class RevisionNotFoundError(RegistryError):
    """The repo exists but has no such branch or commit."""

    def __init__(self, repo_id: str, revision: str, known: list[str] | None = None) -> None:
        self.revision = revision
        hint = f"; branches: {', '.join(known)}" if known else "; use a branch name or a commit hash"
        super().__init__(repo_id, f"revision {revision!r} not found in {repo_id!r}{hint}")


class AuthError(RegistryError):
    """No token where one is needed, or the registry refused it. Never carries the token itself."""

    def __init__(self, repo_id: str, reason: str) -> None:
        super().__init__(repo_id, f"{repo_id}: {reason}")


class RegistryUnavailableError(RegistryError):
    """The registry failed (server error, dropped connection) after retries; nothing was written."""

    def __init__(self, repo_id: str, action: str, reason: str) -> None:
        self.action = action
        super().__init__(repo_id, f"{action} {repo_id} failed: {reason}")


class DownloadIntegrityError(IntegrityError):
    """A file fetched from a registry is missing or does not match the size and sha256 its card records."""

    def __init__(self, ref: str, file: str, where: str, missing: bool = False) -> None:
        IntegrityError.__init__(self, f"{ref}/{file}", "")
        self.ref = ref
        self.file = file
        what = "is missing" if missing else "does not match the size and sha256 in the vector's card"
        self.args = (
            f"{file} of {ref} from {where} {what}: refused, nothing was written (the bad copy was dropped "
            "from the cache; if pulling again fails the same way, the registry's copy is damaged)",
        )


class MissingExtraError(RvhubError):
    """An optional dependency group (``pip install rvhub[extra]``) that a feature needs is not installed."""

    def __init__(self, extra: str, purpose: str) -> None:
        self.extra = extra
        super().__init__(f"{purpose} needs the optional '{extra}' dependencies: pip install 'rvhub[{extra}]'")
