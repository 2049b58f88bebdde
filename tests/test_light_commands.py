"""Light commands answer without starting a deep-learning stack: each runs in a fresh interpreter, and none of
torch, Ray, DeepSpeed, transformers or datasets may be imported on the way."""

import json
import subprocess
import sys

import pytest

from tests.conftest import JOBS, ROOT, free_port

HEAVY = ("torch", "ray", "deepspeed", "transformers", "datasets", "mlflow")
PROBE = """
import json, sys
from steward.cli import main
sys.argv = ["steward", *json.loads(sys.argv[1])]
try:
    main()
except SystemExit as done:
    code = done.code
else:
    code = 0
print("\\nLOADED " + json.dumps({"code": code, "heavy": sorted(m for m in HEAVY if m in sys.modules)}))
"""


def loaded(*args: str) -> dict:
    """Run `steward ARGS` in a fresh interpreter; its exit code and which heavy packages it imported."""
    code = f"HEAVY = {HEAVY!r}\n{PROBE}"
    done = subprocess.run([sys.executable, "-c", code, json.dumps(args)], cwd=ROOT, capture_output=True, text=True)
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("LOADED ")), None)
    assert line is not None, done.stdout + done.stderr
    return json.loads(line.removeprefix("LOADED "))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("light")
    (tmp / "policy.yaml").write_text("rules: {max_workers: 8}\n")
    (tmp / "audit.jsonl").write_text("")
    (tmp / "a.json").write_text("{}")
    return tmp


def commands(files) -> dict[str, list[str]]:
    """Each light command, with arguments (files: the module's folder of inputs; None only names them)."""
    files = files or ROOT
    quickstart, served = str(JOBS / "quickstart.yaml"), str(JOBS / "bench-serve.yaml")
    jobs = f"http://127.0.0.1:{free_port()}"  # nothing listens: the commands answer that they cannot reach it
    return {
        "validate": ["validate", quickstart],
        "render": ["render", quickstart],
        "schema": ["schema"],
        "policy check": ["policy", "check", quickstart, "--policy", str(files / "policy.yaml")],
        "policy explain": ["policy", "explain", "--policy", str(files / "policy.yaml")],
        "k8s rayjob": ["k8s", quickstart, "--kind", "rayjob"],
        "k8s rayservice": ["k8s", served, "--kind", "rayservice", "--run", "runs/bench-serve/x"],
        "card": ["card", str(files / "no-such-run")],
        "audit verify": ["audit", "verify", "--log", str(files / "audit.jsonl")],
        "audit show": ["audit", "show", "--log", str(files / "audit.jsonl")],
        "runs": ["runs", "--output-dir", str(files)],
        "jobs list": ["jobs", "list", "--address", jobs],
        "jobs status": ["jobs", "status", "x", "--address", jobs],
        "jobs logs": ["jobs", "logs", "x", "--address", jobs],
        "jobs stop": ["jobs", "stop", "x", "--address", jobs],
        "bench compare": ["bench", "compare", str(files / "a.json"), str(files / "a.json")],
    }


@pytest.mark.parametrize("name", list(commands(None)))
def test_a_light_command_imports_no_deep_learning_stack(files, name):
    result = loaded(*commands(files)[name])
    assert result["heavy"] == [], f"steward {name} imported {result['heavy']}"
    assert result["code"] in (0, 1, 2), result  # answered (some with a clear user error), never a crash


def test_the_probe_sees_a_heavy_import():
    # The same probe on a command that trains must see torch: the light test could fail.
    code = f"HEAVY = {HEAVY!r}\nimport steward.stages\n{PROBE}"
    done = subprocess.run([sys.executable, "-c", code, json.dumps(["schema"])], capture_output=True, text=True)
    assert '"torch"' in done.stdout.splitlines()[-1], done.stdout[-500:] + done.stderr[-2000:]
