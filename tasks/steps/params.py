"""A pipeline's parameters in groups: nested in the model (and in the Prefect UI's form, one section
per group), flat on the command line (`--n-trials`, not `--tuning-n-trials`).

A parameters model subclasses `Params`; each field typed as a `ParamGroup` subclass is a group. Flat
names are accepted wherever the model is made (`PipelineParams(n_trials=3)`, the CLI, parameters
stored by an earlier version), and routed into their group; a name in two groups is refused when the
model is defined, so the flat form is never ambiguous.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Self

from pydantic import BaseModel, model_validator
from pydantic.fields import FieldInfo


class ParamGroup(BaseModel):
    """Parameters that belong together (the split, tuning, ...): a section of a `Params` model."""


class Params(BaseModel):
    """A parameters model whose `ParamGroup` fields are also settable by their fields' own names."""

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        flat_fields(cls)  # refuses a name in two groups, when the class is defined

    @model_validator(mode="before")
    @classmethod
    def _route_flat_names(cls, values: Any) -> Any:
        return nest(cls, values) if isinstance(values, Mapping) else values

    def updated(self, **changes: Any) -> Self:
        """A copy with `changes` (flat names or whole groups), checked as new parameters are."""
        return self.model_validate({**flatten(type(self), self.model_dump()), **flatten(type(self), changes)})


def groups(model: type[BaseModel]) -> dict[str, type[ParamGroup]]:
    """The model's group fields and their models."""
    return {
        name: field.annotation
        for name, field in model.model_fields.items()
        if isinstance(field.annotation, type) and issubclass(field.annotation, ParamGroup)
    }


def flat_fields(model: type[BaseModel]) -> dict[str, tuple[str | None, FieldInfo]]:
    """Every settable field by its flat name: (its group or None, the field)."""
    found: dict[str, tuple[str | None, FieldInfo]] = {}
    grouped = groups(model)
    for name, field in model.model_fields.items():
        inner = grouped.get(name)
        members = inner.model_fields.items() if inner else [(name, field)]
        for member, member_field in members:
            if member in found:
                places = [found[member][0] or "the model itself", name if inner else "the model itself"]
                raise TypeError(
                    f"{model.__name__}: '{member}' is both in {places[0]} and in {places[1]}: "
                    f"--{member.replace('_', '-')} would be ambiguous"
                )
            found[member] = (name if inner else None, member_field)
    return found


def nest(model: type[BaseModel], values: Mapping[str, Any]) -> dict[str, Any]:
    """`values` with flat names moved into their groups (a flat value wins over the same field given
    inside its group)."""
    grouped = groups(model)
    owner = {member: group for group, inner in grouped.items() for member in inner.model_fields}
    nested: dict[str, Any] = {}
    flat: dict[str, dict[str, Any]] = {}
    for key, value in values.items():
        if key in owner and key not in model.model_fields:
            flat.setdefault(owner[key], {})[key] = value
        else:
            nested[key] = value
    for group, members in flat.items():
        inside = nested.get(group)
        inside = (
            inside.model_dump(exclude_unset=True) if isinstance(inside, BaseModel) else dict(inside or {})
        )
        nested[group] = {**inside, **members}
    return nested


def flatten(model: type[BaseModel], values: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of `nest`: group fields replaced by their members, under their flat names."""
    grouped = groups(model)
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if key in grouped and isinstance(value, Mapping | BaseModel):
            inner = value.model_dump() if isinstance(value, BaseModel) else value
            flat.update(inner)
        else:
            flat[key] = value
    return flat
