"""The served model's door beyond loopback: a bearer token in front of MLflow's scoring server, which
authenticates nobody.

    KEEL_SERVING_TOKEN=... python -m deployments.gateway --upstream http://127.0.0.1:5602 --host 0.0.0.0 --port 5601
    curl -s HOST:5601/invocations -H "Authorization: Bearer $KEEL_SERVING_TOKEN" -H 'Content-Type: application/json' -d ...

`POST /invocations` needs `Authorization: Bearer <KEEL_SERVING_TOKEN>` (compared in constant time)
and a body of at most `--max-body-mb`; it is passed to the scoring server and its answer returned
as it is (a 4xx for a malformed body stays a 4xx). `GET /ping` and `/health` answer without a token
(probes; they tell only whether a model is served). Anything else: 404. `deployments.serving` starts
this in front of the scoring server when a token is set; it refuses an address beyond loopback
without one.
"""

from __future__ import annotations

import argparse
import contextlib
import hmac
import os
import sys
from collections.abc import Sequence

TOKEN_VARIABLE = "KEEL_SERVING_TOKEN"
MIN_TOKEN_CHARS = 16
MAX_BODY_MB = 64.0


def token_from_env() -> str | None:
    """The token, or None when unset; a token too short to resist guessing is refused."""
    token = os.environ.get(TOKEN_VARIABLE, "").strip()
    if not token:
        return None
    if len(token) < MIN_TOKEN_CHARS:
        raise ValueError(
            f"{TOKEN_VARIABLE} is too short ({len(token)} characters, at least {MIN_TOKEN_CHARS})"
        )
    return token


def _error(status: int, code: str, message: str, **headers: str):
    from starlette.responses import JSONResponse

    return JSONResponse({"error_code": code, "message": message}, status, headers=headers)


async def _body(request, max_body_bytes: int) -> bytes | None:
    """The request's body, or None when it is over the limit (declared or streamed)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_body_bytes:
        return None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_body_bytes:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def app(upstream: str, token: str, max_body_bytes: int):
    """The gateway as an ASGI app."""
    import httpx
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    client = httpx.AsyncClient(base_url=upstream, timeout=httpx.Timeout(120, connect=5))
    expected = f"Bearer {token}".encode()

    async def invocations(request: Request) -> Response:
        given = request.headers.get("authorization", "").encode("latin-1")
        if not hmac.compare_digest(given, expected):
            return _error(
                401, "UNAUTHENTICATED", "send the serving token: Authorization: Bearer <token>",
                **{"WWW-Authenticate": 'Bearer realm="keel-serving"'},
            )  # fmt: skip
        body = await _body(request, max_body_bytes)
        if body is None:
            return _error(413, "REQUEST_TOO_LARGE", f"the body is over {max_body_bytes / 2**20:g} MiB")
        try:
            answer = await client.post(
                "/invocations",
                content=body,
                headers={"Content-Type": request.headers.get("content-type", "application/json")},
            )
        except httpx.TransportError:
            return _error(
                503, "UNAVAILABLE", "no model is served right now (starting, or moving to a new version)"
            )
        return Response(answer.content, answer.status_code, media_type=answer.headers.get("content-type"))

    async def ping(request: Request) -> Response:
        try:
            answer = await client.get("/ping")
        except httpx.TransportError:
            return Response(status_code=503)
        return Response(status_code=200 if answer.is_success else 503)

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette):
        yield
        await client.aclose()

    return Starlette(
        routes=[
            Route("/invocations", invocations, methods=["POST"]),
            Route("/ping", ping, methods=["GET"]),
            Route("/health", ping, methods=["GET"]),
        ],
        lifespan=lifespan,
    )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m deployments.gateway",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--upstream", required=True, help="The scoring server, e.g. http://127.0.0.1:5602.")
    p.add_argument("--host", default="127.0.0.1", help="Address to listen on (default: %(default)s).")
    p.add_argument("--port", type=int, default=5601, help="Port (default: %(default)s).")
    p.add_argument(
        "--max-body-mb", type=float, default=MAX_BODY_MB, help="Largest request body (default: %(default)s)."
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        token = token_from_env()
    except ValueError as exc:
        parser().error(str(exc))
    if token is None:
        parser().error(f"{TOKEN_VARIABLE} is not set: the gateway exists to require it")
    if not args.upstream.startswith(("http://127.", "http://localhost")):
        parser().error("--upstream must be a scoring server on loopback (http://127.0.0.1:PORT)")
    import uvicorn

    uvicorn.run(
        app(args.upstream.rstrip("/"), token, int(args.max_body_mb * 2**20)),
        host=args.host,
        port=args.port,
        log_level="warning",
        access_log=False,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
