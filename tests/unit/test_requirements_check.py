"""MLflow's requirements check keeps its warnings and loses its scan of every package
(`tasks.steps.requirements_check`)."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
import textwrap

import mlflow
import pytest

from tasks.steps.requirements_check import satisfied_by_name

LIGHTGBM = importlib.metadata.version("lightgbm")


@pytest.mark.parametrize(
    ("requirement", "satisfied"),
    [
        (f"lightgbm=={LIGHTGBM}", True),
        (f"LightGBM>={LIGHTGBM}", True),
        (f"mlflow=={mlflow.__version__}", True),
        ("lightgbm==0.0.1", False),  # a mismatch: MLflow's check warns of it
        ("lightgbm<0.1", False),
        ("keel-not-a-distribution==1.0", False),  # not found by name: MLflow maps modules to find it
        (f"mlflow[gateway]=={mlflow.__version__}", False),  # extras: MLflow imports them to check
        (f"lightgbm=={LIGHTGBM}; python_version < '3'", False),  # a marker: MLflow evaluates it
        ("lightgbm @ https://example.invalid/lightgbm.whl", False),
        ("-r requirements.txt", False),  # not a requirement: MLflow skips it
        ("", False),
    ],
)
def test_only_a_plain_requirement_this_environment_meets_skips_mlflow_s_check(
    requirement: str, satisfied: bool
):
    assert satisfied_by_name(requirement) is satisfied


# In a new interpreter (MLflow's package map is built once per process): a model whose requirements
# are installed is saved and loaded without the map; one with a mismatch gets MLflow's own warning.
SCRIPT = textwrap.dedent(
    """
    import json, logging, sys
    import mlflow.pyfunc
    import mlflow.utils.requirements_utils as requirements_utils
    from tasks.steps.requirements_check import check_requirements_quickly

    class Echo(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input):
            return model_input

    warnings = []
    handler = logging.Handler()
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger("mlflow").addHandler(handler)
    check_requirements_quickly()
    check_requirements_quickly()  # twice: one filter, not two
    folder, requirements = sys.argv[1], json.loads(sys.argv[2])
    mlflow.pyfunc.save_model(folder + "/saved", python_model=Echo(), pip_requirements=requirements)
    scanned_on_save = requirements_utils._MODULES_TO_PACKAGES is not None
    mlflow.pyfunc.load_model(folder + "/saved")
    scanned = requirements_utils._MODULES_TO_PACKAGES is not None
    mismatches = [w for w in warnings if "mismatches between the model's dependencies" in w]
    print(json.dumps({"scanned_on_save": scanned_on_save, "scanned": scanned, "mismatches": mismatches}))
    """
)


def _save_and_load(tmp_path, requirements: list[str]) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path), json.dumps(requirements)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_model_this_environment_satisfies_is_saved_and_loaded_without_mlflow_s_package_scan(tmp_path):
    seen = _save_and_load(tmp_path, [f"mlflow=={mlflow.__version__}", f"lightgbm=={LIGHTGBM}"])
    assert seen == {"scanned_on_save": False, "scanned": False, "mismatches": []}


def test_a_mismatch_still_gets_mlflow_s_own_warning_on_save_and_on_load(tmp_path):
    seen = _save_and_load(tmp_path, [f"mlflow=={mlflow.__version__}", "lightgbm==0.0.1"])
    assert seen["scanned_on_save"] and seen["scanned"]
    assert len(seen["mismatches"]) == 2, seen  # saving and loading each warn, as without the filter
    assert all(
        "lightgbm (current: " + LIGHTGBM + ", required: lightgbm==0.0.1)" in w for w in seen["mismatches"]
    )
