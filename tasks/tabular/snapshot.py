"""Pin an input once: the run checks, digests and trains on one copy, not on a file that may change.

A file appended to while a run read it gave each step a different file, and a recorded digest that
matched neither what was checked nor what was trained. So the first step copies the input's files
into `<datasets root>/inputs/<digest>/`, hashing the bytes as it copies them: every later step reads
that copy, whose digest is by construction the recorded one (the same digest `refs.content_digest`
gives the source, so caching and lineage are unchanged). Copies are content-addressed: the same
content is kept once. Errors about the copy are reported in the user's terms (`reported_as`).
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import PurePosixPath

from pydantic import BaseModel, ConfigDict

from tasks.steps.errors import DataValidationError
from tasks.steps.refs import DatasetRef

FOLDER = "inputs"
_CHUNK = 1 << 20


class PinnedInput(BaseModel):
    """Where a run's input came from, and the copy every step reads."""

    model_config = ConfigDict(frozen=True)

    source: str
    uri: str
    digest: str


def pin(location: str, files: Sequence[str], datasets_root: str) -> PinnedInput:
    """Copy `files` (the file `location`, or the files below the folder `location`) to
    `<datasets_root>/inputs/<digest>/`, keeping their names; the digest is of the bytes copied."""
    import fsspec

    _, source_root = fsspec.core.url_to_fs(location)
    target_fs, inputs = fsspec.core.url_to_fs(f"{datasets_root.rstrip('/')}/{FOLDER}")
    staging = f"{inputs}/.pinning-{uuid.uuid4().hex}"
    name = PurePosixPath(source_root.rstrip("/")).name or "input"
    digest = hashlib.sha256()
    try:
        for url in files:
            source_fs, path = fsspec.core.url_to_fs(url)
            relative = path[len(source_root) :]
            digest.update(relative.encode())
            target = f"{staging}/{name}{relative}"
            target_fs.makedirs(str(PurePosixPath(target).parent), exist_ok=True)
            with source_fs.open(path, "rb") as reader, target_fs.open(target, "wb") as writer:
                while chunk := reader.read(_CHUNK):
                    digest.update(chunk)
                    writer.write(chunk)
        # by content, then by name: two files with the same bytes under other names are both kept
        final = f"{inputs}/{digest.hexdigest()}/{name}"
        if not target_fs.exists(final):
            target_fs.makedirs(str(PurePosixPath(final).parent), exist_ok=True)
            try:
                target_fs.mv(f"{staging}/{name}", final, recursive=True)
            except OSError:
                if not target_fs.exists(final):  # not a concurrent run pinning the same content
                    raise
    finally:
        if target_fs.exists(staging):
            target_fs.rm(staging, recursive=True)
    uri = target_fs.unstrip_protocol(final) if "://" in datasets_root else final
    return PinnedInput(source=location, uri=uri, digest=digest.hexdigest())


def in_user_terms(exc: DataValidationError, ref: DatasetRef | None) -> DataValidationError:
    """The same error, naming the user's file instead of the pinned copy `ref` reads."""
    if ref is None or ref.source is None or not exc.file.startswith(ref.uri):
        return exc
    return DataValidationError(ref.source + exc.file[len(ref.uri) :], exc.rule, exc.column)


@contextmanager
def reported_as(ref: DatasetRef | None) -> Iterator[None]:
    """Errors raised while reading a pinned copy name the user's file."""
    try:
        yield
    except DataValidationError as exc:
        mapped = in_user_terms(exc, ref)
        if mapped is exc:
            raise
        raise mapped from exc
