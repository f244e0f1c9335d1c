"""Image build speed: our build path against a plain ``pip install`` Containerfile, in one run.

The image is a PackageList of pandas + scikit-learn + matplotlib (none of them in the base
image) on ``localhost/cnbi/notebook-base:py311-user``. Three measurements, each ours against
the baseline, in this order (ours first each time, so any cold miss in the package proxy
is paid by us, not by the baseline):

* ``cold``: ours is what the reconciler runs -- ``resolve_lock`` with the base image's
  packages as constraints, ``plan_build``, ``PodmanBuilder.write_context`` + ``build_context`` --
  with an empty uv cache on both sides: the host's (UV_CACHE_DIR, used while resolving) and
  the build's cache mount (``--mount=type=cache,target=/cnbi-cache/uv``). Buildah keeps
  cache mounts under ``$TMPDIR/buildah-cache/<target>`` (TMPDIR default /var/tmp), so the
  builder here runs podman with TMPDIR set to a private directory: the plan's Containerfile
  is unchanged and nobody else's cache is touched. The baseline is the meteor-style recipe,
  ``FROM base`` / ``COPY requirements.txt`` / ``RUN pip install -r requirements.txt`` (the
  CA as a build secret, ``PIP_CERT``; ``--no-cache-dir``, which only spares it writing pip's
  cache into the layer). Both cold builds use ``--no-cache``, so no layer another build left
  in the shared storage is reused.
* ``warm``: the same list plus seaborn, built with the layer cache and (ours) the uv caches
  the cold run filled: a changed requirements.txt for the baseline; for us what the reconciler
  does on such a rebuild: a new lock, and a build FROM the cold image installing only the
  lock difference (``lock_difference``).
* ``fail``: time to Failed for ``scikit-learn==999`` (with pandas and matplotlib): ours is
  ``resolve_lock`` raising ResolutionError (empty uv cache again), the baseline is its
  podman build failing in ``pip install``. For information, ours is also timed with the
  host uv cache the cold and warm runs filled (a running service's situation); the goal is
  judged on the empty-cache time.

Each built image must import its packages (``python -c "import pandas, sklearn,
matplotlib"``, plus seaborn for the warm builds) and each failure must be a resolution
failure; otherwise the script says what went wrong and exits 1 without a table. Ratios are
baseline / ours, so above 1 means we are faster; goals: cold >= 2x, warm >= 5x, fail >= 10x.
Only the images this run tagged (``localhost/cnbi-bench/build-*``) and its own temporary
directories are removed at the end.

Needs rootful podman with the base image in local storage and PyPI through the proxy whose
CA is SSL_CERT_FILE (default /etc/ssl/certs/ca-certificates.crt). Several minutes per
repetition (the proxy is the slow part):

    .venv/bin/python benchmarks/build.py [--repeat N]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cnbi_hub.containers import podman_environ
from cnbi_hub.controller.builders.podman import BuildError, PodmanBuilder
from cnbi_hub.controller.buildplan import (
    BuildObservations,
    plan_build,
    spec_hash,
    uv_config_toml,
)
from cnbi_hub.controller.resolve import (
    IndexSettings,
    ResolutionError,
    constraints_from_pip_list,
    resolve_lock,
    lock_difference,
)

BASE = "localhost/cnbi/notebook-base:py311-user"
CA_BUNDLE = os.environ.get("SSL_CERT_FILE") or "/etc/ssl/certs/ca-certificates.crt"
BENCH_REPO = "localhost/cnbi-bench"
PACKAGES = ["pandas", "scikit-learn", "matplotlib"]
WARM_PACKAGES = [*PACKAGES, "seaborn"]
FAIL_PACKAGES = ["pandas", "matplotlib", "scikit-learn==999"]
IMPORTS = "import pandas, sklearn, matplotlib"
WARM_IMPORTS = IMPORTS + ", seaborn"
GOALS = {"cold": 2.0, "warm": 5.0, "fail": 10.0}
BUILD_TIMEOUT = 1800.0  # one build taking longer is a failure, not a number
RESOLVE_TIMEOUT = 600.0

# the meteor-style recipe: nothing but the base, the list and pip (CA as a secret, never in a layer)
PLAIN_CONTAINERFILE = """\
FROM {base}
COPY requirements.txt /tmp/requirements.txt
RUN --mount=type=secret,id=ca,target=/run/secrets/ca,mode=0444 \\
    PIP_CERT=/run/secrets/ca pip install --no-cache-dir --disable-pip-version-check \\
        -r /tmp/requirements.txt
