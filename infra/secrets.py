"""The local stack's credentials: generated on the first `up`, kept under `<home>/secrets`.

Nothing the stack starts answers without them (see infra/README.md, "Who can do what"):
- MLflow runs its basic-auth app with the users of infra/mlflow_auth.py (`keel` for flows, `viewer`
  for colleagues, `admin` for user management);
- the Prefect server requires one basic-auth string (`PREFECT_SERVER_API_AUTH_STRING`, the only
  authentication the open-source server has);
- Dask speaks mutual TLS: the scheduler and workers accept only peers presenting a certificate signed
  by the stack's own CA, whose key is discarded once the certificate is signed;
- PostgreSQL (`--db postgresql`) uses SCRAM password authentication.

The folder is 0700 and every file 0600; a secret that others can read is refused, not used.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import secrets
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

from infra import mlflow_auth

FOLDER = "secrets"
PREFECT_USER = "keel"
# file name -> what it holds; every one is generated if missing
PASSWORDS = {
    "mlflow-admin-password": "MLflow's `admin` user (UI, user management)",
    "mlflow-keel-password": "MLflow's `keel` user (flows, workers, deployments)",
    "mlflow-viewer-password": "MLflow's `viewer` user (the UI, read-only: colleagues)",
    "mlflow-flask-secret": "MLflow's CSRF signing key",
    "prefect-auth-token": "the password part of the Prefect server's basic-auth string",
    "postgres-password": "PostgreSQL's `keel` role (--db postgresql)",
}
TLS_FILES = ("dask-ca.pem", "dask-cert.pem", "dask-key.pem")


class SecretsError(SystemExit):
    """A secret is missing or readable by others: the stack does not start (or talk) with it."""


@dataclass(frozen=True)
class StackSecrets:
    folder: Path

    @classmethod
    def ensure(cls, home: Path) -> StackSecrets:
        """The stack's secrets, generating whatever is missing (first `up`)."""
        folder = home / FOLDER
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(0o700)
        for name in PASSWORDS:
            if not (folder / name).exists():
                write_private(folder / name, secrets.token_urlsafe(32).encode())
        if not all((folder / name).exists() for name in TLS_FILES):
            _write_dask_certificates(folder)
        return cls.load(home)

    @classmethod
    def load(cls, home: Path) -> StackSecrets:
        """The stack's existing secrets; refuses if one is missing or others can read it."""
        folder = home / FOLDER
        for path in [folder, *(folder / n for n in PASSWORDS), *(folder / n for n in TLS_FILES)]:
            if not path.exists():
                raise SecretsError(f"{path} is missing: run `python -m infra.stack up` to create the stack")
            if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
                raise SecretsError(
                    f"{path} is readable by others (mode {stat.filemode(path.stat().st_mode)}): "
                    f"refusing to use it; `chmod go= {path}` if nobody else read it, or delete the "
                    "stack's secrets folder to generate new ones"
                )
        return cls(folder)

    def read(self, name: str) -> str:
        return (self.folder / name).read_text().strip()

    @property
    def prefect_auth_string(self) -> str:
        return f"{PREFECT_USER}:{self.read('prefect-auth-token')}"

    def mlflow_passwords(self) -> dict[str, str]:
        return {user: self.read(f"mlflow-{user}-password") for user in mlflow_auth.PASSWORD_VARIABLES}

    def dask_tls(self) -> dict[str, str]:
        """Dask's own configuration variables for a client of the stack's scheduler."""
        return {
            "DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION": "True",
            "DASK_DISTRIBUTED__COMM__TLS__CA_FILE": str(self.folder / "dask-ca.pem"),
            "DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT": str(self.folder / "dask-cert.pem"),
            "DASK_DISTRIBUTED__COMM__TLS__CLIENT__KEY": str(self.folder / "dask-key.pem"),
        }

    def dask_tls_flags(self) -> list[str]:
        """The same certificate for `dask scheduler` and `dask worker`."""
        return [
            "--tls-ca-file",
            str(self.folder / "dask-ca.pem"),
            "--tls-cert",
            str(self.folder / "dask-cert.pem"),
            "--tls-key",
            str(self.folder / "dask-key.pem"),
        ]

    def client_env(self) -> dict[str, str]:
        """What flows, workers and the deployments server need to talk to the stack."""
        return {
            "MLFLOW_TRACKING_USERNAME": mlflow_auth.APP_USER,
            "MLFLOW_TRACKING_PASSWORD": self.read("mlflow-keel-password"),
            "PREFECT_API_AUTH_STRING": self.prefect_auth_string,
            **self.dask_tls(),
        }

    def viewer_env(self) -> dict[str, str]:
        """MLflow's read-only user: for what only reads the registry (the model server)."""
        return {
            "MLFLOW_TRACKING_USERNAME": mlflow_auth.VIEWER,
            "MLFLOW_TRACKING_PASSWORD": self.read(f"mlflow-{mlflow_auth.VIEWER}-password"),
        }


