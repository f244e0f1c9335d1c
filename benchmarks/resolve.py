"""Resolving speed: uv (through ``resolve_lock``) against pip-compile, measured in one run.

pip-compile (pip-tools, ``pip-compile --generate-hashes``) is how meteor-operator resolves,
so it is the baseline; the ratio printed is baseline median / uv median (above 1 means uv
is faster). Cases, all for Python 3.11 on x86_64 Linux:

* ``data-science``: numpy, pandas, scipy, scikit-learn, matplotlib, seaborn, jupyterlab,
  ipywidgets, xarray, statsmodels -- must give a hash-pinned lock;
* ``conflict``: ``scipy==1.11.0`` with ``numpy>=2`` (scipy 1.11.0 needs numpy<1.28) -- must fail;
* ``missing``: ``six==999`` (no such version) -- must fail.

Each repetition gives each tool a fresh, empty cache directory (UV_CACHE_DIR for uv;
PIP_CACHE_DIR and ``--cache-dir`` for pip-compile) for the ``cold`` run, then runs again
with that same cache for the ``warm`` run. Locks are checked (non-empty, every pin hashed
with ``--hash=sha256:``, every requested package pinned) and failures must really be
resolution failures; if any run does not do what its case expects, the script says why and
exits 1 without printing a table, so numbers are never shown for a failed run.

Needs network access to PyPI (through the proxy whose CA is SSL_CERT_FILE, default
/etc/ssl/certs/ca-certificates.crt) and pip-tools in this venv (``uv pip install pip-tools``).

    .venv/bin/python benchmarks/resolve.py [--repeat N] [--cases data-science,conflict,missing]

Slow behind our proxy: one cold+warm pair of pip-compile on data-science took ~10 minutes
(the proxy's simple pages carry no PEP 658 metadata and no Cache-Control, so pip downloads
whole wheels to read their metadata and cannot reuse them warm; uv reads wheel metadata with
range requests and revalidates its cached pages). Use ``--repeat 1`` or ``--cases`` to
shorten it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from packaging.requirements import Requirement  # noqa: E402
from packaging.utils import canonicalize_name  # noqa: E402

from cnbi_hub.controller.resolve import (  # noqa: E402
    IndexSettings,
    ResolutionError,
    packages_from_lock,
    resolve_lock,
)

PYTHON_VERSION = "3.11"
CA_BUNDLE = os.environ.get("SSL_CERT_FILE") or "/etc/ssl/certs/ca-certificates.crt"
RUN_TIMEOUT = 900.0  # seconds; one run taking longer than this is a failure, not a number
HASH = "--hash=sha256:"


@dataclass(frozen=True)
class Case:
    name: str
    requirements: tuple[str, ...]
    resolvable: bool


CASES = {
    case.name: case
    for case in (
        Case(
            "data-science",
            ("numpy", "pandas", "scipy", "scikit-learn", "matplotlib", "seaborn",
             "jupyterlab", "ipywidgets", "xarray", "statsmodels"),
            True,
        ),
        Case("conflict", ("scipy==1.11.0", "numpy>=2"), False),
        Case("missing", ("six==999",), False),
    )
}  # fmt: skip


class RunFailed(Exception):
    """A run did not do what its case expects (or could not run at all)."""


def _tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def check_lock(tool: str, case: Case, text: str) -> int:
    """Raise RunFailed unless ``text`` is a non-empty hashed lock pinning every request."""
    if not text.strip():
        raise RunFailed(f"{tool} wrote an empty lock for {case.name}")
    if HASH not in text:
        raise RunFailed(f"{tool}'s lock for {case.name} has no {HASH} lines:\n{_tail(text)}")
    pins = packages_from_lock(text)
    if not pins:
        raise RunFailed(f"{tool}'s lock for {case.name} pins nothing:\n{_tail(text)}")
    # every pin carries at least one hash: split the lock into per-pin blocks
    blocks = [b for b in text.replace("\\\n", " ").splitlines() if "==" in b and not b.startswith("#")]
    unhashed = [b.split()[0] for b in blocks if HASH not in b]
    if unhashed:
        raise RunFailed(f"{tool}'s lock for {case.name} has pins without hashes: {unhashed}")
    pinned = {canonicalize_name(name) for name, _ in pins}
    wanted = {canonicalize_name(Requirement(r).name) for r in case.requirements}
    if wanted - pinned:
        raise RunFailed(f"{tool}'s lock for {case.name} lacks {sorted(wanted - pinned)}")
    return len(pins)


def run_uv(case: Case, cache: Path) -> tuple[float, str]:
    """One ``resolve_lock`` call with UV_CACHE_DIR=cache; returns (seconds, detail)."""
    os.environ["UV_CACHE_DIR"] = str(cache)  # resolve_lock passes UV_CACHE_DIR through to uv
    settings = IndexSettings(ca_bundle=CA_BUNDLE)
    start = time.perf_counter()
    try:
        result = asyncio.run(
            resolve_lock(
                list(case.requirements),
                python_version=PYTHON_VERSION,
                settings=settings,
                timeout=RUN_TIMEOUT,
            )
        )
    except ResolutionError as err:
        elapsed = time.perf_counter() - start
        if case.resolvable:
            raise RunFailed(f"uv failed on {case.name}:\n{_tail(err.message)}") from None
        lowered = err.message.lower()
        if not any(s in lowered for s in ("no solution found", "unsatisfiable", "no version of")):
            raise RunFailed(f"uv failed on {case.name} for a non-resolution reason:\n{err.message}")
        return elapsed, "failed as expected"
    elapsed = time.perf_counter() - start
    if not case.resolvable:
        raise RunFailed(f"uv resolved {case.name}, which must not resolve:\n{_tail(result.text)}")
    return elapsed, f"{check_lock('uv', case, result.text)} pins"


def _pip_env(cache: Path) -> dict[str, str]:
    # drop the host's pip settings (find-links to local wheels, index overrides, config
    # files) so pip-compile, like uv through IndexSettings(), resolves against PyPI only
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(
        PIP_CONFIG_FILE=os.devnull,
        PIP_CERT=CA_BUNDLE,
        PIP_CACHE_DIR=str(cache / "pip"),
        PIP_NO_INPUT="1",
        PIP_DISABLE_PIP_VERSION_CHECK="1",
        NO_COLOR="1",
    )
    return env


def run_pip_compile(case: Case, cache: Path, pip_compile: str) -> tuple[float, str]:
    """One ``pip-compile --generate-hashes`` with its caches under ``cache``."""
    with tempfile.TemporaryDirectory(prefix="bench-pip-compile-") as workdir:
        work = Path(workdir)
        (work / "requirements.in").write_text("\n".join(case.requirements) + "\n")
        argv = [
            pip_compile,
            "--generate-hashes",
            "--quiet",
            "--no-header",
            "--no-annotate",
            "--strip-extras",
            "--cache-dir", str(cache / "pip-tools"),
            "--output-file", "requirements.lock",
            "requirements.in",
        ]  # fmt: skip
        start = time.perf_counter()
        try:
            proc = subprocess.run(
                argv,
                cwd=workdir,
                env=_pip_env(cache),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=RUN_TIMEOUT,  # subprocess.run kills the child it started on timeout
            )
        except subprocess.TimeoutExpired:
            raise RunFailed(f"pip-compile took longer than {RUN_TIMEOUT:g}s on {case.name}") from None
        elapsed = time.perf_counter() - start
        lock = work / "requirements.lock"
        text = lock.read_text() if lock.exists() else ""
    output = proc.stderr + proc.stdout
    if case.resolvable:
        if proc.returncode != 0:
            raise RunFailed(f"pip-compile failed on {case.name} (exit {proc.returncode}):\n{_tail(output)}")
        return elapsed, f"{check_lock('pip-compile', case, text)} pins"
    if proc.returncode == 0:
        raise RunFailed(f"pip-compile resolved {case.name}, which must not resolve:\n{_tail(text)}")
    lowered = output.lower()
    if not any(s in lowered for s in ("resolutionimpossible", "could not find a version",
                                      "no matching distribution", "conflict")):
        raise RunFailed(f"pip-compile failed on {case.name} for a non-resolution reason:\n{_tail(output)}")
    return elapsed, "failed as expected"


def measure(cases: list[Case], repeat: int, pip_compile: str) -> dict:
    """samples[(tool, case, cache_state)] = [seconds, ...]; details likewise."""
    samples: dict[tuple[str, str, str], list[float]] = {}
    details: dict[tuple[str, str, str], str] = {}
    tools = {
        "uv": run_uv,
        "pip-compile": lambda case, cache: run_pip_compile(case, cache, pip_compile),
    }
    for case in cases:
        for rep in range(repeat):
            # tools alternate within a repetition so network or machine drift hits both
            for tool, run in tools.items():
                cache = Path(tempfile.mkdtemp(prefix=f"bench-{tool}-cache-"))
                try:
                    for state in ("cold", "warm"):
                        seconds, detail = run(case, cache)
                        samples.setdefault((tool, case.name, state), []).append(seconds)
                        details[(tool, case.name, state)] = detail
                        print(f"  {tool:<11} {case.name:<12} {state} {rep + 1}/{repeat}: {detail}",
                              file=sys.stderr, flush=True)
                finally:
                    shutil.rmtree(cache, ignore_errors=True)
    return {"samples": samples, "details": details}


def print_table(cases: list[Case], results: dict) -> None:
    samples, details = results["samples"], results["details"]
    header = f"{'tool':<12} {'case':<13} {'cache':<6} {'median s':>9} {'runs':>5}  {'result':<20} {'baseline/uv':>11}"
    print(header)
    print("-" * len(header))
    for case in cases:
        for state in ("cold", "warm"):
            uv_median = statistics.median(samples[("uv", case.name, state)])
            for tool in ("pip-compile", "uv"):
                runs = samples[(tool, case.name, state)]
                median = statistics.median(runs)
                ratio = f"{statistics.median(samples[('pip-compile', case.name, state)]) / uv_median:.1f}x" if tool == "uv" else "(baseline)"
                print(f"{tool:<12} {case.name:<13} {state:<6} {median:>9.2f} {len(runs):>5}  "
                      f"{details[(tool, case.name, state)]:<20} {ratio:>11}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=2,
                        help="runs per tool, case and cache state (1-10; default 2)")
    parser.add_argument("--cases", default=",".join(CASES),
                        help=f"comma-separated subset of {','.join(CASES)}")
    args = parser.parse_args()
    if not 1 <= args.repeat <= 10:
        parser.error("--repeat must be between 1 and 10")
    try:
        cases = [CASES[name] for name in args.cases.split(",") if name]
    except KeyError as err:
        parser.error(f"unknown case {err}; choose from {','.join(CASES)}")

    # pip-compile resolves for the interpreter it runs under; uv is told --python-version
    if f"{sys.version_info[0]}.{sys.version_info[1]}" != PYTHON_VERSION:
        print(f"run this with Python {PYTHON_VERSION} so pip-compile resolves for it too", file=sys.stderr)
        return 1
    pip_compile = shutil.which("pip-compile", path=str(Path(sys.executable).parent))
    if not pip_compile:
        print("pip-compile not found next to this interpreter; install pip-tools into the venv",
              file=sys.stderr)
        return 1
    version = subprocess.run([pip_compile, "--version"], capture_output=True, text=True, timeout=60)
    import uv

    uv_version = subprocess.run([uv.find_uv_bin(), "--version"], capture_output=True, text=True, timeout=60)
    print(f"{version.stdout.strip()}; {uv_version.stdout.strip()}; Python {PYTHON_VERSION}; "
          f"{args.repeat} run(s) each; fresh cache per tool and repetition", flush=True)

    try:
        results = measure(cases, args.repeat, pip_compile)
    except RunFailed as err:
        print(f"FAILED: {err}\nno times are reported for a failed run", file=sys.stderr)
        return 1
    finally:
        os.environ.pop("UV_CACHE_DIR", None)
    print_table(cases, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
