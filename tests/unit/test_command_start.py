"""What a command does before its imports (`infra.command`), in new interpreters: the garbage
collector's pause (`infra.collector`; its state is the process's) and a new Prefect home made."""

from __future__ import annotations

import json
import stat
import subprocess
import sys

from tests.conftest import ROOT, clean_env


def collector_after(code: str) -> dict[str, object]:
    """Run `code` in a new interpreter; what `gc` says at its end."""
    probe = "import gc, json\nprint(json.dumps({'enabled': gc.isenabled(), 'frozen': gc.get_freeze_count()}))"
    done = subprocess.run(
        [sys.executable, "-c", f"{code}\n{probe}"], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout)


def test_a_pause_holds_through_the_imports_and_the_resume_freezes_them():
    during = collector_after(
        "from infra.collector import pause_collection\npause_collection()\nimport decimal"
    )
    assert during == {"enabled": False, "frozen": 0}
    after = collector_after(
        "from infra.collector import pause_collection, resume_collection\n"
        "pause_collection()\nimport decimal\nresume_collection()\nresume_collection()"
    )
    assert after["enabled"] is True
    # Frozen: the interpreter's and decimal's objects.
    assert isinstance(after["frozen"], int) and after["frozen"] > 1000


def test_without_a_pause_a_resume_changes_nothing():
    assert collector_after("from infra.collector import resume_collection\nresume_collection()") == {
        "enabled": True,
        "frozen": 0,
    }


def test_a_collector_the_user_turned_off_stays_off():
    assert collector_after(
        "import gc\ngc.disable()\nfrom infra.collector import pause_collection, resume_collection\n"
        "pause_collection()\nresume_collection()"
    ) == {"enabled": False, "frozen": 0}


def test_a_new_prefect_home_is_made_with_its_parents_before_prefect_is_imported(tmp_path):
    home = tmp_path / "new" / "project" / ".prefect"
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "from infra.command import begin_command\nbegin_command(None)\nimport prefect.context",
        ],
        cwd=ROOT,
        env=clean_env(PREFECT_HOME=str(home), PREFECT_API_URL="http://127.0.0.1:9/api"),
        capture_output=True,
        text=True,
        check=True,
    )
    assert "Failed to create the Prefect home directory" not in done.stderr
    assert home.is_dir() and stat.S_IMODE(home.stat().st_mode) == 0o700
