"""Prefect events about a registered model version: one resource shape for every event we emit, so
automations match them the same way (`keel.model.*`) and read the name and version from the resource."""

from __future__ import annotations

from typing import Any

from tasks.steps.tags import MODEL_NAME_TAG, MODEL_VERSION_TAG


def version_resource(name: str, version: str) -> dict[str, str]:
    """The event resource of a model version."""
    return {
        "prefect.resource.id": f"keel.model.{name}.v{version}",
        "prefect.resource.name": f"{name} v{version}",
        MODEL_NAME_TAG: name,
        MODEL_VERSION_TAG: str(version),
    }


def emit_about_version(
    event: str,
    name: str,
    version: str,
    payload: dict[str, Any],
    related: list[dict[str, str]] | None = None,
    event_id: Any = None,
) -> str | None:
    """Emit `event` about a model version; its id, or None where no Prefect server takes events."""
    from prefect.events import emit_event

    if not prefect_keeps_events():
        return None
    emitted = emit_event(
        event=event,
        resource=version_resource(name, version),
        related=related,
        payload=payload,
        **({"id": event_id} if event_id is not None else {}),
    )
    return str(emitted.id) if emitted is not None else None


def prefect_keeps_events() -> bool:
    """A Prefect server will keep an event: one is configured, or this runs in a flow or task run
    (whose server it is). Otherwise Prefect would start a temporary server only to drop the event
    with it."""
    from prefect.context import FlowRunContext, TaskRunContext
    from prefect.settings import PREFECT_API_URL

    return (
        bool(PREFECT_API_URL.value()) or FlowRunContext.get() is not None or TaskRunContext.get() is not None
    )
