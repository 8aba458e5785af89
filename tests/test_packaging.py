"""The project as a user installs it: a wheel in a fresh virtual environment, used from another directory."""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def clean_env() -> dict:
    """This environment without what would point Python or pip back at the checkout."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LOCALCHAT_MODELS")}


def run(cmd: list[str], cwd: Path, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # Build from a copy: setuptools writes build/ and *.egg-info into the tree it builds.
    source = out / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "_data", "__pycache__", ".pytest_cache", ".hypothesis"))
    # No build isolation: the build needs only setuptools, which this environment has.
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(out), str(source)], cwd=out, env=clean_env())
    wheels = list(out.glob("localchat-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_wheel_carries_the_registry_assets_and_kernel_sources(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in ("localchat/_data/models.yaml", "localchat/_data/assets/ui.css", "localchat/_data/assets/ui.js",
                   "kernels/csrc/paged_decode.cpp", "localchat/cli/__init__.py", "localchat/engine/engine.py"):
        assert needed in names, needed
    assert not any(n.startswith(("tests/", "app.py", "benchmarks/")) for n in names)


@pytest.mark.slow
def test_installed_wheel_runs_from_another_directory(wheel, tmp_path):
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)], cwd=tmp_path)
    python = venv / "bin" / "python"
    # The fresh environment gets its dependencies (torch, transformers, the default model's wheel...) from
    # this one's site-packages through a .pth file, so the test needs no network; localchat itself comes
    # only from the wheel (this environment's editable install is not visible there).
    # The wheel goes in first, so pip can't mistake this environment's editable localchat for it.
    run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", str(wheel)], cwd=tmp_path, env=clean_env())
    purelib = Path(run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], cwd=tmp_path).stdout.strip())
    (purelib / "deps-from-test-env.pth").write_text("\n".join(site.getsitepackages() + [sysconfig.get_path("purelib")]) + "\n")

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = clean_env()
    localchat = venv / "bin" / "localchat"
    helptext = run([str(localchat), "--help"], cwd=elsewhere, env=env).stdout
    for command in ("app", "generate", "chats", "bench"):
        assert command in helptext

    out = run([str(localchat), "generate", "Hi", "--max-tokens", "4", "--json", "--temperature", "0"], cwd=elsewhere, env=env).stdout
    doc = json.loads(out)
    assert doc["model"] == "smollm2-135m-instruct" and len(doc["outputs"][0]["token_ids"]) == 4

    found = run([str(python), "-c", (
        "import localchat, localchat.settings as s; "
        "print(localchat.__file__); print(s.resource('assets') / 'ui.css'); print(s.resource('models.yaml'))")],
        cwd=elsewhere, env=env).stdout.split()
    package, css, registry = (Path(p) for p in found)
    assert not package.is_relative_to(ROOT), package  # the installed copy, not the checkout
    assert css.is_file() and css.is_relative_to(package.parent) and "lc-mem" in css.read_text()
    assert registry.is_file() and "smollm2-135m-instruct" in registry.read_text()
