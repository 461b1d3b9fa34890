"""Where input data may come from: one policy that every flow applies before it reads a byte.

A location (a path, a `file://` or another fsspec URL) is normalised first: a local path is resolved
(`..` and links, as the system resolves them); in a URL, `..`, a query, a fragment or credentials are
refused, never interpreted. Its scheme must be allowed
(`KEEL_DATA_SCHEMES`, default: local files only). Then every file it stands for (a folder: every
file below it) is resolved, symbolic links included, and must lie under one of the allowed roots
(`KEEL_DATA_ROOTS`; unset: anywhere, the laptop default; the local stack, compose and Kubernetes set
it). The location itself is checked too, so a path outside the roots is refused before anything
learns whether it exists.

Refusals name the location, the file and the rule, never anything read from a file.
"""

from __future__ import annotations

import posixpath
import unicodedata
from pathlib import Path
from urllib.parse import unquote, urlsplit

from pydantic import BaseModel, Field

from tasks.steps.errors import DataValidationError
from tasks.steps.refs import file_urls

DEFAULT_SCHEMES = ("file",)


class DataAccess(BaseModel):
    """The allowed schemes and roots (None: any location with an allowed scheme)."""

    model_config = {"frozen": True}

    roots: tuple[str, ...] | None = Field(
        default=None, description="Folders or URL prefixes; None: anywhere."
    )
    schemes: tuple[str, ...] = DEFAULT_SCHEMES

    @classmethod
    def parse(cls, roots: str | None, schemes: str | None) -> DataAccess:
        """From the settings' comma-separated texts; a root that is not a data location is refused here."""
        allowed = tuple(
            s.strip().lower() for s in (schemes or ",".join(DEFAULT_SCHEMES)).split(",") if s.strip()
        )
        parsed = None
        if roots and roots.strip():
            parsed = tuple(_normalise_root(r.strip()) for r in roots.split(",") if r.strip())
        return cls(roots=parsed, schemes=allowed or DEFAULT_SCHEMES)

    def describe(self) -> str:
        where = ", ".join(self.roots) if self.roots is not None else "anywhere"
        return (
            f"data roots: {where} (KEEL_DATA_ROOTS); schemes: {', '.join(self.schemes)} (KEEL_DATA_SCHEMES)"
        )


def scheme_of(uri: str) -> str:
    return uri.split("://", 1)[0].lower() if "://" in uri else "file"


def normalise(uri: str) -> str:
    """The location as checked and read: a local resolved path, or `scheme://host/path`. Refuses what
    could mean two things: in a URL `..`, a query or fragment, credentials; control characters."""
    text = str(uri).strip()
    if not text or any(unicodedata.category(c) == "Cc" for c in text):  # control characters
        raise DataValidationError(repr(uri), "not a data location (empty, or control characters)")
    scheme = scheme_of(text)
    if scheme == "file":
        local = text[len("file://") :] if text.lower().startswith("file://") else text
        return str(Path(local).expanduser().resolve())  # `..` and links resolved as the system does
    parts = urlsplit(text)
    if parts.query or parts.fragment or text.endswith(("?", "#")):
        raise DataValidationError(text, "a data URL must not have a query or fragment ('?', '#')")
    if parts.username or parts.password:
        raise DataValidationError(
            "a URL with credentials",
            "credentials do not belong in a data URL; configure the filesystem instead",
        )
    path = unquote(parts.path)
    if ".." in path.split("/") or "\\" in path:
        raise DataValidationError(text, "'..' and '\\' are not allowed in a data URL; give the path itself")
    clean = posixpath.normpath(path) if path not in ("", "/") else "/"
    if path.endswith("/") and clean != "/":
        clean += "/"
    return f"{scheme}://{parts.netloc.lower()}{clean}"


def _normalise_root(root: str) -> str:
    clean = normalise(root)
    if scheme_of(clean) == "file":
        return str(Path(clean).resolve())
    return clean.rstrip("/")


def _inside(location: str, roots: tuple[str, ...]) -> bool:
    if scheme_of(location) == "file" and "://" not in location:
        real = Path(location).resolve()
        return any(scheme_of(r) == "file" and real.is_relative_to(r) for r in roots)
    return any(scheme_of(r) != "file" and (location == r or location.startswith(r + "/")) for r in roots)


def checked_location(uri: str, access: DataAccess) -> str:
    """The normalised location, if its scheme is allowed and it lies under the roots (the location
    itself, before its files are listed)."""
    location = normalise(uri)
    scheme = scheme_of(location)
    if scheme not in access.schemes:
        raise DataValidationError(
            location,
            f"the scheme {scheme!r} is not allowed ({access.describe()}); add it to KEEL_DATA_SCHEMES to read from it",
        )
    if access.roots is not None and not _inside(location, access.roots):
        raise DataValidationError(
            location, f"is outside the allowed data roots; nothing was read ({access.describe()})"
        )
    return location


def checked_local_path(uri: str, access: DataAccess, refusal: str) -> Path:
    """`checked_location` for what must be on this machine's filesystem (an output renamed into
    place, a folder walked): a remote URL is refused with `refusal`."""
    location = checked_location(uri, access)
    if "://" in location and not location.startswith("file://"):
        raise DataValidationError(uri, refusal)
    return Path(location.removeprefix("file://"))


def checked_files(uri: str, access: DataAccess) -> tuple[str, list[str]]:
    """The normalised location and every file it stands for, as readers take them, each checked against
    the roots with its links resolved: a link inside an allowed folder that points outside it is
    refused, by name."""
    location = checked_location(uri, access)
    files = file_urls(location)
    if access.roots is not None:
        for file in files:
            if not _inside(file, access.roots):
                raise DataValidationError(
                    file,
                    f"resolves outside the allowed data roots (a link?); nothing was read ({access.describe()})",
                )
    return location, files
