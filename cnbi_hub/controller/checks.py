"""Acceptance checks run inside a built or imported image before it becomes Ready.

In the spirit of datahub-docker-stacks' image tests: the notebook server starts, python is
new enough, every requested distribution imports, the user can write ``$HOME``, and we list
what is installed for the package manifest. Runner-neutral: each Check is an argv that the
podman builder (``podman run IMAGE argv...``) or a Tekton step runs as the image's user.

Distribution names are passed as argv items to a fixed program, never formatted into code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

__all__ = [
    "IMPORT_CHECK_PROGRAM",
    "PIP_LIST_PROGRAM",
    "Check",
    "CheckResult",
    "interpret_check",
    "manifest_from_pip_list",
    "plan_checks",
    "requested_distribution_names",
]

MIN_PYTHON = (3, 8)


@dataclass(frozen=True)
class Check:
    name: str
    argv: tuple[str, ...]
    #: what a failure means, for the user
    description: str = ""


@dataclass(frozen=True)
class CheckResult:
    name: str
    ok: bool
    message: str


# Runs inside the image with the image's python (>= 3.8, so no newer syntax or APIs).
# argv: distribution names. Prints one JSON object on stdout; exits 1 if anything failed.
IMPORT_CHECK_PROGRAM = r"""
import importlib, importlib.metadata as md, json, re, sys, traceback

def norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()

def find(name):
    wanted = norm(name)
    for dist in md.distributions():
        if norm(dist.metadata["Name"] or "") == wanted:
            return dist
    return None

def is_module(name):
    return bool(name) and name.isidentifier()

def top_level_modules(dist):
    text = dist.read_text("top_level.txt")
    if text:
        names = {line.strip().replace("/", ".").split(".")[0] for line in text.splitlines()}
    else:
        names = set()
        for path in dist.files or ():
            parts = path.parts
            if not parts or parts[0] in ("..", "__pycache__") or parts[0].endswith((".dist-info", ".egg-info", ".data")):
                continue
            if len(parts) == 1:
                if parts[0].endswith(".py"):
                    names.add(parts[0][:-3])
                elif parts[0].endswith((".so", ".pyd")):
                    names.add(parts[0].split(".")[0])
            elif parts[-1].endswith((".py", ".so", ".pyd")):
                names.add(parts[0])
    names = sorted(n for n in names if is_module(n))
    public = [n for n in names if not n.startswith("_")]
    return public or names

real_stdout = sys.stdout
sys.stdout = sys.stderr  # modules that print while importing must not spoil the JSON
results = []
for name in sys.argv[1:]:
    entry = {"distribution": name, "installed": False, "version": None, "modules": {}}
    dist = find(name)
    if dist is not None:
        entry["installed"] = True
        entry["version"] = dist.version
        for module in top_level_modules(dist):
            try:
                importlib.import_module(module)
                entry["modules"][module] = None
            except BaseException as err:
                entry["modules"][module] = "".join(traceback.format_exception_only(type(err), err)).strip()
    results.append(entry)
ok = all(e["installed"] and not any(e["modules"].values()) for e in results)
real_stdout.write(json.dumps({"ok": ok, "results": results}) + "\n")
real_stdout.flush()
sys.exit(0 if ok else 1)
"""

# Same shape as ``pip list --format json``, without needing pip in the image (an
# environment built with uv may have none). The first entry on sys.path wins, as in import.
PIP_LIST_PROGRAM = r"""
import importlib.metadata as md, json, re, sys
seen, out = set(), []
for dist in md.distributions():
    name = dist.metadata["Name"]
    if not name:
        continue
    key = re.sub(r"[-_.]+", "-", name).lower()
    if key in seen:
        continue
    seen.add(key)
    out.append({"name": name, "version": dist.version})
out.sort(key=lambda d: d["name"].lower())
sys.stdout.write(json.dumps(out) + "\n")
"""

_PYTHON_VERSION_PROGRAM = r"""
import sys
need = tuple(int(p) for p in sys.argv[1].split("."))
have = sys.version_info[:len(need)]
print("python %d.%d.%d" % sys.version_info[:3])
if have < need:
    print("python %s or newer is needed" % sys.argv[1], file=sys.stderr)
    sys.exit(1)
"""

_HOME_WRITABLE_PROGRAM = r"""
import os, sys, tempfile
home = os.path.expanduser("~")
try:
    with tempfile.NamedTemporaryFile(dir=home, prefix=".cnbi-check-"):
        pass
except OSError as err:
    print("home directory %s is not writable: %s" % (home, err), file=sys.stderr)
    sys.exit(1)
