"""MLflow's basic-auth app as the stack, compose and Kubernetes run it: who exists and what they may do.

    python -m infra.mlflow_auth users --tracking-uri http://mlflow:5000   # compose/k8s: once MLflow answers
    python -m infra.mlflow_auth probe --tracking-uri http://localhost:5000 --host-header mlflow:5000

Users (besides MLflow's `admin`, which manages users; its password only bootstraps it on the first
start): `keel` (flows, workers, deployments: MANAGE on every experiment and registered model) and
`viewer` (READ on them: the UI for colleagues; it cannot write a run, a tag or an artifact). Anyone
the admin adds later sees nothing until granted (`default_permission = NO_PERMISSIONS`). Passwords
come from the environment (`MLFLOW_AUTH_ADMIN_PASSWORD`, `MLFLOW_KEEL_PASSWORD`,
`MLFLOW_VIEWER_PASSWORD`): a missing one stops with its name, never a default.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from http import HTTPStatus
from pathlib import Path

ADMIN = "admin"
APP_USER = "keel"
# every user besides the admin, with its permission on every experiment and registered model
VIEWER = "viewer"  # read-only: the UI for colleagues, and the model server
USERS = {APP_USER: "MANAGE", VIEWER: "READ"}
# A checked password is remembered this long (MLflow's own cache, keyed by an HMAC of the password):
# without it every request pays a PBKDF2 hash, about 0.5 s on 2 cores (an approval's ten registry
# calls took 10 s). The server runs one worker, so a password changed or a user deleted through the
# API takes effect at once; a change made in the database directly, within this many seconds.
AUTH_CACHE_TTL_S = 60
PASSWORD_VARIABLES = {ADMIN: "MLFLOW_AUTH_ADMIN_PASSWORD"} | {
    user: f"MLFLOW_{user.upper()}_PASSWORD" for user in USERS
}


def write_config(path: Path, database_uri: str) -> Path:
    """The auth app's configuration (no secret in it: passwords come from the environment)."""
    path.write_text(
        "[mlflow]\n"
        "default_permission = NO_PERMISSIONS\n"
        f"database_uri = {database_uri}\n"
        f"admin_username = {ADMIN}\n"
        f"auth_cache_ttl_seconds = {AUTH_CACHE_TTL_S}\n"
    )
    return path


def ensure_users(tracking_uri: str, passwords: Mapping[str, str]) -> list[str]:
    """Create the users that do not exist yet, each with its grant on every experiment and registered
    model (`*`: those a stack made before authentication existed included); the users created."""
    import httpx

    created = []
    with httpx.Client(base_url=tracking_uri, auth=(ADMIN, passwords[ADMIN]), timeout=30) as admin:
        for user, permission in USERS.items():
            found = admin.get("/api/2.0/mlflow/users/get", params={"username": user})
            if found.status_code == HTTPStatus.UNAUTHORIZED:
                raise SystemExit(
                    "MLflow refuses the admin password: its user database was created with another "
                    "one (restore that password, or start with an empty user database)"
                )
            if found.status_code == HTTPStatus.OK:
                continue
            admin.post(
                "/api/2.0/mlflow/users/create", json={"username": user, "password": passwords[user]}
            ).raise_for_status()
            for resource_type in ("experiment", "registered_model"):
                admin.post(
                    "/api/3.0/mlflow/users/permissions/grant",
                    json={
                        "username": user,
                        "resource_type": resource_type,
                        "resource_id": "*",
                        "permission": permission,
                    },
                ).raise_for_status()
            created.append(user)
    return created


def passwords_from_environment(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    missing = [name for name in PASSWORD_VARIABLES.values() if not environ.get(name)]
    if missing:
        raise SystemExit(f"set {', '.join(missing)} (no default passwords): see infra/README.md")
    return {user: environ[name] for user, name in PASSWORD_VARIABLES.items()}


def api_answers(tracking_uri: str, user: str, password: str, host_header: str | None = None) -> bool:
    """An API call as `user`, with the Host header clients send: what a health check must make
    (`/health` answers 200 even when MLflow refuses every API call for an unknown Host)."""
    import httpx

    response = httpx.get(
        f"{tracking_uri}/api/2.0/mlflow/experiments/search",
        params={"max_results": 1},
        auth=(user, password),
        headers={"Host": host_header} if host_header else None,
        timeout=5,
    )
    return response.status_code == HTTPStatus.OK


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m infra.mlflow_auth",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=["users", "probe"], help="users: create them; probe: health check")
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"), required=False)
    parser.add_argument("--host-header", help="probe: the Host header clients send (e.g. mlflow:5000)")
    parser.add_argument("--wait", type=float, default=300, help="users: seconds to wait for MLflow.")
    args = parser.parse_args(argv)
    if not args.tracking_uri:
        parser.error("--tracking-uri (or MLFLOW_TRACKING_URI) is required")
    if args.command == "probe":
        password = os.environ.get(PASSWORD_VARIABLES[ADMIN])
        if not password:
            raise SystemExit(f"set {PASSWORD_VARIABLES[ADMIN]}")
        return 0 if api_answers(args.tracking_uri, ADMIN, password, args.host_header) else 1
    passwords = passwords_from_environment()
    from infra.processes import http_ok, wait_until

    wait_until(lambda: http_ok(f"{args.tracking_uri}/health"), "MLflow", args.wait, [], None)
    created = ensure_users(args.tracking_uri, passwords)
    print(f"MLflow users created: {', '.join(created) or 'none (all existed)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
