"""The reconciler engine: drives every CustomNBImage through its phases.

The decisions are in statemachine.py (pure); this module does each phase's work and writes what
it observed: Prepare pins images and repositories, Resolving locks packages with uv, Building
runs the build plan and the acceptance checks. In embedded mode it runs inside the service
process with the podman builder; the registry client, resolver, plan and checks are the same
ones the cluster operator uses.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

from prometheus_client import Counter, Gauge, Histogram
from traitlets import Bool, Dict, Float, Instance, Integer, List, Unicode, default
from traitlets.config import LoggingConfigurable

from .. import model
from ..imageref import ImageReference, parse_image_reference
from ..model import PHASE_BUILDING, PHASE_PENDING, PHASE_PREPARE, PHASE_READY, PHASE_RESOLVING
from ..store.base import NotFound, modify_status
from ..trust import machine_ca_bundle
from . import gitsource
from .buildlog import BuildLog
from .buildplan import BuildObservations, PlanError, plan_build, spec_hash, uv_config_toml
from .builders.podman import BuildError, PodmanBuilder
from .checks import interpret_check, manifest_from_pip_list, plan_checks, requested_distribution_names
from .registry import (
    ImageNotFound,
    ImageUnauthorized,
    RegistryClient,
    RegistryError,
    RegistryUnreachable,
    credentials_for,
)
from .resolve import (
    IndexSettings,
    ResolutionError,
    constraints_from_pip_list,
    lock_difference,
    lock_entries,
    resolve_lock,
    validate_requirement,
)
from .statemachine import Outcome, advance, queued, restart, run_separator

BUILDS = Counter("cnbi_builds_total", "Images that reached a final phase, by outcome", ["outcome"])
PHASE_SECONDS = Histogram(
    "cnbi_phase_duration_seconds", "Time spent in each phase's work", ["phase"],
    buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800),
)
QUEUE_LENGTH = Gauge("cnbi_build_queue_length", "Images waiting in Pending for a build slot")
RUNNING = Gauge("cnbi_builds_running", "Images being prepared, resolved or built now")

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
_SECRET_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")


class Reconciler(LoggingConfigurable):
    """Drives images from Pending to Ready or Failed, at most `max_concurrent_builds` at once."""

    max_concurrent_builds = Integer(
        2, help="How many images are prepared/resolved/built at once; the rest wait in Pending with a queue position."
    ).tag(config=True)

    index_url = Unicode(
        help="""Package index URL for resolving and installing (e.g. a corporate mirror).
        Default: $UV_INDEX_URL or $PIP_INDEX_URL if set, else PyPI."""
    ).tag(config=True)

    @default("index_url")
    def _default_index_url(self):
        return os.environ.get("UV_INDEX_URL") or os.environ.get("PIP_INDEX_URL") or ""

    extra_index_urls = List(Unicode(), help="Further package indexes, searched after index_url.").tag(config=True)

    ca_bundle = Unicode(
        help="""PEM CA bundle trusted when reaching package indexes, in resolving and in builds
        (mounted as a build secret, never stored in the image). Default: $SSL_CERT_FILE, else
        the machine's own trust store (cnbi_hub.trust.machine_ca_bundle), so a corporate
        proxy's CA that the admin installed on the host is trusted by builds too."""
    ).tag(config=True)

    @default("ca_bundle")
    def _default_ca_bundle(self):
        return machine_ca_bundle()

    push_registry = Unicode(
        "",
        help="""Registry (and namespace) Ready images are pushed to, e.g. `registry.example.org/notebooks`.
        Empty: images stay in this machine's podman storage (enough for PodmanSpawner).""",
    ).tag(config=True)

    insecure_registries = List(
        Unicode(),
        help="""Registries (host:port) reached over plain http. Loopback registries (127.0.0.1, localhost)
        always are, as with docker and podman.""",
    ).tag(config=True)

    auth_file = Unicode(
        "", help="A containers auth.json / docker config.json with credentials for pulling base images."
    ).tag(config=True)

    pull_secrets_dir = Unicode(
        "",
        help="""Embedded mode's stand-in for Kubernetes Secrets: `spec.imagePullSecret.name` refers to
        `<pull_secrets_dir>/<name>.json`, a `.dockerconfigjson` document.""",
    ).tag(config=True)

    base_images = List(Dict(), help="The service's base_images (for runtimeEnvironment requests).")

    allowed_git_schemes = List(Unicode(), ["https"], help="Git URL schemes builds may fetch from.")

    work_dir = Unicode(help="Where build contexts and checkouts live while an image is built.").tag(config=True)

    lock_cache_seconds = Float(
        600.0,
        help="""How long a resolved lock is reused for the same requirements on the same base image,
        sparing the index a second resolution (identical requests reach Ready in about a second).""",
    ).tag(config=True)

    resolve_timeout = Float(300.0, help="Seconds a resolution may take.").tag(config=True)

    keep_failed_contexts = Bool(False, help="Keep the build context of Failed images for debugging.").tag(config=True)

    store = Instance(object, allow_none=True)
    builder = Instance(PodmanBuilder, allow_none=True)
    registry = Instance(RegistryClient, allow_none=True)

    def __init__(self, *, store, publish: Callable[[tuple], None] = lambda event: None, **kwargs):
        super().__init__(store=store, **kwargs)
        self.publish = publish
        if self.builder is None:
            self.builder = PodmanBuilder(parent=self)
        if self.registry is None:
            self.registry = RegistryClient(parent=self)
        self._tasks: dict[str, asyncio.Task] = {}  # uid -> drive task
        self._names: dict[str, str] = {}  # uid -> name
        self._logs: dict[str, BuildLog] = {}
        self._targets: dict[str, str] = {}  # uid -> image being built (removed if cancelled)
        self._lock_cache: dict[tuple, tuple[float, object]] = {}
        self._schedule_lock = asyncio.Lock()
        self._watcher: asyncio.Task | None = None

    # --- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        changes = self.store.watch()  # before listing, so nothing created meanwhile is missed
        for obj in await self.store.list():
            if model.phase_of(obj) in (PHASE_PREPARE, PHASE_RESOLVING, PHASE_BUILDING):
                self.log.info("image %s was in %s when the service stopped: starting it again",
                              model.name_of(obj), model.phase_of(obj))
                await self._write_status(model.name_of(obj), obj["metadata"]["uid"], restart(obj))
        self._watcher = asyncio.create_task(self._watch(changes))
        await self.schedule()

    async def stop(self) -> None:
        if self._watcher:
            self._watcher.cancel()
        for task in list(self._tasks.values()):
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)

    async def _watch(self, changes) -> None:
        with changes:
            while True:
                event = await changes.get()
                uid = event.object["metadata"].get("uid")
                if event.type == "DELETED":
                    task = self._tasks.get(uid)
                    if task:
                        self.log.info("image %s deleted during its build: stopping it", model.name_of(event.object))
                        task.cancel()
                    await self.schedule()
                elif event.type == "MODIFIED" and model.phase_of(event.object) in model.TERMINAL_PHASES:
                    task = self._tasks.get(uid)
                    if task and model.phase_of(event.object) == model.PHASE_FAILED:
                        # someone cancelled the build (api/images/{name}/cancel): stop its work
                        name = model.name_of(event.object)
                        reason = _cancel_message(event.object)
                        if reason:
                            self._log_line(name, uid, f"==> {reason}")
                            self.log.info("image %s: %s", name, reason)
                            task.cancel()
                    await self.schedule()
                elif event.type == "ADDED" or (
                    event.type == "MODIFIED" and model.phase_of(event.object) == PHASE_PENDING and uid not in self._tasks
                ):
                    await self.schedule()

    async def schedule(self) -> None:
        """Start work on the oldest Pending images while slots are free; number the rest."""
        async with self._schedule_lock:
            waiting = [o for o in await self.store.list(phase=PHASE_PENDING) if o["metadata"]["uid"] not in self._tasks]
            waiting.sort(key=lambda o: (o["metadata"].get("creationTimestamp", ""), o["metadata"]["uid"]))
            while waiting and len(self._tasks) < self.max_concurrent_builds:
                obj = waiting.pop(0)
                uid = obj["metadata"]["uid"]
                self._names[uid] = model.name_of(obj)
                self._tasks[uid] = asyncio.create_task(self._drive(model.name_of(obj), uid))
            QUEUE_LENGTH.set(len(waiting))
            RUNNING.set(len(self._tasks))
            for position, obj in enumerate(waiting, start=1):
                status = queued(obj, position)
                if status is not None:
                    await self._write_status(model.name_of(obj), obj["metadata"]["uid"], status)

    # --- driving one image ------------------------------------------------------------------

    async def _drive(self, name: str, uid: str) -> None:
        self._logs.setdefault(uid, BuildLog())
        flusher = asyncio.create_task(self._flush_log_periodically(name, uid))
        cancelled = False
        try:
            await self._drive_phases(name, uid)
        except asyncio.CancelledError:
            cancelled = True  # DELETE of the image, or the service stopping
            raise
        except Exception:
            self.log.exception("reconciling image %s failed unexpectedly", name)
        finally:
            flusher.cancel()
            self._tasks.pop(uid, None)
            await self._save_log(name, uid)
            self._logs.pop(uid, None)
            await self._cleanup(uid, cancelled)
            asyncio.get_running_loop().call_soon(lambda: asyncio.ensure_future(self.schedule()))

    async def _drive_phases(self, name: str, uid: str) -> None:
        try:
            separator = run_separator((await self.store.get(name)).get("status") or {})
        except NotFound:
            return
        if separator:
            self._log_line(name, uid, separator)
        while True:
            try:
                obj = await self.store.get(name)
            except NotFound:
                return
            if obj["metadata"]["uid"] != uid or model.phase_of(obj) in model.TERMINAL_PHASES:
                return
            phase = model.phase_of(obj)
            started = time.monotonic()
            outcome = await self._work(phase, obj)
            PHASE_SECONDS.labels(phase).observe(time.monotonic() - started)
            status = advance(obj, outcome)
            detail = f": {outcome.message}" if outcome.message else ""
            self._log_line(name, uid, f"==> {phase} -> {status['phase']} ({outcome.reason}){detail}")
            if status["phase"] in model.TERMINAL_PHASES:
                BUILDS.labels("reused" if status.get("reusedFrom") else status["phase"].lower()).inc()
                await self._save_log(name, uid)
            if not await self._write_status(name, uid, status, expected_phase=phase):
                return

    async def _work(self, phase: str, obj: dict) -> Outcome:
        step = {
            PHASE_PENDING: self.begin,
            PHASE_PREPARE: self.prepare,
            PHASE_RESOLVING: self.resolve,
            PHASE_BUILDING: self.build,
        }[phase]
        try:
            return await step(obj)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a bug or a broken machine: say so on the object, not in a log only
            self.log.exception("%s of %s failed", phase, model.name_of(obj))
            return Outcome(False, "InternalError", f"{type(e).__name__}: {e}")

    async def _write_status(self, name: str, uid: str, status: dict, expected_phase: str | None = None) -> bool:
        """Write `status` unless the object is gone, was replaced, or (with `expected_phase`)
        left that phase meanwhile: a build that was cancelled stays cancelled."""

        def change(current: dict) -> dict | None:
            if current["metadata"]["uid"] != uid:
                return None
            if expected_phase is not None and model.phase_of(current) != expected_phase:
                return None
            written.append(True)
            return status

        written: list[bool] = []
        try:
            await modify_status(self.store, name, change)
        except NotFound:
            return False
        return bool(written)

    def _log_line(self, name: str, uid: str, line: str) -> None:
        log = self._logs.get(uid)
        if log is not None:
            log.append(line)
        self.publish(("log", {"metadata": {"name": name, "uid": uid}, "line": line}))

    def logger_for(self, obj: dict):
        name, uid = model.name_of(obj), obj["metadata"]["uid"]
        return lambda line: self._log_line(name, uid, line)

    async def _save_log(self, name: str, uid: str) -> None:
        log = self._logs.get(uid)
        if log is None:
            return
        try:
            await self.store.put_artifact(name, "log", log.text())
        except NotFound:
            pass

    async def _flush_log_periodically(self, name: str, uid: str) -> None:
        while True:
            await asyncio.sleep(2)
            await self._save_log(name, uid)

    def _context_dir(self, uid: str) -> Path:
        return Path(self.work_dir) / uid

    async def _cleanup(self, uid: str, cancelled: bool) -> None:
        """Remove what a build left behind: its context always, its half-made image if cancelled."""
        work = self._context_dir(uid)
        if work.exists() and not self.keep_failed_contexts:
            await asyncio.to_thread(shutil.rmtree, work, True)
        target = self._targets.pop(uid, None)
        if cancelled and target:
            await self.builder.remove_image(target)

    # --- the phases' work -------------------------------------------------------------------

    async def begin(self, obj: dict) -> Outcome:
        return Outcome(True, "Started", "a build slot is free")

    def base_reference(self, obj: dict) -> str:
        spec = obj["spec"]
        if spec["buildType"] == "ImageImport":
            return spec["fromImage"]
        if spec.get("baseImage"):
            return spec["baseImage"]
        wanted = (spec.get("runtimeEnvironment") or {}).get("pythonVersion")
        for entry in self.base_images:
            if wanted and entry.get("pythonVersion") == wanted:
                return entry["image"]
        offered = ", ".join(sorted({e["pythonVersion"] for e in self.base_images if e.get("pythonVersion")})) or "none"
        raise LookupError(f"no base image offers Python {wanted} (offered: {offered}); ask your admin or name spec.baseImage")

    def _auth_documents(self, obj: dict | None) -> list[dict]:
        """Credentials documents for pulling: the object's pull secret first, then the auth file."""
        documents = []
        secret = ((obj or {}).get("spec", {}).get("imagePullSecret") or {}).get("name")
        if secret:
            # a DNS name, as Secret names are: never a path that could leave the directory
            if not _SECRET_NAME.match(secret) or not self.pull_secrets_dir:
                raise LookupError(f"pull secret {secret} does not exist")
            path = Path(self.pull_secrets_dir) / f"{secret}.json"
            if not path.is_file():
                raise LookupError(f"pull secret {secret} does not exist")
            documents.append(json.loads(path.read_text()))
        if self.auth_file and os.path.isfile(self.auth_file):
            documents.append(json.loads(Path(self.auth_file).read_text()))
        return documents

    def _is_insecure(self, ref: ImageReference) -> bool:
        host = ref.registry.rsplit(":", 1)[0] if not ref.registry.startswith("[") else ref.registry.split("]")[0] + "]"
        return host in LOOPBACK_HOSTS or ref.registry in self.insecure_registries

    def _registry_access(self, ref: ImageReference, documents: list[dict]):
        """(client, credentials or None, insecure) for one image's registry."""
        insecure = self._is_insecure(ref)
        client = self.registry
        if insecure and ref.registry not in client.insecure_registries:
            client = RegistryClient(parent=self, insecure_registries=[*client.insecure_registries, ref.registry])
        credentials = credentials_for(ref.registry, documents, ref.repository) if documents else None
        return client, credentials, insecure

    async def pin_image(self, text: str, obj: dict) -> tuple[str, str]:
        """`text` -> (name@digest, digest), pulled into local storage. Raises with a message
        that says what is wrong: missing, unauthorized, unreachable."""
        ref = parse_image_reference(text)
        if ref.registry == "localhost":
            # podman's own namespace: such images live only in this machine's storage
            local = await self.builder.local_image(str(ref))
            if not local:
                raise ImageNotFound(f"image {text} does not exist in this machine's image storage")
            return str(ref.with_digest(local.digest)), local.digest
        client, credentials, insecure = self._registry_access(ref, self._auth_documents(obj))
        resolved = await client.resolve(ref, auth=credentials and (credentials.username, credentials.password))
        pinned = str(ref.with_digest(resolved.digest))
        if not await self.builder.local_digest(pinned):
            authfile = _write_authfile(ref.registry, credentials) if credentials else None
            try:
                await self.builder.pull(pinned, tls_verify=not insecure, authfile=authfile)
            finally:
                if authfile:
                    os.unlink(authfile)
        return pinned, resolved.digest

    async def check_image(self, text: str) -> dict:
        """`GET api/check-image`: does this image exist, and as what digest and platforms."""
        ref = parse_image_reference(text)
        if ref.registry == "localhost":
            local = await self.builder.local_image(str(ref))
            if not local:
                return {"exists": False, "digest": None, "platforms": []}
            return {"exists": True, "digest": local.digest, "platforms": [local.platform]}
        client, credentials, _ = self._registry_access(ref, self._auth_documents(None))
        return await client.exists(ref, auth=credentials and (credentials.username, credentials.password))

    async def _artifact_or_none(self, name: str, kind: str) -> str | None:
        try:
            return await self.store.get_artifact(name, kind)
        except NotFound:
            return None

    async def prepare(self, obj: dict) -> Outcome:
        spec = obj["spec"]
        observed: dict = {}
        if spec["buildType"] == "GitRepository":
            failure = await self.prepare_repository(obj, observed)
            if failure:
                return failure
            if observed["recipe"] == "containerfile":
                # the repository names its own base in its Containerfile
                return Outcome(True, "RepositoryPinned", f"{spec['repository']} at {observed['gitCommit'][:12]}",
                               observed)
        failure = await self.prepare_base(obj, observed)
        if failure:
            return failure
        if spec["buildType"] == "GitRepository":
            if observed["recipe"] == "environment" and not observed["baseImageInfo"]["hasConda"]:
                return Outcome(False, "CondaMissing",
                               "the repository has environment.yml, but the base image has neither mamba nor conda; "
                               "add a requirements.txt or choose a conda-based image", observed)
            return Outcome(True, "RepositoryPinned", f"{spec['repository']} at {observed['gitCommit'][:12]}", observed)
        return Outcome(True, "ImagePinned", observed["resolvedBaseImage"], observed)

    async def prepare_base(self, obj: dict, observed: dict) -> Outcome | None:
        """Pin the base (or imported) image and inspect it; None when that worked."""
        say = self.logger_for(obj)
        try:
            base_text = self.base_reference(obj)
        except LookupError as e:
            return Outcome(False, "NoBaseImage", str(e), observed)
        say(f"pinning {base_text}")
        try:
            pinned, digest = await self.pin_image(base_text, obj)
        except ImageNotFound as e:
            return Outcome(False, "ImageNotFound", str(e), observed)
        except ImageUnauthorized as e:
            return Outcome(False, "ImageUnauthorized", str(e), observed)
        except RegistryUnreachable as e:
            return Outcome(False, "RegistryUnreachable", str(e), observed)
        except (RegistryError, LookupError, BuildError) as e:
            return Outcome(False, "ImagePullFailed", str(e), observed)
        say(f"pinned {pinned}")
        try:
            info = await self.builder.inspect_base(pinned)
        except BuildError as e:
            return Outcome(False, "InspectFailed", str(e), observed)
        say(f"python {info.python_full_version} at {info.python_path}, user {info.user or 'root'} (uid {info.uid}), "
            f"{len(info.packages)} packages, environment {'writable' if info.env_owned_by_user else 'read-only'} "
            "for the user")
        observed.update({
            "resolvedBaseImage": pinned,
            "baseImageDigest": digest,
            "baseImageInfo": {
                "pythonPath": info.python_path, "pythonVersion": info.python_full_version, "user": info.user,
                "uid": info.uid, "environmentOwnedByUser": info.env_owned_by_user, "hasConda": info.has_conda,
            },
        })
        return None

    async def prepare_repository(self, obj: dict, observed: dict) -> Outcome | None:
        """Pin the git ref to a commit, check it out, and pick the recipe; None when that worked."""
        say = self.logger_for(obj)
        url, ref = obj["spec"]["repository"], obj["spec"].get("gitRef")
        try:
            gitsource.allowed_scheme(url, tuple(self.allowed_git_schemes))
            say(f"resolving {ref or 'the default branch'} of {url}")
            commit = await gitsource.ls_remote(url, ref)
            checkout = self._context_dir(obj["metadata"]["uid"]) / "checkout"
            if checkout.exists():
                shutil.rmtree(checkout)
            checkout.parent.mkdir(parents=True, exist_ok=True)
            await gitsource.shallow_clone(url, commit, checkout)
        except gitsource.GitRefNotFound as e:
            return Outcome(False, "GitRefNotFound", str(e))
        except (gitsource.GitError, ValueError) as e:
            return Outcome(False, "GitRepositoryUnavailable", str(e))
        files = gitsource.repo_files(checkout)
        recipe = gitsource.detect_recipe(files)
        extras = gitsource.detect_extras(files)
        say(f"commit {commit}, recipe {recipe or 'none'}")
        observed.update({"gitCommit": commit, "recipe": recipe or "none",
                         "recipeExtras": sorted(k for k, v in extras.items() if v)})
        return None

    def requirements_of(self, obj: dict) -> list[str] | None:
        spec, status = obj["spec"], obj.get("status") or {}
        if spec["buildType"] == "PackageList":
            return list(spec["packageVersions"])
        if status.get("recipe") not in ("requirements", "environment"):
            return None
        checkout = self._context_dir(obj["metadata"]["uid"]) / "checkout"
        if status["recipe"] == "requirements":
            lines = (checkout / "requirements.txt").read_text().splitlines()
        else:
            lines = _pip_section_of_environment(checkout)
        requirements = []
        for number, line in enumerate(lines, start=1):
            text = line.split(" #", 1)[0].strip()
            if not text or text.startswith("#"):
                continue
            try:
                validate_requirement(text)
            except ResolutionError as e:
                raise ResolutionError(f"requirements.txt line {number}: {e}") from None
            requirements.append(text)
        return requirements

    async def resolve(self, obj: dict) -> Outcome:
        say = self.logger_for(obj)
        status = obj["status"]
        try:
            requirements = self.requirements_of(obj)
        except ResolutionError as e:
            return Outcome(False, "InvalidRequirements", str(e))
        if requirements is None:
            key = spec_hash(obj, status.get("resolvedBaseImage", ""), None)
            return Outcome(True, "NothingToResolve", "the repository builds itself", {"specHash": key})
        info = await self.builder.inspect_base(status["resolvedBaseImage"])
        say(f"resolving {len(requirements)} requirements for Python {info.python_version} "
            f"against the {len(info.packages)} packages already in the base image")
        try:
            lock = await self._resolve_lock_cached(requirements, info)
        except ResolutionError as e:
            return Outcome(False, "Unresolvable", str(e))
        await self.store.put_artifact(model.name_of(obj), "lock", lock.text)
        key = spec_hash(obj, status["resolvedBaseImage"], lock.sha256)
        observed = {"lockHash": f"sha256:{lock.sha256}", "specHash": key}
        say(f"locked {len(lock.packages)} packages")
        reused = await self.find_reusable(obj, key)
        if reused is not None:
            observed.update(reused)
            message = (f"identical to {reused['reusedFrom']}" if reused.get("reusedFrom")
                       else "unchanged since the previous run: keeping its image")
            return Outcome(True, "Reused", message, observed, skip_to=PHASE_READY)
        previous = await self.find_previous_generation(obj, lock.text, status["resolvedBaseImage"])
        if previous is not None:
            observed["layeredOn"] = previous
            say(f"{previous['name']} has a subset of these packages: building on it, installing only the rest")
        return Outcome(True, "LockResolved", f"{len(lock.packages)} packages", observed)

    async def _resolve_lock_cached(self, requirements: list[str], info):
        constraints = constraints_from_pip_list(info.packages)
        settings = IndexSettings(
            index_url=self.index_url or None, extra_index_urls=tuple(self.extra_index_urls),
            ca_bundle=self.ca_bundle or None,
        )
        key = (tuple(requirements), info.python_full_version, tuple(constraints), settings)
        hit = self._lock_cache.get(key)
        if hit and time.monotonic() - hit[0] < self.lock_cache_seconds:
            return hit[1]
        lock = await resolve_lock(requirements, python_version=info.python_version, constraints=constraints,
                                  settings=settings, timeout=self.resolve_timeout)
        self._lock_cache[key] = (time.monotonic(), lock)
        return lock

    async def find_reusable(self, obj: dict, key: str) -> dict | None:
        """Status fields of a Ready image built from the same effective input, if its image is
        still here: the second identical request needs no build at all.

        `reusedFrom` names the image that really built it (an image that itself reused one
        passes on the name of the one it reused); when that is this image's own earlier run,
        nothing is named: the run keeps its previous image.
        """
        own_name, own_uid = model.name_of(obj), obj["metadata"]["uid"]
        for other in await self.store.list(phase=PHASE_READY):
            status = other.get("status") or {}
            if other["metadata"]["uid"] == own_uid or status.get("specHash") != key or not status.get("image"):
                continue
            if not self.push_registry and not await self.builder.local_digest(status["image"]):
                continue
            built_by = status.get("reusedFrom") or model.name_of(other)
            found = {"image": status["image"], "packages": status.get("packages", [])}
            if status.get("imageSize"):
                found["imageSize"] = status["imageSize"]
            if built_by != own_name:
                found["reusedFrom"] = built_by
            return found
        return None

    async def find_previous_generation(self, obj: dict, lock_text: str, base: str) -> dict | None:
        """A Ready PackageList image on the same base whose lock is a subset of `lock_text`.

        Building FROM it and installing only the missing entries gives the same packages as a
        full build, in a fraction of the time. Only PackageList images qualify: their content
        is the base plus their lock and nothing of their owner's, so sharing layers across
        users reveals nothing.
        """
        if obj["spec"]["buildType"] != "PackageList":
            return None
        best = None
        for other in await self.store.list(phase=PHASE_READY, build_type="PackageList"):
            status = other.get("status") or {}
            if status.get("resolvedBaseImage") != base or not status.get("image") or status.get("layeredOn"):
                continue
            old_lock = await self._artifact_or_none(model.name_of(other), "lock")
            delta = lock_difference(lock_text, old_lock or "")
            if not delta or not await self.builder.local_digest(status["image"]):
                continue
            size = len(old_lock)
            if best is None or size > best[0]:
                best = (size, {"name": model.name_of(other), "image": status["image"]})
        return best[1] if best else None

    def target_repository(self, name: str, uid: str) -> str:
        registry = self.push_registry.rstrip("/") if self.push_registry else "localhost/cnbi"
        return f"{registry}/{name}"

    async def build(self, obj: dict) -> Outcome:
        say = self.logger_for(obj)
        spec, status = obj["spec"], obj["status"]
        own_containerfile = status.get("recipe") == "containerfile"
        info = None if own_containerfile else await self.builder.inspect_base(status["resolvedBaseImage"])
        requested: list[str] = []
        if spec["buildType"] == "ImageImport":
            image = status["resolvedBaseImage"]
        else:
            requested = requested_distribution_names(self.requirements_of(obj) or [])
            try:
                image = await self._build_image(obj, info, say)
                if own_containerfile:
                    info = await self.builder.inspect_base(image)
            except PlanError as e:
                return Outcome(False, "InvalidBuildPlan", str(e))
            except BuildError as e:
                return Outcome(False, "BuildFailed", str(e))

        say(f"validating {image}")
        checks = plan_checks(requested, info.python_path)
        pip_list = []
        for check in checks:
            code, out, err = await self.builder.run_check(image, check)
            result = interpret_check(check, code, out, err)
            if result.ok and check.name == "packages":
                pip_list = json.loads(out.strip().splitlines()[-1])
                say(f"check packages: ok, {len(pip_list)} installed")
                continue
            say(f"check {check.name}: {'ok' if result.ok else 'FAILED'} {result.message}")
            if not result.ok:
                return Outcome(False, "ValidationFailed", f"check {check.name} failed: {result.message}")
        observed = {"packages": manifest_from_pip_list(pip_list, requested)}
        if self.push_registry and spec["buildType"] != "ImageImport":
            tagged = image.split("@")[0] + ":" + status["specHash"].split(":")[-1][:12]
            say(f"pushing {tagged}")
            try:
                digest = await self.builder.push(tagged, tls_verify=not self._is_insecure(parse_image_reference(tagged)))
            except BuildError as e:
                return Outcome(False, "PushFailed", str(e))
            image = f"{image.split('@')[0]}@{digest}"
        observed["image"] = image
        size = await self.builder.image_size(image)
        if size:
            observed["imageSize"] = size
        return Outcome(True, "Validated", f"all {len(checks)} checks passed", observed)

    async def _build_image(self, obj: dict, info, say) -> str:
        status = obj["status"]
        name, uid = model.name_of(obj), obj["metadata"]["uid"]
        repository = self.target_repository(name, uid)
        target = f"{repository}:{status['specHash'].split(':')[-1][:12]}"
        lock_text = await self.store.get_artifact(name, "lock")
        build_from = status.get("resolvedBaseImage")
        layered = status.get("layeredOn")
        if layered:
            # install only what the previous generation lacks, on top of it
            old_lock = await self._artifact_or_none(layered["name"], "lock")
            delta = lock_difference(lock_text or "", old_lock or "")
            if delta and await self.builder.local_digest(layered["image"]):
                build_from, lock_text = layered["image"], delta
                say(f"building on {layered['image']}: {len(lock_entries(delta))} packages to add")
            else:
                say(f"{layered['name']} is gone: building from the base image")
        checkout = self._context_dir(uid) / "checkout"
        extras = set(status.get("recipeExtras", []))
        apt_packages = ()
        if "apt" in extras:
            from .buildplan import parse_apt_txt

            apt_packages = parse_apt_txt((checkout / "apt.txt").read_text())
        recipe = status.get("recipe")
        observations = BuildObservations(
            # a repository with its own Containerfile names its base there
            resolved_base_image=build_from or "scratch@sha256:" + "0" * 64,
            base_user=(info.user if info else "") or "root",
            python_path=info.python_path if info else "/usr/bin/python3",
            python_env_owned_by_user=info.env_owned_by_user if info else False,
            spec_hash=status["specHash"],
            target=target,
            lock_text=lock_text,
            git_commit=status.get("gitCommit"),
            recipe=None if recipe in (None, "none") else recipe,
            repo_containerfile=gitsource.containerfile_name(gitsource.repo_files(checkout)) if recipe == "containerfile" else None,
            apt_packages=apt_packages,
            has_postbuild="postbuild" in extras,
            base_uid=info.uid if info else None,
        )
        plan = plan_build(obj, observations)
        self._targets[uid] = target
        context = self._context_dir(uid) / "context"
        secrets = {
            "cnbi-ca": Path(self.ca_bundle).read_text() if self.ca_bundle and os.path.isfile(self.ca_bundle) else "",
            "cnbi-uv-config": uv_config_toml(self.index_url or None, tuple(self.extra_index_urls)),
        }
        secret_files = await asyncio.to_thread(
            self.builder.write_context, plan, context, checkout if checkout.exists() else None, secrets
        )
        say(f"building {target}")
        digest = await self.builder.build(plan, context, secret_files, say)
        return f"{repository}@{digest}"


def _cancel_message(obj: dict) -> str | None:
    for condition in (obj.get("status") or {}).get("conditions", []):
        if condition.get("reason") == "Cancelled":
            return condition.get("message") or "cancelled"
    return None


def _write_authfile(registry: str, credentials) -> str:
    """A private auth.json for one pull: credentials never go on podman's command line."""
    token = base64.b64encode(f"{credentials.username}:{credentials.password}".encode()).decode()
    fd, path = tempfile.mkstemp(prefix="cnbi-auth-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump({"auths": {registry: {"auth": token}}}, f)
    return path


def _pip_section_of_environment(checkout: Path) -> list[str]:
    import yaml

    path = checkout / "environment.yml"
    if not path.exists():
        path = checkout / "environment.yaml"
    document = yaml.safe_load(path.read_text()) or {}
    for dependency in document.get("dependencies", []):
        if isinstance(dependency, dict) and "pip" in dependency:
            return [str(x) for x in dependency["pip"]]
    return []