print(home)
"""


def requested_distribution_names(package_versions: list[str]) -> list[str]:
    """Distribution names from PEP 508 strings (``pandas>=2`` -> ``pandas``), in order, unique."""
    names, seen = [], set()
    for line in package_versions:
        try:
            name = Requirement(line).name
        except InvalidRequirement:
            continue
        key = canonicalize_name(name)
        if key not in seen:
            seen.add(key)
            names.append(name)
    return names


def plan_checks(
    requested_distributions: list[str],
    python_path: str,
    *,
    min_python: tuple[int, ...] = MIN_PYTHON,
) -> list[Check]:
    """The checks for an image whose notebook python is ``python_path``, in the order to run.

    The last one, ``packages``, prints the installed distributions as JSON
    (``manifest_from_pip_list`` turns that into ``status.packages``).
    """
    checks = [
        Check(
            "singleuser",
            ("jupyterhub-singleuser", "--version"),
            "jupyterhub-singleuser must be on PATH: JupyterHub starts the notebook server with it",
        ),
        Check(
            "python-version",
            (python_path, "-c", _PYTHON_VERSION_PROGRAM, ".".join(map(str, min_python))),
            "the notebook python is too old",
        ),
    ]
    if requested_distributions:
        checks.append(
            Check(
                "imports",
                (python_path, "-c", IMPORT_CHECK_PROGRAM, *requested_distributions),
                "every requested package must be installed and importable",
            )
        )
    checks += [
        Check(
            "login-shell",
            ("sh", "-c", LOGIN_SHELL_PROGRAM),
            "JupyterLab's terminal runs a login shell, which must find python and jupyter on its PATH",
        ),
        Check(
            "home-writable",
            (python_path, "-c", _HOME_WRITABLE_PROGRAM),
            "the notebook user must be able to write its home directory",
        ),
        Check(
            "packages",
            (python_path, "-c", PIP_LIST_PROGRAM),
            "listing installed packages",
        ),
    ]
    return checks


# JupyterLab's terminal starts `$SHELL -l` (bash or sh): /etc/profile may reset PATH there, so a
# venv on the image's ENV PATH alone is lost and `python` is "command not found" in the terminal.
LOGIN_SHELL_PROGRAM = r"""
for shell in bash sh; do
  if command -v "$shell" >/dev/null 2>&1; then
    exec "$shell" -lc 'missing=""
      for tool in python jupyter; do command -v "$tool" >/dev/null 2>&1 || missing="$missing $tool"; done
      if [ -n "$missing" ]; then
        echo "a login shell ($0) does not find$missing on its PATH ($PATH)" >&2; exit 1
      fi
      echo "a login shell finds $(command -v python) and $(command -v jupyter)"'
  fi
done
echo "the image has no shell" >&2
exit 1
"""


def _tail(text: str, lines: int = 5) -> str:
    kept = [line for line in text.strip().splitlines() if line.strip()]
    return "\n".join(kept[-lines:])


def interpret_check(check: Check, returncode: int, stdout: str, stderr: str) -> CheckResult:
    """What a check's exit code and output mean, with a message that names what failed."""
    if check.name == "imports":
        try:
            report = json.loads(stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            return CheckResult(
                check.name,
                False,
                f"import check crashed (exit {returncode}): {_tail(stderr) or 'no output'}",
            )
        problems = []
        for entry in report.get("results", []):
            if not entry.get("installed"):
                problems.append(f"{entry['distribution']}: not installed")
                continue
            for module, error in sorted(entry.get("modules", {}).items()):
                if error:
                    problems.append(
                        f"{entry['distribution']} {entry.get('version')}: import {module} failed: "
                        + error.splitlines()[-1]
                    )
        if problems or returncode != 0:
            return CheckResult(check.name, False, "; ".join(problems) or f"exit {returncode}")
        return CheckResult(check.name, True, f"{len(report.get('results', []))} packages import")
    if returncode != 0:
        detail = _tail(stderr) or _tail(stdout) or f"exit {returncode}"
        return CheckResult(check.name, False, f"{check.description}: {detail}")
    return CheckResult(check.name, True, _tail(stdout, 1))


def manifest_from_pip_list(pip_list: list[dict], requested: list[str]) -> list[dict]:
    """``status.packages`` (ODH notebook-python-dependencies shape) from the installed list.

    ``visible`` marks what the user asked for; ``requested`` may hold names or PEP 508 strings.
    """
    wanted = set()
    for item in requested:
        try:
            wanted.add(canonicalize_name(Requirement(item).name))
        except InvalidRequirement:
            wanted.add(canonicalize_name(item))
    manifest = []
    for entry in pip_list:
        name, version = entry.get("name"), entry.get("version")
        if not isinstance(name, str) or not isinstance(version, str):
            continue
        manifest.append(
            {"name": name, "version": version, "visible": canonicalize_name(name) in wanted}
        )
    manifest.sort(key=lambda item: (not item["visible"], item["name"].lower()))
    return manifest