def write_private(path: Path, content: bytes) -> None:
    """Created 0600 from the first byte (never readable by others, even briefly), and whole or not
    at all: written under a name of its own beside `path` (two writers never share one), then
    renamed over it."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # 0600
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(content)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _write_dask_certificates(folder: Path, days: int = 3650) -> None:
    """A CA and one certificate (for 127.0.0.1 and localhost) that scheduler, workers and clients
    all present. The CA's key is never written: nobody can sign another certificate for this stack."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    until = now + datetime.timedelta(days=days)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    # X.509 caps a common name at 64 characters: a random tag, not the (long) folder path
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"keel stack CA {secrets.token_hex(4)}")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "keel dask")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(until)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    write_private(folder / "dask-ca.pem", ca.public_bytes(pem))
    write_private(folder / "dask-cert.pem", cert.public_bytes(pem))
    write_private(
        folder / "dask-key.pem",
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    )


# -- compose and Kubernetes -------------------------------------------------------------------------
# Every secret the compose file and the Kubernetes manifests require (`${NAME:?...}`, secretKeyRef).
CLUSTER_SECRETS = {
    "POSTGRES_PASSWORD": "PostgreSQL's `keel` role (MLflow's and Prefect's databases)",
    "MINIO_ROOT_PASSWORD": "MinIO's root user: only MinIO and the job that creates buckets and users",
    "KEEL_S3_SECRET_KEY": "MinIO user `keel` (workers, deployments): reads landing/ and data/, writes datasets/",
    "MLFLOW_S3_SECRET_KEY": "MinIO user `mlflow` (the MLflow server): its artifact bucket only",
    "MLFLOW_AUTH_ADMIN_PASSWORD": "MLflow's `admin` user",
    "MLFLOW_KEEL_PASSWORD": "MLflow's `keel` user (flows)",
    "MLFLOW_VIEWER_PASSWORD": "MLflow's `viewer` user (read-only UI)",
    "MLFLOW_FLASK_SERVER_SECRET_KEY": "MLflow's CSRF signing key",
    "PREFECT_AUTH_TOKEN": "the password of the Prefect server's basic-auth string `keel:<token>`",
    "KEEL_SERVING_TOKEN": "the bearer token the model server's callers send (deployments/gateway.py)",
}


def write_cluster_secrets(folder: Path, owner: int | None = None) -> list[Path]:
    """`folder/.env` (every CLUSTER_SECRETS variable, for `docker compose --env-file` or
    `kubectl create secret generic --from-env-file`) and the Dask TLS files; existing files are
    kept. `owner`: the uid the containers run as (they read the TLS files as that user)."""
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)
    env_file = folder / ".env"
    if not env_file.exists():
        lines = [f"# generated by python -m infra.secrets cluster {folder}; keep private"]
        lines += [f"{name}={secrets.token_urlsafe(32)}" for name in CLUSTER_SECRETS]
        write_private(env_file, ("\n".join(lines) + "\n").encode())
    else:  # written by an older version: the secrets added since are appended, the others kept
        text = env_file.read_text()
        have = {line.split("=", 1)[0] for line in text.splitlines() if "=" in line}
        added = [f"{name}={secrets.token_urlsafe(32)}" for name in CLUSTER_SECRETS if name not in have]
        if added:
            write_private(env_file, (text.rstrip("\n") + "\n" + "\n".join(added) + "\n").encode())
    if not all((folder / name).exists() for name in TLS_FILES):
        _write_dask_certificates(folder)
    written = [env_file, *(folder / name for name in TLS_FILES)]
    if owner is not None and os.geteuid() == 0:
        for path in [folder, *written]:
            os.chown(path, owner, -1)
    return written


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m infra.secrets",
        description="Generate the secrets the compose file and the Kubernetes manifests require.",
    )
    parser.add_argument("command", choices=["cluster"])
    parser.add_argument("folder", type=Path, nargs="?", default=Path("infra/compose/secrets"))
    parser.add_argument(
        "--owner", type=int, default=1000, help="uid the containers run as (files are chowned when root)"
    )
    args = parser.parse_args(argv)
    for path in write_cluster_secrets(args.folder, args.owner):
        print(f"  {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
