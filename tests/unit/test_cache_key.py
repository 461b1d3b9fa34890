"""The cache key: what it covers (code reached through helpers, params, content not paths, libraries),
what it ignores (comments, formatting, bookkeeping), and how a miss is explained."""

from __future__ import annotations

import importlib
import sys
import textwrap
from pathlib import Path

import pytest

from tasks.steps import cache, definitions
from tasks.steps.refs import DatasetRef, ModelRef

ROOT = Path(__file__).resolve().parent.parent.parent
PROBE = "tasks._cache_probe"


@pytest.fixture
def probe_module():
    """A throwaway module inside the `tasks` package, rewritten by the test."""
    path = ROOT / "tasks" / "_cache_probe.py"

    def load(source: str):
        path.write_text(textwrap.dedent(source))
        sys.modules.pop(PROBE, None)
        importlib.invalidate_caches()
        cache.code_parts.cache_clear()
        return importlib.import_module(PROBE)

    try:
        yield load
    finally:
        path.unlink(missing_ok=True)
        sys.modules.pop(PROBE, None)


BASE = """
from tasks.tabular import featurize

SCALE = 2

def helper(x):
    return x * SCALE

def step(x):
    # uses a helper here and one in another module
    return helper(x) + len(featurize.TIME_PARTS)
"""


def test_code_parts_follow_helpers_constants_and_module_attributes(probe_module):
    parts = cache.code_parts(probe_module(BASE).step)
    assert {f"code:{PROBE}.step", f"code:{PROBE}.helper", f"code:{PROBE}.SCALE"} <= set(parts)
    assert "code:tasks.tabular.featurize.TIME_PARTS" in parts
    assert not any("lineage" in name for name in parts)  # bookkeeping is not part of the key


def test_a_helper_change_changes_the_key_and_a_comment_does_not(probe_module):
    before = cache.code_parts(probe_module(BASE).step)
    commented = cache.code_parts(
        probe_module(BASE.replace("# uses a helper", "# reformatted   comment")).step
    )
    assert commented == before
    changed = cache.code_parts(probe_module(BASE.replace("x * SCALE", "x * SCALE + 1")).step)
    assert [k for k in changed if changed[k] != before[k]] == [f"code:{PROBE}.helper"]
    constant = cache.code_parts(probe_module(BASE.replace("SCALE = 2", "SCALE = 3")).step)
    assert [k for k in constant if constant[k] != before[k]] == [f"code:{PROBE}.SCALE"]


def ref(uri: str, digest: str) -> DatasetRef:
    return DatasetRef(name="raw", uri=uri, digest=digest, format="csv")


def fn(raw: DatasetRef, n: int, output_uri: str) -> int:
    return n


IGNORE = cache.CacheConfig(ignore=("output_uri",))


def test_inputs_are_keyed_by_content_not_path_and_ignored_arguments_are_left_out():
    key = cache.step_key("s", fn, {"raw": ref("/a.csv", "d1"), "n": 1, "output_uri": "/x"}, IGNORE)
    moved = cache.step_key("s", fn, {"raw": ref("/b.csv", "d1"), "n": 1, "output_uri": "/y"}, IGNORE)
    rewritten = cache.step_key("s", fn, {"raw": ref("/a.csv", "d2"), "n": 1, "output_uri": "/x"}, IGNORE)
    assert key.digest == moved.digest
    assert key.digest != rewritten.digest
    assert rewritten.changes_from(key.parts) == ["input:raw changed (csv:d1 -> csv:d2)"]
    other = cache.step_key("s", fn, {"raw": ref("/a.csv", "d1"), "n": 2, "output_uri": "/x"}, IGNORE)
    assert other.changes_from(key.parts) == ["param:n changed (1 -> 2)"]
    assert key.parts["lib:lightgbm"] and key.parts["lib:python"]


def test_models_are_keyed_by_their_id_and_lineage_fields_are_not_keyed():
    from tasks.steps.tuning import TrialRecord

    model = ModelRef(uri="models:/m-1", run_id="r1", model_id="m-1", task="regression")
    assert cache.input_parts("model", model) == {"input:model": "model:m-1"}
    a = TrialRecord(number=1, params={"x": 1}, state="complete", run_id="run-a")
    b = TrialRecord(number=1, params={"x": 1}, state="complete", run_id="run-b")
    assert cache.canonical(a) == cache.canonical(b)


