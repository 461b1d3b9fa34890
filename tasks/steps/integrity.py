"""Load only the model that was logged: every file's digest is recorded when the model is logged and
checked before the model is loaded.

The model is an MLflow "model from code": loading it runs `serving_model.py` and imports the code it
ships. Its files live in the artifact store, which anyone who can write there can change (the MLflow
server proxies artifacts). The manifest (file -> sha256) lives in the tracking store instead, as a
tag of the logged model, so changing a file of the model is not enough to change what is loaded.
`load_verified` copies the model's files to a private folder, checks them against the manifest (no
file changed, missing or added) and loads that copy, so what was checked is what runs.

What this does not cover: someone who can write the tracking store can change the manifest too;
that is what authentication on the MLflow server is for.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import tempfile
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from tasks.steps.fluent import point_fluent_api
from tasks.steps.process_folders import process_folder
from tasks.steps.tags import MANIFEST_TAG

# Written by MLflow itself into the copy when a registered model is downloaded (its name and version,
# YAML read with a safe loader): it cannot be known at logging time, and is never code.
WRITTEN_ON_DOWNLOAD = frozenset({"registered_model_meta"})
_CHUNK = 1 << 20
_LOGGED = re.compile(r"m-[0-9a-f]{32}")


class ModelIntegrityError(RuntimeError):
    """The model's files are not those that were logged: nothing of it was loaded."""


def file_digests(root: Path) -> dict[str, str]:
    """sha256 of every file below `root`, by its path relative to `root` (POSIX separators)."""
    digests: dict[str, str] = {}
    for path in sorted(root.rglob("*")):
        if path.is_symlink():
            raise ModelIntegrityError(
                f"the model holds a symbolic link, {path.relative_to(root).as_posix()!r}"
            )
        if not path.is_file():
            continue
        name = path.relative_to(root).as_posix()
        if name in WRITTEN_ON_DOWNLOAD:
            continue
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
        digests[name] = digest.hexdigest()
    return digests


def _copy(model_uri: str, into: Path) -> Path:
    """The model's files, copied into `into` (never the artifact store's own folder)."""
    import mlflow

    return Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(into)))


def record_manifest(model_id: str, model_uri: str) -> dict[str, str]:
    """Right after logging: digest the model's files as stored and keep the manifest in the tracking
    store (a tag of the logged model)."""
    import mlflow

    with tempfile.TemporaryDirectory(prefix="keel-model-") as tmp:
        manifest = file_digests(_copy(model_uri, Path(tmp)))
    mlflow.set_logged_model_tags(model_id, {MANIFEST_TAG: json.dumps(manifest, separators=(",", ":"))})
    return manifest


def logged_model_id(model_uri: str) -> str:
    """The logged model behind a `models:/` URI: `models:/m-<id>`, `models:/NAME/VERSION` or
    `models:/NAME@ALIAS` (other URIs cannot be verified, so they are refused)."""
    from mlflow import MlflowClient

    if not model_uri.startswith("models:/"):
        raise ModelIntegrityError(
            f"{model_uri!r} is not a models:/ URI: only logged and registered models can be verified"
        )
    path = model_uri.removeprefix("models:/").strip("/")
    if _LOGGED.fullmatch(path):
        return path
    client = MlflowClient()
    if "@" in path:
        name, alias = path.rsplit("@", 1)
        version = client.get_model_version_by_alias(name, alias)
    else:
        name, _, number = path.rpartition("/")
        version = client.get_model_version(name, number)
    # A tracking server may leave `model_id` out of its answer; the source names the logged model.
    source = (version.source or "").removeprefix("models:/")
    model_id = version.model_id or (source if _LOGGED.fullmatch(source) else None)
    if not model_id:
        raise ModelIntegrityError(
            f"{model_uri} is not a logged model of MLflow 3 (no model id): cannot verify it"
        )
    return model_id


def manifest_of(model_id: str) -> dict[str, str]:
    from mlflow import MlflowClient

    text = MlflowClient().get_logged_model(model_id).tags.get(MANIFEST_TAG)
    if not text:
        raise ModelIntegrityError(
            f"the logged model {model_id} has no file manifest (tag {MANIFEST_TAG}): it was logged by an "
            "older version of keel, or not by keel, so its files cannot be verified. Train it again."
        )
    return json.loads(text)


def compare(expected: dict[str, str], found: dict[str, str], model_uri: str) -> None:
    """Refuse, naming the files, unless the files found are exactly those logged."""
    changed = sorted(n for n in expected if n in found and found[n] != expected[n])
    missing = sorted(n for n in expected if n not in found)
    added = sorted(n for n in found if n not in expected)
    problems = [
        f"{label}: {', '.join(names)}"
        for label, names in (("changed", changed), ("missing", missing), ("added", added))
        if names
    ]
    if problems:
        raise ModelIntegrityError(
            f"{model_uri}: the model's files are not those that were logged ({'; '.join(problems)}). "
            "Someone or something changed the artifact store; nothing of this model was loaded."
        )


def verified_copy(model_id: str, into: Path) -> Path:
    """A private copy of a logged model's files, checked against the manifest recorded at logging."""
    expected = manifest_of(model_id)
    local = _copy(f"models:/{model_id}", into)
    compare(expected, file_digests(local), f"models:/{model_id}")
    return local


def load_verified(model_uri: str, tracking_uri: str, registry_uri: str) -> Any:
    """`mlflow.pyfunc.load_model` of a verified private copy. An alias or version is resolved to its
    logged model first (so a moved alias loads the new champion), then each logged model is copied,
    verified and loaded once per process."""
    point_fluent_api(tracking_uri, registry_uri)
    if "@" in model_uri:  # an alias can move: asked each time
        model_id = logged_model_id(model_uri)
    else:  # a version or logged model never changes what it names: asked once per process
        model_id = _fixed_model_id(model_uri, tracking_uri, registry_uri)
    return _load_logged(model_id, tracking_uri, registry_uri)


@functools.lru_cache(maxsize=64)
def _fixed_model_id(model_uri: str, tracking_uri: str, registry_uri: str) -> str:
    return logged_model_id(model_uri)


@functools.lru_cache(maxsize=4)
def _load_logged(model_id: str, tracking_uri: str, registry_uri: str) -> Any:
    import mlflow

    from tasks.steps.requirements_check import check_requirements_quickly

    check_requirements_quickly()
    return mlflow.pyfunc.load_model(str(verified_folder(model_id, tracking_uri, registry_uri)))


@functools.lru_cache(maxsize=8)
def verified_folder(model_id: str, tracking_uri: str, registry_uri: str) -> Path:
    """A verified private copy of the logged model, made once per process and store (`load_verified`
    and `models.load_model` share it). It stays for the process's life: a model from code may import
    its shipped code lazily."""
    return verified_copy(model_id, process_folder("keel-verified-model"))


class ModelLocation(BaseModel):
    """Where a Dask worker loads a model from (the URI and the stores that resolve it)."""

    uri: str
    tracking_uri: str
    registry_uri: str

    def load(self) -> Any:
        """The model as a user loads it (`mlflow.pyfunc`), its files verified, once per worker process."""
        return load_verified(self.uri, self.tracking_uri, self.registry_uri)
