"""Package-level rules: the library imports no Ray; CI runs the README's test command."""

import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import gold_ray

ROOT = Path(__file__).resolve().parents[1]


def test_library_modules_import_no_ray():
    modules = [m.name for m in pkgutil.walk_packages(gold_ray.__path__, "gold_ray.")]
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", f"gold_ray must not import ray: {out.stdout[:300]}"
    assert "gold_ray.run.loop" in modules and "gold_ray.strategies.gold" in modules


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"^(make \w+)\s+#", readme, flags=re.M)
    assert "make test" in commands
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.startswith("#")]
    assert "make test" in ci