def test_the_code_key_of_every_pipeline_step_is_the_same_in_another_process():
    """A cache that misses in a new process is no cache: no hash-seed or address in the key."""
    import subprocess

    script = (
        "import json, flows.pipeline as p\n"
        "from tasks.steps import cache\n"
        "from tasks.tabular import train, prepare, evaluate, quality\n"
        "from tasks.monitoring import baseline\n"
        "steps = [prepare.prepare, train.tune, train.train, baseline.baseline, evaluate.evaluate,"
        " quality.check_quality]\n"
        "print(json.dumps({s.name: cache.code_parts(s.fn) for s in steps}, sort_keys=True))\n"
    )
    outputs = [
        subprocess.run(
            [sys.executable, "-c", script],
            cwd=ROOT,
            env={"PYTHONHASHSEED": seed, "PATH": "/usr/bin:/bin"},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for seed in ("1", "2")
    ]
    assert outputs[0] == outputs[1]
    assert "code:tasks.tabular.modeling.run_trial" in outputs[0]  # tune's trials run this on the workers


USER_PACKAGE = """
import json

from churnlib import helpers

THRESHOLD = 0.5

def step(x):
    # a user's step, outside this project's packages
    return helpers.scale(x) > THRESHOLD
"""


@pytest.fixture
def user_package(tmp_path, monkeypatch):
    """A package of the user's own (not `tasks` or `flows`), rewritten by the test."""
    root = tmp_path / "churnlib"
    root.mkdir()
    (root / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))

    def load(step_source: str, helper_source: str = "def scale(x):\n    return x * 2\n"):
        (root / "steps.py").write_text(textwrap.dedent(step_source))
        (root / "helpers.py").write_text(textwrap.dedent(helper_source))
        for name in ("churnlib", "churnlib.steps", "churnlib.helpers"):
            sys.modules.pop(name, None)
        importlib.invalidate_caches()
        cache.code_parts.cache_clear()
        step = importlib.import_module("churnlib.steps").step
        return cache.step_key("s", step, {"x": 1}, cache.CacheConfig())

    yield load
    for name in ("churnlib", "churnlib.steps", "churnlib.helpers"):
        sys.modules.pop(name, None)


def test_the_key_covers_the_code_of_a_step_in_the_users_own_package(user_package):
    before = user_package(USER_PACKAGE)
    assert {
        "code:churnlib.steps.step",
        "code:churnlib.steps.THRESHOLD",
        "code:churnlib.helpers.scale",
    } <= set(before.parts)
    assert not any(name.startswith("code:json") for name in before.parts)  # the standard library is not
    assert user_package(USER_PACKAGE.replace("# a user's step", "# reworded")).digest == before.digest
    body = user_package(USER_PACKAGE.replace("> THRESHOLD", ">= THRESHOLD"))
    assert body.changes_from(before.parts) == ["code:churnlib.steps.step changed"]
    constant = user_package(USER_PACKAGE.replace("0.5", "0.6"))
    assert constant.changes_from(before.parts) == ["code:churnlib.steps.THRESHOLD changed"]
    helper = user_package(USER_PACKAGE, "def scale(x):\n    return x * 3\n")
    assert helper.changes_from(before.parts) == ["code:churnlib.helpers.scale changed"]


def test_named_code_packages_and_libraries_are_part_of_the_key():
    config = cache.CacheConfig(code_packages=("pydantic",), libraries=("pydantic",))
    own = fn.__module__.split(".")[0]
    assert {"pydantic", own, "tasks", "flows"} == set(config.packages_of(fn))
    key = cache.step_key("s", fn, {"raw": ref("/a.csv", "d1"), "n": 1, "output_uri": "/x"}, config)
    assert "lib:pydantic" in key.parts and "lib:lightgbm" not in key.parts


@pytest.fixture
def user_cache(tmp_path, monkeypatch):
    """An empty user cache, and no module tables kept by this process yet."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(definitions, "_tables", {})
    cache.code_parts.cache_clear()
    yield tmp_path / "cache" / "keel" / "definitions"
    cache.code_parts.cache_clear()


def test_module_tables_are_kept_for_the_next_process_and_give_the_same_key(
    probe_module, user_cache, monkeypatch
):
    module = probe_module(BASE)
    parsed = cache.code_parts(module.step)
    kept = list(user_cache.glob("*.json"))
    assert len(kept) == 1  # the probe's (featurize's constant is keyed by its value, not parsed)

    def no_parsing(source: bytes) -> definitions.Table:
        raise AssertionError("parsed again although the table was kept")

    monkeypatch.setattr(definitions, "_tables", {})  # as a new process starts
    monkeypatch.setattr(definitions, "_parse", no_parsing)
    cache.code_parts.cache_clear()
    assert cache.code_parts(module.step) == parsed


def test_a_damaged_or_foreign_table_is_parsed_again(probe_module, user_cache, monkeypatch):
    module = probe_module(BASE)
    parsed = cache.code_parts(module.step)
    for kept in user_cache.glob("*.json"):
        kept.write_text('{"step": "not a table"}')
    monkeypatch.setattr(definitions, "_tables", {})
    cache.code_parts.cache_clear()
    assert cache.code_parts(module.step) == parsed
    assert all("not a table" not in kept.read_text() for kept in user_cache.glob("*.json"))  # written again


def test_an_edited_module_gets_a_new_table(probe_module, user_cache):
    before = cache.code_parts(probe_module(BASE).step)
    changed = cache.code_parts(probe_module(BASE.replace("x * SCALE", "x * SCALE + 1")).step)
    assert changed[f"code:{PROBE}.helper"] != before[f"code:{PROBE}.helper"]
    assert len(list(user_cache.glob("*.json"))) == 2  # one per version of the probe


def test_an_unwritable_cache_costs_a_parse_not_a_failure(probe_module, tmp_path, monkeypatch):
    blocked = tmp_path / "file"
    blocked.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocked))  # a file where the folder would be
    monkeypatch.setattr(definitions, "_tables", {})
    cache.code_parts.cache_clear()
    parts = cache.code_parts(probe_module(BASE).step)
    assert parts[f"code:{PROBE}.helper"] != "unavailable"
