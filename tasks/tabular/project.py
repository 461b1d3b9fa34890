"""The project's own defaults for the tabular flows: `keel.toml`, or `[tool.keel]` in `pyproject.toml`.

    # keel.toml, next to where you run the flows
    data = "landing/customers.parquet"
    target = "churned"
    time_column = "signup_date"
    key_columns = ["customer_id"]
    drop_columns = ["customer_id"]
    model_name = "churn"

The pipeline, monitor, retrain, backtest and the deployments read it when their parameters are
made, so they don't repeat flags; a flag given wins. It is read from the working directory (the
first of `keel.toml` and `pyproject.toml` that has the table). A relative `data` path is taken
relative to the file. Unknown keys are refused: a typo must not silently fall back to a default.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

KEYS = frozenset({"data", "target", "time_column", "key_columns", "drop_columns", "model_name", "task"})
LISTS = frozenset({"key_columns", "drop_columns"})


class ProjectConfigError(ValueError):
    """The project's config file cannot be used (it says which file and why)."""


def project_config(folder: Path | None = None) -> dict[str, Any]:
    """The keys of the project's config (empty without one)."""
    folder = (folder or Path.cwd()).resolve()
    for name, table in (("keel.toml", ()), ("pyproject.toml", ("tool", "keel"))):
        path = folder / name
        if not path.is_file():
            continue
        try:
            values: Any = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ProjectConfigError(f"{path}: not valid TOML ({exc})") from exc
        for key in table:
            values = values.get(key) if isinstance(values, dict) else None
        if values is None:
            continue
        return _checked(values, path)
    return {}


def _checked(values: Any, path: Path) -> dict[str, Any]:
    where = f"{path}" + ("" if path.name == "keel.toml" else " [tool.keel]")
    if not isinstance(values, dict):
        raise ProjectConfigError(f"{where}: expected a table of keys")
    unknown = sorted(set(values) - KEYS)
    if unknown:
        raise ProjectConfigError(f"{where}: unknown keys {unknown}; the keys are {', '.join(sorted(KEYS))}")
    for key, value in values.items():
        if key in LISTS:
            if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
                raise ProjectConfigError(f"{where}: {key} must be a list of column names")
        elif not isinstance(value, str):
            raise ProjectConfigError(f"{where}: {key} must be a string")
    checked = dict(values)
    data = checked.get("data")
    if data and "://" not in data and not Path(data).expanduser().is_absolute():
        checked["data"] = str((path.parent / data).resolve())
    return checked


# The bike-sharing demo's columns: assumed only when the data is the demo file itself.
DEMO_DATA = Path(__file__).resolve().parents[2] / "data" / "bike_sharing_hourly.csv"
DEMO_TABLE: dict[str, Any] = {
    "target": "cnt",
    "time_column": "dteday",
    "drop_columns": ["instant", "casual", "registered"],  # an id; casual + registered add up to cnt
    "key_columns": ["dteday", "hr"],
    "model_name": "bike-demand",
}


def is_demo_data(data: str) -> bool:
    return "://" not in data and Path(data).expanduser().resolve() == DEMO_DATA


def model_name_from(data: str) -> str:
    """A registered model's name from a data location: its file or folder name, in the characters a
    model name allows (`sales-2026.parquet` -> `sales-2026`)."""
    stem = Path(data.rstrip("/").split("://")[-1]).name.split(".")[0]
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-._")[:200]
    return name or "model"


def configured_model_name(values: Any) -> Any:
    """A flow's raw parameters with `model_name` taken from the project's config when not given (for
    a `mode="before"` validator of flows that act on a registered model, not on a table)."""
    return table_defaults(values, {"model_name"}, complete=False) if isinstance(values, dict) else values


def require_model_name(name: str | None, job: str) -> str:
    """The model a flow `job`s; refuses parameters that name none (nothing can be derived)."""
    if not name:
        raise ValueError(
            f"--model-name is needed: which registered model to {job} (or model_name in keel.toml)"
        )
    return name


def table_defaults(values: dict[str, Any], fields: Iterable[str], complete: bool = True) -> dict[str, Any]:
    """Parameters of a tabular flow with what was not given filled in: first from the project's
    config, then — for the demo data only — the demo's columns, else what holds for any table (no
    dropped columns, the time column as the key, a model name from the data's name). `fields`: the
    flow's parameter names (only those are filled). `complete=False`: the config only (a retrain
    takes the rest from its champion's execution)."""
    fields = set(fields)
    given = {k: v for k, v in values.items() if v is not None}
    filled = {k: v for k, v in project_config().items() if k in fields and k not in given}
    filled.update(given)
    if not complete:
        return filled
    data = filled.get("data")
    if data is None and "data" in fields:
        data = filled["data"] = str(DEMO_DATA)
    if data is None:
        return filled
    if is_demo_data(data):
        for key, value in DEMO_TABLE.items():
            if key in fields:
                filled.setdefault(key, value)
        return filled
    for key in ("target", "time_column"):
        if key in fields and not filled.get(key):
            raise ValueError(
                f"--{key.replace('_', '-')} is needed for {data}: which column "
                + ("to predict" if key == "target" else "orders the rows in time")
                + f" (or set {key} in keel.toml)"
            )
    if "drop_columns" in fields:
        filled.setdefault("drop_columns", [])
    if "key_columns" in fields:
        filled.setdefault("key_columns", [filled["time_column"]] if filled.get("time_column") else [])
    if "model_name" in fields:
        filled.setdefault("model_name", model_name_from(data))
    return filled