"""


class RunFailed(Exception):
    """A measurement did not do what it must (no image, wrong failure, ...)."""


def _tail(text: str, lines: int = 20) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def say(message: str) -> None:
    print(f"  {message}", file=sys.stderr, flush=True)


@dataclass
class Timing:
    total: float
    #: named parts of ``total`` (resolve, context, build: startup, install, commit)
    parts: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    image: str | None = None


class BenchBuilder(PodmanBuilder):
    """The reconciler's PodmanBuilder, with podman's TMPDIR private (so the build's uv cache
    mount starts empty) and, for cold builds, ``--no-cache`` (no layer reuse)."""

    def __init__(self, tmpdir: Path, **kwargs):
        super().__init__(**kwargs)
        self.tmpdir = tmpdir
        self.no_cache = False

    @property
    def env(self) -> dict:
        return podman_environ({**os.environ, "TMPDIR": str(self.tmpdir)})

    async def _run(self, *args, **kwargs):
        if args and args[0] == "build" and self.no_cache:
            args = ("build", "--no-cache", *args[1:])
        return await super()._run(*args, **kwargs)


class BuildClock:
    """A log callback that timestamps the build's phases from podman's own output.

    startup = podman start to the RUN step; install = RUN step to the installer's final line
    (uv's ``Installed N packages``, pip's ``Successfully installed``); commit = from there to
    buildah's ``--> <id>`` for that step (the new layer written to storage); finish = the rest
    (the metadata-only USER/LABEL steps, the image commit, tagging, podman's exit)."""

    def __init__(self, done_marker: str):
        self.start = time.perf_counter()
        self.done_marker = done_marker
        self.run_step: float | None = None
        self.installed: float | None = None
        self.committed: float | None = None
        #: the RUN step came from the layer cache: the build measured nothing
        self.cached = False
        self.notes: list[str] = []

    def __call__(self, line: str) -> None:
        now = time.perf_counter()
        stripped = line.strip()
        if (
            self.run_step is not None
            and self.installed is None
            and "Using cache" in stripped
        ):
            self.cached = True
        if (
            stripped.startswith("STEP ")
            and ": RUN " in stripped
            and self.run_step is None
        ):
            self.run_step = now
        if (
            self.run_step is not None
            and self.installed is None
            and stripped.startswith(self.done_marker)
        ):
            self.installed = now
        if (
            self.installed is not None
            and self.committed is None
            and stripped.startswith("--> ")
        ):
            self.committed = now
        if stripped.startswith(
            ("Resolved ", "Prepared ", "Installed ", "Uninstalled ")
        ):
            self.notes.append(stripped)  # uv's own summary lines

    def parts(self, end: float) -> dict[str, float]:
        if self.run_step is None or self.installed is None:
            return {"build": end - self.start}
        committed = self.committed or end
        return {
            "startup": self.run_step - self.start,
            "install": self.installed - self.run_step,
            "commit": committed - self.installed,
            "finish": end - committed,
        }


def podman(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["podman", *args],
        env=podman_environ(),
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=timeout,
        check=False,
    )


def verify_image(image: str, imports: str) -> None:
    proc = podman(
        "run", "--rm", "--network=host", "--entrypoint=python", image, "-c", imports
    )
    if proc.returncode != 0:
        raise RunFailed(
            f"{image}: `python -c {imports!r}` failed:\n{_tail(proc.stderr + proc.stdout)}"
        )


class Bench:
    def __init__(self, workdir: Path, run_id: str):
        self.workdir = workdir
        self.run_id = run_id
        self.builder = BenchBuilder(
            workdir / "podman-tmp", ca_bundle=CA_BUNDLE, build_timeout=BUILD_TIMEOUT
        )
        self.tagged: list[str] = []
        self.built: dict[str, tuple[str, str]] = {}  # name -> (image@digest, lock text)
        self.settings = IndexSettings(ca_bundle=CA_BUNDLE)
        self.pinned = ""
        self.info = None

    def target(self, name: str) -> str:
        image = f"{BENCH_REPO}/build-{self.run_id}:{name}"
        self.tagged.append(image)
        return image

    async def prepare(self) -> None:
        self.fresh_caches()
        digest = await self.builder.local_digest(BASE)
        if not digest:
            raise RunFailed(f"{BASE} is not in local storage")
        self.pinned = f"{BASE.rsplit(':', 1)[0]}@{digest}"
        self.info = await self.builder.inspect_base(self.pinned)
        present = {p["name"].lower() for p in self.info.packages}
        already = [p for p in WARM_PACKAGES if p.lower() in present]
        if already:
            raise RunFailed(
                f"the base image already has {already}; the benchmark needs them absent"
            )
        print(
            f"base {self.pinned}: python {self.info.python_full_version} at {self.info.python_path}, "
            f"user {self.info.user}, {len(self.info.packages)} packages (none of {WARM_PACKAGES})",
            flush=True,
        )

    def fresh_caches(self) -> None:
        """Empty uv caches: the host's for resolving, the build's cache mount (via TMPDIR)."""
        for path in (self.workdir / "uv-cache", self.workdir / "podman-tmp"):
            shutil.rmtree(path, ignore_errors=True)
            path.mkdir(parents=True)
        os.environ["UV_CACHE_DIR"] = str(
            self.workdir / "uv-cache"
        )  # resolve_lock passes it on

    # --- ours: the reconciler's Resolving + Building work ---------------------------------------

    async def ours(
        self, packages: list[str], name: str, imports: str, cold: bool, previous: tuple | None = None
    ) -> Timing:
        """Our path; with `previous` = (image@digest, its lock), the reconciler's rebuild:
        FROM the previous generation, installing only the lock difference."""
        info = self.info
        start = time.perf_counter()
        lock = await resolve_lock(
            packages,
            python_version=info.python_version,
            constraints=constraints_from_pip_list(info.packages),
            settings=self.settings,
            timeout=RESOLVE_TIMEOUT,
        )
        resolved = time.perf_counter()
        obj = {
            "metadata": {
                "name": f"bench-{name}",
                "uid": f"bench-{self.run_id}-{name}",
                "annotations": {"opendatahub.io/notebook-image-creator": "bench"},
            },
            "spec": {"buildType": "PackageList", "packageVersions": packages},
        }
        target = self.target(f"ours-{name}")
        build_from, lock_text = self.pinned, lock.text
        if previous is not None:
            delta = lock_difference(lock.text, previous[1])
            if not delta:
                raise RunFailed("the warm lock is not a superset of the cold one: nothing to layer on")
            build_from, lock_text = previous[0], delta
        observations = BuildObservations(
            resolved_base_image=build_from,
            base_user=info.user or "root",
            python_path=info.python_path,
            python_env_owned_by_user=info.env_owned_by_user,
            spec_hash=spec_hash(obj, self.pinned, lock.sha256),
            target=target,
            lock_text=lock_text,
            base_uid=info.uid,
        )
        plan = plan_build(obj, observations)
        build_secrets = {
            "cnbi-ca": Path(CA_BUNDLE).read_text(),
            "cnbi-uv-config": uv_config_toml(None),
        }
        context = self.workdir / f"ours-{name}" / "context"
        secret_files = await asyncio.to_thread(
            self.builder.write_context, plan, context, None, build_secrets
        )
        written = time.perf_counter()
        clock = BuildClock("Installed ")
        self.builder.no_cache = cold
        try:
            digest = await self.builder.build_context(plan, context, secret_files, clock)
        except BuildError as err:
            raise RunFailed(f"our {name} build failed: {err}") from None
        finally:
            self.builder.no_cache = False
        end = time.perf_counter()
        if clock.cached:
            raise RunFailed(
                f"our {name} build reused a cached install layer; not a measurement"
            )
        verify_image(target, imports)
        parts = {
            "resolve": resolved - start,
            "context": written - resolved,
            **clock.parts(end),
        }
        notes = [f"{len(lock.packages)} pins"] + clock.notes
        self.built[name] = (f"{target.rsplit(':', 1)[0]}@{digest}", lock.text)
        return Timing(end - start, parts, notes, target)

    # --- the baseline: a plain Containerfile with pip install ---------------------------------

    async def plain(
        self, packages: list[str], name: str, imports: str | None, cold: bool
    ) -> Timing:
        start = time.perf_counter()
        context = self.workdir / f"plain-{name}"
        shutil.rmtree(context, ignore_errors=True)
        context.mkdir(parents=True)
        (context / "requirements.txt").write_text("\n".join(packages) + "\n")
        (context / "Containerfile").write_text(
            PLAIN_CONTAINERFILE.format(base=self.pinned)
        )
        target = self.target(f"plain-{name}")
        args = [
            "build",
            "--network=host",
            "--layers",
            "--pull=never",
            f"--secret=id=ca,src={CA_BUNDLE}",
            "-f",
            str(context / "Containerfile"),
            "-t",
            target,
            str(context),
        ]
        if cold:
            args.insert(1, "--no-cache")
        clock = BuildClock("Successfully installed")
        # the same podman runner (environment, process group handling) as our builds
        code, tail, _ = await self.builder._run(*args, timeout=BUILD_TIMEOUT, log=clock)
        end = time.perf_counter()
        if imports is None:  # a build that must fail
            if code == 0:
                raise RunFailed(f"the plain {name} build succeeded but must fail")
            lowered = tail.lower()
            if not any(
                s in lowered
                for s in ("no matching distribution", "could not find a version")
            ):
                raise RunFailed(
                    f"the plain {name} build failed for another reason:\n{_tail(tail)}"
                )
            return Timing(end - start, {}, ["pip: no matching distribution"])
        if code != 0:
            raise RunFailed(
                f"the plain {name} build failed (exit {code}):\n{_tail(tail)}"
            )
        if clock.cached:
            raise RunFailed(
                f"the plain {name} build reused a cached install layer; not a measurement"
            )
        verify_image(target, imports)
        return Timing(end - start, clock.parts(end), [], target)

    async def ours_fail(self) -> Timing:
        start = time.perf_counter()
        try:
            lock = await resolve_lock(
                FAIL_PACKAGES,
                python_version=self.info.python_version,
                constraints=constraints_from_pip_list(self.info.packages),
                settings=self.settings,
                timeout=RESOLVE_TIMEOUT,
            )
        except ResolutionError as err:
            end = time.perf_counter()
            lowered = err.message.lower()
            if not any(
                s in lowered
                for s in ("no solution found", "unsatisfiable", "no version of")
            ):
                raise RunFailed(
                    f"resolve_lock failed for a non-resolution reason:\n{err.message}"
                ) from None
            return Timing(
                end - start,
                {"resolve": end - start},
                [err.message.splitlines()[0][:70]],
            )
        raise RunFailed(
            f"resolve_lock resolved {FAIL_PACKAGES}, which must fail:\n{_tail(lock.text)}"
        )

    async def repetition(self, rep: int, results: dict) -> None:
        def record(case: str, tool: str, timing: Timing) -> None:
            results.setdefault((case, tool), []).append(timing)
            parts = ", ".join(f"{k} {v:.1f}s" for k, v in timing.parts.items())
            say(
                f"rep {rep + 1} {case:<4} {tool:<5} {timing.total:7.1f}s  [{parts}]  {'; '.join(timing.notes)}"
            )

        self.fresh_caches()
        record(
            "cold", "ours", await self.ours(PACKAGES, f"cold{rep}", IMPORTS, cold=True)
        )
        record(
            "cold",
            "plain",
            await self.plain(PACKAGES, f"cold{rep}", IMPORTS, cold=True),
        )
        record(
            "warm",
            "ours",
            await self.ours(WARM_PACKAGES, f"warm{rep}", WARM_IMPORTS, cold=False,
                            previous=self.built[f"cold{rep}"]),
        )
        record(
            "warm",
            "plain",
            await self.plain(WARM_PACKAGES, f"warm{rep}", WARM_IMPORTS, cold=False),
        )
        # for information: the same failure with the uv cache a running service has
        record("fail-warm-cache", "ours", await self.ours_fail())
        self.fresh_caches()
        record("fail", "ours", await self.ours_fail())
        record(
            "fail",
            "plain",
            await self.plain(FAIL_PACKAGES, f"fail{rep}", None, cold=False),
        )
        # a later repetition must not find this one's layers in the cache
        await self.cleanup()

    async def cleanup(self) -> None:
        while self.tagged:
            await self.builder.remove_image(self.tagged.pop())


def print_table(results: dict) -> bool:
    header = (
        f"{'case':<5} {'path':<6} {'median s':>9} {'runs':>4}  {'where the time went (median s)':<72}"
        f" {'plain/ours':>10}  goal"
    )
    print(header)
    print("-" * len(header))
    all_met = True
    for case in ("cold", "warm", "fail"):
        medians = {
            tool: statistics.median(t.total for t in results[(case, tool)])
            for tool in ("plain", "ours")
        }
        ratio = medians["plain"] / medians["ours"]
        met = ratio >= GOALS[case]
        all_met &= met
        for tool in ("plain", "ours"):
            timings = results[(case, tool)]
            keys = list(timings[0].parts)
            parts = ", ".join(
                f"{k} {statistics.median(t.parts.get(k, float('nan')) for t in timings):.1f}"
                for k in keys
            )
            tail = (
                f" {ratio:>9.1f}x  >= {GOALS[case]:g}x {'met' if met else 'NOT met'}"
                if tool == "ours"
                else f" {'(baseline)':>10}"
            )
            print(
                f"{case:<5} {tool:<6} {medians[tool]:>9.1f} {len(timings):>4}  {parts:<72}{tail}"
            )
    warm_fail = statistics.median(t.total for t in results[("fail-warm-cache", "ours")])
    plain_fail = statistics.median(t.total for t in results[("fail", "plain")])
    print(
        f"(information: ours fails in {warm_fail:.2f} s with the host uv cache already holding these "
        f"projects' pages, {plain_fail / warm_fail:.1f}x; the goal above is judged on the empty cache)"
    )
    return all_met


def tool_versions() -> tuple[str, str]:
    import uv

    uv_version = subprocess.run(
        [uv.find_uv_bin(), "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return podman("--version").stdout.strip(), uv_version.stdout.strip()


async def amain(repeat: int) -> int:
    run_id = f"{os.getpid()}-{secrets.token_hex(3)}"
    workdir = Path(tempfile.mkdtemp(prefix="cnbi-bench-build-", dir="/var/tmp"))
    bench = Bench(workdir, run_id)
    results: dict = {}
    try:
        await bench.prepare()
        podman_version, uv_version = await asyncio.to_thread(tool_versions)
        print(
            f"{podman_version}; {uv_version}; packages {PACKAGES} (+seaborn warm; fail: {FAIL_PACKAGES}); "
            f"{repeat} repetition(s); 2 cores shared with other work",
            flush=True,
        )
        for rep in range(repeat):
            await bench.repetition(rep, results)
    except RunFailed as err:
        print(f"FAILED: {err}\nno times are reported for a failed run", file=sys.stderr)
        return 1
    finally:
        os.environ.pop("UV_CACHE_DIR", None)
        await bench.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)
    print_table(results)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="repetitions of all three cases (1-5; default 1)",
    )
    args = parser.parse_args()
    if not 1 <= args.repeat <= 5:
        parser.error("--repeat must be between 1 and 5")
    return asyncio.run(amain(args.repeat))


if __name__ == "__main__":
    sys.exit(main())
