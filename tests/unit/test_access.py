"""The data-access policy (`tasks.steps.access`) and the refusals that must never quote a file's content."""

from __future__ import annotations

import http.server
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from tasks.steps.access import DataAccess, checked_files, normalise
from tasks.steps.errors import DataValidationError, read_failure
from tasks.tabular.data import TableSpec, check_table, read_table
from tasks.tabular.quality import record_rejection

SECRET = "hunter2-db-password"


@pytest.fixture
def tree(tmp_path) -> dict[str, Path]:
    """An allowed folder with a good table, and a secret file outside it."""
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    pd.DataFrame(
        {"t": pd.date_range("2024-01-01", periods=4, freq="D"), "x": range(4), "y": range(4)}
    ).to_csv(allowed / "good.csv", index=False)
    secret = tmp_path / "secrets.env"
    secret.write_text(f"PASSWORD={SECRET}\n")
    return {"root": tmp_path, "allowed": allowed, "secret": secret}


def table(path) -> TableSpec:
    return TableSpec(path=str(path), target="y", time_column="t")


def refusal(call) -> DataValidationError:
    with pytest.raises(DataValidationError) as caught:
        call()
    assert SECRET not in str(caught.value)
    return caught.value


def test_a_link_inside_an_allowed_folder_to_a_file_outside_is_refused_by_name(tree):
    access = DataAccess.parse(str(tree["allowed"]), None)
    link = tree["allowed"] / "innocent.csv"
    link.symlink_to(tree["secret"])
    error = refusal(lambda: check_table(table(link), access, str(tree["root"] / "datasets")))
    assert "outside the allowed data roots" in error.rule
    # in a folder: the link is found among its files
    error = refusal(lambda: check_table(table(tree["allowed"]), access, str(tree["root"] / "datasets")))
    assert error.file == str(link) and "resolves outside" in error.rule
    # the monitor applies the same policy
    from tasks.monitoring.drift import batch_files

    refusal(lambda: batch_files(str(tree["allowed"]), True, access))
    link.unlink()
    good = str(tree["allowed"] / "good.csv")
    assert batch_files(str(tree["allowed"]), True, access) == (good, [good])


def test_paths_outside_the_roots_and_dot_dot_are_refused_before_anything_is_read(tree):
    access = DataAccess.parse(str(tree["allowed"]), None)
    refusal(lambda: check_table(table(tree["secret"]), access, str(tree["root"] / "datasets")))
    error = refusal(
        lambda: check_table(
            table(f"{tree['allowed']}/../secrets.env"), access, str(tree["root"] / "datasets")
        )
    )
    assert error.file == str(tree["secret"]) and "outside" in error.rule  # named as resolved
    error = refusal(
        lambda: check_table(table(tree["root"] / "missing.csv"), access, str(tree["root"] / "datasets"))
    )
    assert "outside" in error.rule  # not "does not exist": existence outside the roots is not revealed
    ref = check_table(table(f"file://{tree['allowed'] / 'good.csv'}"), access, str(tree["root"] / "datasets"))
    assert ref.location == str(tree["allowed"] / "good.csv")


def test_no_roots_means_anywhere_but_errors_still_quote_nothing(tree):
    """Without roots any CSV can be named as input; the refusal says which column is missing, not
    what the file's first line (its 'header') holds."""
    secret = tree["root"] / "secrets.csv"
    secret.write_text(f"PASSWORD={SECRET}\n")
    error = refusal(lambda: check_table(table(secret), DataAccess(), str(tree["root"] / "datasets")))
    assert error.column == "y" and "the file has 1 columns" in error.rule


def test_urls_are_normalised_and_schemes_allowed_by_list():
    assert normalise("S3://Bucket/a/./b/") == "s3://bucket/a/b/"
    for bad, rule in [
        ("http://h/allowed/../secret.csv", "'..'"),
        ("http://h/allowed/%2e%2e/secret.csv", "'..'"),
        ("http://h/anything?.csv", "query"),
        ("http://h/a.csv#x", "query or fragment"),
        ("http://user:pw@h/a.csv", "credentials"),
        ("/data/a\x00.csv", "control characters"),
    ]:
        with pytest.raises(DataValidationError, match=rule) as caught:
            normalise(bad)
        assert "pw" not in str(caught.value)
    access = DataAccess.parse("s3://bucket/landing", "file,s3")
    with pytest.raises(DataValidationError, match="scheme 'http' is not allowed"):
        checked_files("http://h/a.csv", access)
    with pytest.raises(DataValidationError, match="outside the allowed data roots"):
        checked_files("s3://bucket/landing-other/a.csv", access)  # a prefix of the name is not a folder
    with pytest.raises(DataValidationError, match="scheme 'http' is not allowed"):
        checked_files("http://h/a.csv", DataAccess())  # the default: local files only


@pytest.fixture
def http_root(tree) -> Iterator[str]:
    """A web server on loopback serving the tree (stopped after the test)."""
    handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(tree["root"]))  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_http_inputs_are_read_once_allowed(http_root, tree):
    access = DataAccess.parse(f"{http_root}/allowed", "file,http")
    ref = check_table(table(f"{http_root}/allowed/good.csv"), access, str(tree["root"] / "datasets"))
    assert len(read_table(ref).compute(scheduler="sync")) == 4  # the scheme is not put in twice any more
    refusal(
        lambda: check_table(
            table(f"{http_root}/allowed/../secrets.env"), access, str(tree["root"] / "datasets")
        )
    )
    refusal(lambda: check_table(table(f"{http_root}/secrets.env"), access, str(tree["root"] / "datasets")))


def test_reader_errors_and_rejection_records_quote_nothing(tmp_path):
    parse_error = ValueError(f"CSV parse error: Expected 3 columns, got 1 in row 7: {SECRET}")
    assert read_failure(parse_error) == "ValueError at row 7"
    error = DataValidationError(str(tmp_path / "x.csv"), "cannot be read as csv (ValueError at row 7)", "y")
    path = record_rejection(tmp_path / "rejected", "run1", str(tmp_path / "x.csv"), None, error)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
