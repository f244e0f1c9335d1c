"""Acceptance checks, run for real with this machine's python against real distributions."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cnbi_hub.controller.checks import (
    Check,
    interpret_check,
    manifest_from_pip_list,
    plan_checks,
    requested_distribution_names,
)

VENV_BIN = str(Path(sys.executable).parent)


def run(check: Check, **env_overrides):
    env = {**os.environ, "PATH": VENV_BIN + os.pathsep + os.environ.get("PATH", "")}
    env.update(env_overrides)
    proc = subprocess.run(list(check.argv), capture_output=True, text=True, env=env, timeout=120)
    return interpret_check(check, proc.returncode, proc.stdout, proc.stderr), proc


def by_name(checks):
    return {check.name: check for check in checks}


def write_dist(site: Path, name: str, version: str, files: dict[str, str], top_level=None):
    info = site / f"{name}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    record = [f"{path},," for path in files] + [f"{info.name}/METADATA,,", f"{info.name}/RECORD,,"]
    if top_level is not None:
        (info / "top_level.txt").write_text("\n".join(top_level) + "\n")
    (info / "RECORD").write_text("\n".join(record) + "\n")
    for path, text in files.items():
        target = site / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)


@pytest.fixture
def site(tmp_path):
    site = tmp_path / "site"
    write_dist(
        site, "brokenpkg", "1.0",
        {"brokenmod/__init__.py": "raise ImportError('brokenmod needs libfoo.so.1')\n"},
    )  # fmt: skip
    # prints while importing: the JSON report must survive that
    write_dist(
        site,
        "noisy-pkg",
        "2.0",
        {"noisymod.py": "print('hello from noisymod')\n"},
        top_level=["noisymod"],
    )
    return site


def test_plan_checks_shape():
    checks = plan_checks(["PyYAML", "packaging"], "/opt/conda/bin/python")
    assert [c.name for c in checks] == [
        "singleuser",
        "python-version",
        "imports",
        "login-shell",
        "home-writable",
        "packages",
    ]
    imports = by_name(checks)["imports"]
    assert imports.argv[0] == "/opt/conda/bin/python" and imports.argv[1] == "-c"
    # names are argv items after the program, never part of it
    assert imports.argv[3:] == ("PyYAML", "packaging")
    assert "PyYAML" not in imports.argv[2]
    assert "imports" not in by_name(plan_checks([], "/usr/bin/python3"))


def test_requested_distributions_import():
    checks = by_name(plan_checks(["PyYAML", "packaging"], sys.executable))
    result, proc = run(checks["imports"])
    assert result.ok, result.message
    report = json.loads(proc.stdout)
    modules = {e["distribution"]: e["modules"] for e in report["results"]}
    assert "yaml" in modules["PyYAML"] and modules["PyYAML"]["yaml"] is None
    assert modules["packaging"] == {"packaging": None}


def test_broken_and_missing_distributions_are_named(site):
    checks = by_name(
        plan_checks(["noisy_pkg", "brokenpkg", "not-installed-zzz", "PyYAML"], sys.executable)
    )
    result, proc = run(checks["imports"], PYTHONPATH=str(site))
    assert not result.ok
    assert proc.returncode == 1
    assert (
        "brokenpkg 1.0: import brokenmod failed: ImportError: brokenmod needs libfoo.so.1"
        in result.message
    )
    assert "not-installed-zzz: not installed" in result.message
    assert "noisy" not in result.message and "PyYAML" not in result.message
    assert "hello from noisymod" in proc.stderr
    report = json.loads(proc.stdout)
    assert report["results"][0]["modules"] == {"noisymod": None}


def test_hostile_distribution_names_are_data(tmp_path):
    canary = tmp_path / "pwned"
    name = f"x'); open('{canary}', 'w'); ('"
    checks = by_name(plan_checks([name, "--help"], sys.executable))
    result, _ = run(checks["imports"])
    assert not result.ok
    assert "not installed" in result.message
    assert not canary.exists()


def test_singleuser_check():
    checks = by_name(plan_checks([], sys.executable))
    result, proc = run(checks["singleuser"])
    assert result.ok, result.message
    assert proc.stdout.strip()[0].isdigit()  # a version number
    # what a runner sees when the image lacks it: a shell-style 127 with a message
    failed = interpret_check(
        checks["singleuser"], 127, "", "exec: jupyterhub-singleuser: not found\n"
    )
    assert not failed.ok
    assert failed.message.startswith("jupyterhub-singleuser must be on PATH")
    assert "not found" in failed.message


def test_python_version_check():
    result, _ = run(by_name(plan_checks([], sys.executable))["python-version"])
    assert result.ok and result.message.startswith("python 3.")
    result, _ = run(by_name(plan_checks([], sys.executable, min_python=(99, 0)))["python-version"])
    assert not result.ok and "99.0 or newer" in result.message


def test_home_writable_check(tmp_path):
    check = by_name(plan_checks([], sys.executable))["home-writable"]
    result, _ = run(check, HOME=str(tmp_path))
    assert result.ok and result.message == str(tmp_path)
    assert list(tmp_path.iterdir()) == []  # leaves nothing behind
    result, _ = run(check, HOME=str(tmp_path / "missing"))
    assert not result.ok and "not writable" in result.message


def test_packages_listing_and_manifest(site):
    check = by_name(plan_checks([], sys.executable))["packages"]
    result, proc = run(check, PYTHONPATH=str(site))
    assert result.ok
    listed = json.loads(proc.stdout)
    names = {entry["name"].lower(): entry["version"] for entry in listed}
    from importlib.metadata import version


    assert names["pyyaml"] == version("PyYAML")
    assert names["brokenpkg"] == "1.0"
    manifest = manifest_from_pip_list(listed, ["pyyaml>=6", "brokenpkg"])
    visible = [m["name"] for m in manifest if m["visible"]]
    assert sorted(visible, key=str.lower) == ["brokenpkg", "PyYAML"]
    assert manifest[0]["visible"] and not manifest[-1]["visible"]
    assert all(set(m) == {"name", "version", "visible"} for m in manifest)


def test_manifest_from_pip_list_pure():
    pip_list = [
        {"name": "pandas", "version": "2.2.3"},
        {"name": "numpy", "version": "2.1.0"},
        {"name": "scikit_learn", "version": "1.5.2"},
        {"name": "bad"},
    ]
    assert manifest_from_pip_list(pip_list, ["pandas>=2", "scikit-learn==1.5.*"]) == [
        {"name": "pandas", "version": "2.2.3", "visible": True},
        {"name": "scikit_learn", "version": "1.5.2", "visible": True},
        {"name": "numpy", "version": "2.1.0", "visible": False},
    ]


def test_requested_distribution_names():
    assert requested_distribution_names(
        ["pandas>=2", "Pandas", "scikit-learn==1.5.*", "x y z"]
    ) == [
        "pandas",
        "scikit-learn",
    ]


def test_login_shell_check_fails_where_the_profile_resets_path(tmp_path):
    """On this machine /etc/profile resets PATH for a login shell, as Debian's does in an image:
    a venv that is only on the environment's PATH is lost there, and the check says so."""
    check = by_name(plan_checks([], sys.executable))["login-shell"]
    venv_bin = str(Path(sys.executable).parent)
    env = dict(os.environ, PATH=venv_bin + ":/usr/bin:/bin", HOME=str(tmp_path))
    result = subprocess.run(check.argv, capture_output=True, text=True, env=env, timeout=30)
    outcome = interpret_check(check, result.returncode, result.stdout, result.stderr)
    assert not outcome.ok
    assert "does not find" in outcome.message and "jupyter" in outcome.message


def test_login_shell_check_passes_when_a_profile_script_restores_the_venv(tmp_path):
    check = by_name(plan_checks([], sys.executable))["login-shell"]
    venv_bin = Path(sys.executable).parent
    (tmp_path / ".profile").write_text(f'export PATH="{venv_bin}:$PATH"\n')
    (tmp_path / ".bash_profile").write_text(f'export PATH="{venv_bin}:$PATH"\n')
    env = dict(os.environ, HOME=str(tmp_path))
    result = subprocess.run(check.argv, capture_output=True, text=True, env=env, timeout=30)
    outcome = interpret_check(check, result.returncode, result.stdout, result.stderr)
    assert outcome.ok, outcome.message
