"""The work of each phase, per object: Prepare, Resolving, Building — one engine, two modes.

Each step takes the object (and a `say` function for the build log) and returns an `Outcome`
(statemachine.py turns it into status). What a step observed goes into status, and later steps
read it from there only — the pinned base and what running it showed (`baseImageInfo`, with its
packages), the repository's commit, recipe, requirements and apt packages — never again from
disk or a container engine. So the embedded runner (runner.py, inside the service) and the
cluster operator (a kopf operator) drive the same `PhaseWork`, each with its own builder.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import hashlib
import json
from collections import Counter
import os
import shutil
import time
from pathlib import Path

import yaml
from traitlets import Dict, Float, Instance, List, Unicode, default
from traitlets.config import LoggingConfigurable

from .. import credentials, model, stacks
from ..imageref import parse_image_reference
from ..model import PHASE_BUILDING, PHASE_PENDING, PHASE_PREPARE, PHASE_READY, PHASE_RESOLVING
from ..store.base import NotFound
from ..trust import machine_ca_bundle
from . import gitsource
from .buildplan import BuildObservations, PlanError, parse_apt_txt, plan_build, spec_hash, uv_config_toml
from .builders.base import BaseImageInfo, BuildError, Builder, PullFailed, StorageFull
from .checks import interpret_check, manifest_from_pip_list, plan_checks, requested_distribution_names
from .imageaccess import ImageAccess
from .registry import ImageNotFound, ImageUnauthorized, RegistryError, RegistryUnreachable
from .resolve import (
    IndexSettings,
    LockResult,
    ResolutionError,
    constraints_from_pip_list,
    lock_difference,
    lock_entries,
    resolve_lock,
    validate_requirement,
)
from .statemachine import Outcome, failure_of, held_on_earlier_build


def _no_log(line: str) -> None:
    pass


class PhaseWork(LoggingConfigurable):
    """Prepare, Resolving and Building for one object at a time; no queue, no state of its own
    beyond caches (the runner or the operator decides what runs when)."""

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
        (mounted as a build secret, never stored in the image). Default: this machine's bundle
        (cnbi_hub.trust.machine_ca_bundle: $PIP_CERT, $SSL_CERT_FILE or the system store), so a
        corporate proxy's CA that the admin installed on the host is trusted by builds too."""
    ).tag(config=True)

    @default("ca_bundle")
    def _default_ca_bundle(self):
        return machine_ca_bundle()

    push_registry = Unicode(
        "",
        help="""Registry (and namespace) Ready images are pushed to, e.g. `registry.example.org/notebooks`.
        Empty: images stay in this machine's podman storage (enough for PodmanSpawner).""",
    ).tag(config=True)

    base_images = List(Dict(), help="The service's base_images (for runtimeEnvironment requests).")

    allowed_git_schemes = List(Unicode(), ["https"], help="Git URL schemes builds may fetch from.")

    vault = Instance(credentials.CredentialVault, allow_none=True,
                     help="Opens users' stored git credentials (spec.gitCredential); None: no credentials.")

    work_dir = Unicode(help="Where repository checkouts live while an image is prepared and built.").tag(config=True)

    lock_cache_seconds = Float(
        600.0,
        help="""How long a resolved lock is reused for the same requirements on the same base image,
        sparing the index a second resolution (identical requests reach Ready in about a second).""",
    ).tag(config=True)

    resolve_timeout = Float(300.0, help="Seconds a resolution may take.").tag(config=True)

    index_timeout = Float(
        30.0, help="""Seconds the resolver waits for one answer from a package index before it
        gives up on that request (uv tries three times); a silent index fails the image in
        Resolving with "operation timed out" and the URL.""",
    ).tag(config=True)

    store = Instance(object, allow_none=True)
    builder = Instance(Builder, allow_none=True)
    access = Instance(ImageAccess, allow_none=True)

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        if self.access is None:
            self.access = ImageAccess(parent=self, builder=self.builder)
        self._lock_cache: dict[tuple, tuple[float, object]] = {}
        # uid -> (image being built, the previous build's digest): removed if cancelled, unless the tag
        # still names that previous build
        self._targets: dict[str, tuple[str, str]] = {}
        self._building: dict[str, dict] = {}  # uid -> the object whose build runs now
        # spec hash -> (name, future) of the object building it now: identical requests that
        # arrive meanwhile wait for it and reuse its image instead of building it again
        self._in_flight: dict[str, tuple[str, asyncio.Future]] = {}
        self._claims: dict[str, str] = {}  # uid -> the spec hash it builds
        # spec hash -> (uid, object) of one Ready image with it, kept by the runner from its
        # change feed (an informer's cache): a burst of identical requests finds it without a
        # list each; a miss still asks the store, which is never behind
        self._ready_by_hash: dict[str, tuple[str, dict]] = {}
        self._ready_key_of: dict[str, str] = {}  # uid -> the hash it is Ready with (in the index or not)
        # what imports in that index and those building now import: only an import of one of
        # these can be reused, so only those look outside the slots (a first import of an
        # unknown image, or of a registry that never answers, goes the usual way, once)
        self._import_sources: Counter[str] = Counter()
        self._claimed_sources: dict[str, str] = {}  # spec hash -> fromImage of an import building it

    # --- one step -----------------------------------------------------------------------------

    async def work(self, obj: dict, say=_no_log) -> Outcome:
        """The work of the object's current phase."""
        phase = model.phase_of(obj)
        step = {
            PHASE_PENDING: self.begin,
            PHASE_PREPARE: self.prepare,
            PHASE_RESOLVING: self.resolve,
            PHASE_BUILDING: self.build,
        }[phase]
        try:
            return await step(obj, say)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a bug or a broken machine: say so on the object, not in a log only
            if isinstance(e, OSError) and e.errno == errno.ENOSPC:
                return self.disk_full(phase.lower(), e, model.name_of(obj))
            self.log.exception("%s of %s failed", phase, model.name_of(obj))
            return Outcome(False, "InternalError", f"{type(e).__name__}: {e}")

    def disk_full(self, doing: str, error: Exception, name: str, where: str | None = None) -> Outcome:
        """The outcome when the service's own disk is full (not the user's doing): what was being
        done and who can help; where, in the service's log (a path of the server is not the
        user's business). The work directory is cleaned after it as always."""
        where = where or getattr(error, "filename", None) or self.work_dir
        self.log.error("image %s: the disk is full at %s while %s: %s", name, where, doing, error)
        return Outcome(False, "DiskFull", f"the service's disk is full while {doing}: nothing of this image "
                                          "was kept; ask an admin to free space, then rebuild")

    def checkout_dir(self, uid: str) -> Path:
        return Path(self.work_dir) / uid / "checkout"

    async def cleanup(self, uid: str, cancelled: bool) -> None:
        """Remove what an object's work left: its checkout always, its half-made image if cancelled."""
        work = Path(self.work_dir) / uid
        if work.exists():
            await asyncio.to_thread(shutil.rmtree, work, True)
        self.release_claim(uid)
        target, previous = self._targets.pop(uid, (None, ""))
        building = self._building.pop(uid, None)
        if cancelled and building is not None:
            await self.builder.cancel_build(building)
        if cancelled and target:
            stored = await self.builder.stored_image(target) if self.builder.keeps_images_locally else None
            if not (previous and stored and stored.digest == previous):
                await self.builder.remove_image(target)
        await self.builder.cleanup(uid)

    # --- Pending and Prepare ------------------------------------------------------------------

    async def begin(self, obj: dict, say=_no_log) -> Outcome:
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

    def moving_base(self, obj: dict) -> str | None:
        """The tag an image was built on that can move (its base, or the image it imports); None
        when it names a digest, or its repository's own Containerfile names its base."""
        if (obj.get("status") or {}).get("recipe") == "containerfile" or stacks.parent_of(obj["spec"]):
            return None  # an image on another CustomNBImage follows that one's builds instead
        if held_on_earlier_build(obj.get("status") or {}):
            return None  # its owner went back to an earlier build: it stays on that one
        try:
            reference = self.base_reference(obj)
        except LookupError:
            return None
        return None if "@" in reference else reference

    async def prepare(self, obj: dict, say=_no_log) -> Outcome:
        spec = obj["spec"]
        observed: dict = {}
        if spec["buildType"] == "GitRepository":
            failure = await self.prepare_repository(obj, observed, say)
            if failure:
                return failure
            if observed["recipe"] == "containerfile":
                # the repository names its own base in its Containerfile
                return Outcome(True, "RepositoryPinned", f"{spec['repository']} at {observed['gitCommit'][:12]}",
                               observed)
        failure = await self.prepare_base(obj, observed, say)
        if failure:
            return failure
        if spec["buildType"] == "GitRepository":
            if observed["recipe"] == "environment" and not observed["baseImageInfo"]["hasConda"]:
                return Outcome(False, "CondaMissing",
                               "the repository has environment.yml, but the base image has neither mamba nor conda; "
                               "add a requirements.txt or choose a conda-based image", observed)
            return Outcome(True, "RepositoryPinned", f"{spec['repository']} at {observed['gitCommit'][:12]}", observed)
        if spec["buildType"] == "ImageImport":
            # an import has nothing to resolve: the same image, already validated, is reused here
            observed["specHash"] = spec_hash(obj, observed["resolvedBaseImage"], None)
            reused = await self.reuse_or_claim(obj, observed["specHash"], say)
            if reused is not None:
                return self._reused(reused, observed)
        return Outcome(True, "ImagePinned", observed["resolvedBaseImage"], observed)

    async def prepare_base(self, obj: dict, observed: dict, say=_no_log) -> Outcome | None:
        """Pin the base (or imported) image and inspect it; None when that worked."""
        try:
            base_text = self.base_reference(obj)
        except LookupError as e:
            return Outcome(False, "NoBaseImage", str(e), observed)
        restoring = (obj.get("status") or {}).get("restoring") or {}
        if restoring.get("resolvedBaseImage"):
            # building a kept build again: on the very base it was built on
            base_text = restoring["resolvedBaseImage"]
            say(f"building run {restoring.get('run')}'s build again, on its base {base_text}")
        elif stacks.parent_of(obj["spec"]):
            found = await self.stack_base(obj, say)
            if isinstance(found, Outcome):
                return dataclasses.replace(found, observed=observed)
            base_text = found
        say(f"pinning {base_text}")
        try:
            pinned, digest, pull_access = await self.access.pin(base_text, obj)
        except ImageNotFound as e:
            return Outcome(False, "ImageNotFound", str(e), observed)
        except ImageUnauthorized as e:
            return Outcome(False, "ImageUnauthorized", str(e), observed)
        except RegistryUnreachable as e:
            return Outcome(False, "RegistryUnreachable", str(e), observed)
        except (RegistryError, LookupError) as e:
            return Outcome(False, "ImagePullFailed", str(e), observed)
        say(f"pinned {pinned}")
        try:
            info = await self.builder.inspect_base(pinned, pull_access)
        except PullFailed as e:
            return Outcome(False, "ImagePullFailed", str(e), observed)
        except BuildError as e:
            return Outcome(False, "InspectFailed", str(e), observed)
        say(f"python {info.python_full_version} at {info.python_path}, user {info.user or 'root'} (uid {info.uid}), "
            f"{len(info.packages)} packages, environment {'writable' if info.env_owned_by_user else 'read-only'} "
            "for the user")
        observed.update({"resolvedBaseImage": pinned, "baseImageDigest": digest,
                         "baseImageInfo": info.to_status(with_packages=obj["spec"]["buildType"] != "ImageImport")})
        return None

    async def stack_base(self, obj: dict, say=_no_log) -> str | Outcome:
        """The current build (name@digest) of the image `obj` is built on (`cnbi:<name>`), or
        the failed Outcome that says why there is none to build on. The engine starts such an
        image only once the one below has finished its run, so "not finished" is a race."""
        parent = stacks.parent_of(obj["spec"])

        async def parent_of_name(name: str) -> str | None:
            try:
                return stacks.parent_of((await self.store.get(name))["spec"])
            except NotFound:
                return None

        try:  # the service refuses cycles; an image made with kubectl, or a name used again, may not
            await stacks.check_chain(model.name_of(obj), parent, parent_of_name)
        except stacks.StackError as e:
            return Outcome(False, "StackCycle", str(e))
        try:
            base = await self.store.get(parent)
        except NotFound:
            return Outcome(False, "BaseImageNotFound", f"its base image {parent} does not exist (spec.baseImage)")
        status = base.get("status") or {}
        refused = stacks.refusal(obj, base)
        if refused:
            return Outcome(False, "BaseImageNotUsable", refused)
        if model.phase_of(base) == model.PHASE_FAILED:
            failure = failure_of(status) or {}
            why = f"{failure.get('reason', 'Failed')}: {failure.get('message', '')}"
            return Outcome(False, "BaseImageFailed",
                           f"its base image failed: {stacks.failure_words(base, obj, why)}; rebuild {parent} first")
        if model.phase_of(base) != PHASE_READY or not status.get("image"):
            # made just before it (the engine had not seen it yet): wait for it, in Pending
            return Outcome(False, "WaitingForBaseImage", f"waiting for its base image {parent} to finish its run",
                           wait=True)
        say(f"building on {parent}'s current build")
        return status["image"]

    async def prepare_repository(self, obj: dict, observed: dict, say=_no_log) -> Outcome | None:
        """Pin the git ref to a commit, check it out, pick the recipe and record what it asks
        for (requirements, apt packages); None when that worked."""
        url, ref = obj["spec"]["repository"], obj["spec"].get("gitRef")
        checkout = self.checkout_dir(obj["metadata"]["uid"])
        credential = await self.git_credential(obj, say)
        if isinstance(credential, Outcome):
            return credential
        try:
            gitsource.allowed_scheme(url, tuple(self.allowed_git_schemes))
            restoring = (obj.get("status") or {}).get("restoring") or {}
            if restoring.get("gitCommit"):
                commit = restoring["gitCommit"]  # building a kept build again: its own commit
                say(f"building run {restoring.get('run')}'s commit {commit[:12]} of {url} again")
            else:
                say(f"resolving {ref or 'the default branch'} of {url}")
                commit = await gitsource.ls_remote(url, ref, credential=credential)
            if checkout.exists():
                shutil.rmtree(checkout)
            checkout.parent.mkdir(parents=True, exist_ok=True)
            await gitsource.shallow_clone(url, commit, checkout, credential=credential)
        except gitsource.GitRefNotFound as e:
            return Outcome(False, "GitRefNotFound", str(e))
        except gitsource.GitAuthenticationFailed as e:
            return Outcome(False, "GitAuthenticationFailed", str(e))
        except gitsource.GitDiskFull as e:
            return self.disk_full("fetching the repository", e, model.name_of(obj))
        except (gitsource.GitError, ValueError) as e:
            return Outcome(False, "GitRepositoryUnavailable", str(e))
        files = gitsource.repo_files(checkout)
        recipe = gitsource.detect_recipe(files)
        extras = gitsource.detect_extras(files)
        say(f"commit {commit}, recipe {recipe or 'none'}")
        observed.update({"gitCommit": commit, "recipe": recipe or "none",
                         "recipeExtras": sorted(k for k, v in extras.items() if v)})
        if recipe == "requirements":
            observed["repositoryRequirements"] = _requirement_lines((checkout / "requirements.txt").read_text())
        elif recipe == "environment":
            observed["repositoryRequirements"] = _pip_section_of_environment(checkout)
        if extras.get("apt") and recipe != "containerfile":
            try:
                observed["aptPackages"] = list(parse_apt_txt((checkout / "apt.txt").read_text()))
            except ValueError as e:
                return Outcome(False, "InvalidAptTxt", f"apt.txt: {e}", observed)
        return None

    async def git_credential(self, obj: dict, say=_no_log) -> credentials.GitCredential | Outcome | None:
        """The image creator's own credential that `spec.gitCredential` names (opened only to be
        handed to git), None without one, or the Outcome that says why it cannot be used."""
        name = obj["spec"].get("gitCredential")
        if not name:
            return None
        owner = model.creator_of(obj)
        record = await self.store.get_credential(owner, name)
        if record is None:
            return Outcome(False, "GitCredentialNotFound",
                           f"{owner} has no git credential named {name} (spec.gitCredential): store it again")
        try:
            credentials.check_credential_for_repository(record, obj["spec"]["repository"])
            if self.vault is None:
                raise credentials.CredentialUnreadable("this engine has no credential key")
            credential = self.vault.open(record)
        except model.InvalidObject as e:
            return Outcome(False, "GitCredentialNotUsable", e.message)
        except credentials.CredentialUnreadable as e:
            return Outcome(False, "GitCredentialUnreadable", str(e))
        say(f"using the git credential {name} for {record['host']}")
        return credential

    # --- Resolving ----------------------------------------------------------------------------

    def requirements_of(self, obj: dict) -> list[str] | None:
        """What to install: the spec's packages, or what Prepare found in the repository."""
        spec, status = obj["spec"], obj.get("status") or {}
        if spec["buildType"] == "PackageList":
            return list(spec["packageVersions"])
        if status.get("recipe") not in ("requirements", "environment"):
            return None
        requirements = []
        for number, text in status.get("repositoryRequirements", []):
            try:
                validate_requirement(text)
            except ResolutionError as e:
                raise ResolutionError(f"requirements.txt line {number}: {e}") from None
            requirements.append(text)
        return requirements

    async def resolve(self, obj: dict, say=_no_log) -> Outcome:
        status = obj["status"]
        try:
            requirements = self.requirements_of(obj)
        except ResolutionError as e:
            return Outcome(False, "InvalidRequirements", str(e))
        if requirements is None:
            key = spec_hash(obj, status.get("resolvedBaseImage", ""), None)
            reused = await self.reuse_or_claim(obj, key, say)
            if reused is not None:  # the same commit built before
                return self._reused(reused, {"specHash": key})
            return Outcome(True, "NothingToResolve", "the repository builds itself", {"specHash": key})
        info = BaseImageInfo.from_status(status["baseImageInfo"])
        restoring = status.get("restoring") or {}
        if restoring.get("lockHash"):
            # building a kept build again: its own lock, as it was (written when the run began)
            text = await self.store.get_artifact(model.name_of(obj), "lock") or ""
            lock = LockResult(text=text, sha256=hashlib.sha256(text.encode()).hexdigest(),
                              packages=list(lock_entries(text)))
            if f"sha256:{lock.sha256}" != restoring["lockHash"]:
                return Outcome(False, "LockChanged", f"run {restoring.get('run')}'s lock was changed since it "
                                                     "was kept: it cannot be built again as it was")
            say(f"installing run {restoring.get('run')}'s lock as it was")
        else:
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
        reused = await self.reuse_or_claim(obj, key, say)
        if reused is not None:
            return self._reused(reused, observed)
        previous = await self.find_previous_generation(obj, lock.text, status["resolvedBaseImage"])
        if previous is not None:
            observed["layeredOn"] = previous
            say(f"{previous['name']} has a subset of these packages: building on it, installing only the rest")
        return Outcome(True, "LockResolved", f"{len(lock.packages)} packages", observed)

    @staticmethod
    def _reused(reused: dict, observed: dict) -> Outcome:
        observed = {**observed, **reused}
        message = (f"identical to {reused['reusedFrom']}" if reused.get("reusedFrom")
                   else "unchanged since the previous run: keeping its image")
        return Outcome(True, "Reused", message, observed, skip_to=PHASE_READY)

    async def _resolve_lock_cached(self, requirements: list[str], info: BaseImageInfo):
        constraints = constraints_from_pip_list(info.packages)
        settings = IndexSettings(
            index_url=self.index_url or None, extra_index_urls=tuple(self.extra_index_urls),
            ca_bundle=self.ca_bundle or None, http_timeout=self.index_timeout or None,
        )
        key = (tuple(requirements), info.python_full_version, tuple(constraints), settings)
        hit = self._lock_cache.get(key)
        if hit and time.monotonic() - hit[0] < self.lock_cache_seconds:
            return hit[1]
        lock = await resolve_lock(requirements, python_version=info.python_version, constraints=constraints,
                                  settings=settings, timeout=self.resolve_timeout)
        self._lock_cache[key] = (time.monotonic(), lock)
        return lock

    async def _still_there(self, image: str) -> bool:
        """Whether a built image can still be used: always for a registry's; for the builder's
        own storage (podman), only while it is there."""
        if self.push_registry or not self.builder.keeps_images_locally:
            return True
        return await self.builder.stored_image(image) is not None

    async def reuse_or_claim(self, obj: dict, key: str, say=_no_log) -> dict | None:
        """What `find_reusable` finds; else, when another image is building the same input
        right now, wait for it and look again; else claim the build of `key` for `obj`."""
        uid = obj["metadata"]["uid"]
        while True:
            reused = await self.find_reusable(obj, key)
            if reused is not None:
                return reused
            holder = self._in_flight.get(key)
            if holder is None or self._claims.get(uid) == key:
                self._claim(obj, key)
                return None
            say(f"{holder[0]} is building the same image now: waiting for it")
            await asyncio.shield(holder[1])

    def _claim(self, obj: dict, key: str) -> None:
        uid = obj["metadata"]["uid"]
        if self._claims.get(uid) not in (None, key):
            self.release_claim(uid)  # its input changed since (a tag moved): the old claim goes
        self._in_flight.setdefault(key, (model.name_of(obj), asyncio.get_running_loop().create_future()))
        self._claims[uid] = key
        if obj["spec"]["buildType"] == "ImageImport":
            self._claimed_sources[key] = obj["spec"]["fromImage"]

    def release_claim(self, uid: str) -> None:
        """The image no longer builds what it claimed (it ended, was cancelled or deleted):
        those waiting for it look again, and reuse its image or build it themselves."""
        key = self._claims.pop(uid, None)
        if key is not None:
            _, done = self._in_flight.pop(key)
            self._claimed_sources.pop(key, None)
            done.set_result(None)

    def reusable_without_slot(self, obj: dict) -> bool:
        """Whether `reuse_at_once` may finish the object outside a build slot: an import (its
        reuse costs one registry request and one lookup; a package list needs a resolution)
        of an image that a Ready import or one building now imports too."""
        if obj["spec"]["buildType"] != "ImageImport":
            return False
        source = obj["spec"]["fromImage"]
        return self._import_sources[source] > 0 or source in self._claimed_sources.values()

    async def reuse_at_once(self, obj: dict, say=_no_log) -> Outcome | asyncio.Future | None:
        """For an import (`reusable_without_slot`): pin its image and, when a Ready image of the
        same input exists, the Outcome that reuses it (Prepare's, straight to Ready, with the
        base's inspection copied from it: the same digest); when one is building that input now,
        a future that ends with that build (look again then); else None: it takes a build slot,
        and its Prepare says what went wrong if pinning failed."""
        say(f"pinning {obj['spec']['fromImage']}")
        try:
            pinned, digest, _ = await self.access.pin(obj["spec"]["fromImage"], obj)
        except (RegistryError, LookupError):
            return None
        key = spec_hash(obj, pinned, None)
        holder = self._in_flight.get(key)
        waits = holder is not None and self._claims.get(obj["metadata"]["uid"]) != key
        # while that input is building, the index alone answers: a burst of identical imports
        # waiting for one build would otherwise each ask the apiserver for a list
        reused = await self.find_reusable(obj, key, ask_store=not waits)
        if reused is not None:
            if not reused.get("baseImageInfo"):
                return None  # an image from before inspections were kept: Prepare inspects
            say(f"pinned {pinned}")
            return self._reused(reused, {"resolvedBaseImage": pinned, "baseImageDigest": digest, "specHash": key})
        if waits:
            say(f"{holder[0]} is building the same image now: waiting for it")
            return holder[1]
        # no claim here: only an image in a build slot holds one, so whoever waits for a claim
        # waits for work that is running (Prepare claims when this one gets its slot)
        return None

    def note(self, obj: dict, gone: bool = False) -> None:
        """Keep the Ready-by-spec-hash index current with one change of `obj`: an image that
        left Ready (a rebuild resets its status, so its old hash is known only here), changed
        its hash or is gone no longer stands for its old hash."""
        status, uid = obj.get("status") or {}, obj["metadata"].get("uid")
        ready = not gone and status.get("phase") == PHASE_READY and status.get("image")
        key = status.get("specHash") if ready else None
        old_key = self._ready_key_of.get(uid)
        if old_key is not None and old_key != key:
            del self._ready_key_of[uid]
            held = self._ready_by_hash.get(old_key)
            if held and held[0] == uid:
                self._forget_source(held[1])
                del self._ready_by_hash[old_key]
        if key is None:
            return
        self._ready_key_of[uid] = key
        held = self._ready_by_hash.get(key)
        if held is None or held[0] == uid:
            if held:
                self._forget_source(held[1])
            entry = {"metadata": {"name": model.name_of(obj), "uid": uid},
                     "spec": {"fromImage": obj["spec"].get("fromImage")},
                     "status": {k: status[k] for k in _REUSED_FIELDS if k in status}}
            self._ready_by_hash[key] = (uid, entry)
            if entry["spec"]["fromImage"]:
                self._import_sources[entry["spec"]["fromImage"]] += 1

    def _forget_source(self, entry: dict) -> None:
        source = entry["spec"]["fromImage"]
        if source:
            self._import_sources[source] -= 1
            if self._import_sources[source] <= 0:
                del self._import_sources[source]

    async def find_reusable(self, obj: dict, key: str, ask_store: bool = True) -> dict | None:
        """Status fields of a Ready image built from the same effective input, if its image is
        still here: the second identical request needs no build at all. The Ready index is
        asked first; the store only with `ask_store` (the index may lag the store a little).

        `reusedFrom` names the image that really built it (an image that itself reused one
        passes on the name of the one it reused); when that is this image's own earlier run,
        nothing is named: the run keeps its previous image.
        """
        own_name, own_uid = model.name_of(obj), obj["metadata"]["uid"]

        async def reusable(other: dict) -> dict | None:
            status = other.get("status") or {}
            if other["metadata"]["uid"] == own_uid or status.get("specHash") != key or not status.get("image"):
                return None
            if not await self._still_there(status["image"]):
                return None
            built_by = status.get("reusedFrom") or model.name_of(other)
            found = {"image": status["image"], "packages": status.get("packages", [])}
            for copied in ("imageSize", "baseImageInfo"):  # the same input: the same base
                if status.get(copied):
                    found[copied] = status[copied]
            if built_by != own_name:
                found["reusedFrom"] = built_by
            return found

        held = self._ready_by_hash.get(key)
        if held is not None and (found := await reusable(held[1])) is not None:
            return found
        if not ask_store:
            return None
        # two are enough: every image of this input names the same built image (and one of
        # them may be this image's own earlier run)
        for other in await self.store.list(phase=PHASE_READY, spec_hash=key, limit=2):
            if (found := await reusable(other)) is not None:
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
            if not delta or not await self._still_there(status["image"]):
                continue
            size = len(old_lock)
            if best is None or size > best[0]:
                best = (size, {"name": model.name_of(other), "image": status["image"]})
        return best[1] if best else None

    async def _artifact_or_none(self, name: str, kind: str) -> str | None:
        try:
            return await self.store.get_artifact(name, kind)
        except NotFound:
            return None

    # --- Building -----------------------------------------------------------------------------

    def target_repository(self, name: str) -> str:
        registry = self.push_registry.rstrip("/") if self.push_registry else "localhost/cnbi"
        return f"{registry}/{name}"

    def built_here(self, obj: dict, record: dict) -> bool:
        """Whether the image of `obj`'s build `record` is one this service built, in the
        repository it builds that image to (only those are ever deleted: an import's image, a
        base image, belong to someone else)."""
        if obj["spec"]["buildType"] == "ImageImport":
            return False
        built_by = record.get("reusedFrom") or model.name_of(obj)
        return (record.get("image") or "").startswith(self.target_repository(built_by) + "@")

    async def delete_built_image(self, reference: str) -> str | None:
        """Delete a built image from where it is stored (retention): the builder's storage
        (podman), the push registry, or both. None when it is gone; else why it stays."""
        if not reference.startswith(self.target_repository("")):
            return f"{reference} is not in this service's repositories"
        if self.builder.keeps_images_locally:
            kept = await self.builder.delete_stored_image(reference, self.target_repository(""))
            if kept:
                return kept
        if self.push_registry:
            try:
                await self.access.delete(reference)
            except (RegistryError, LookupError, ValueError) as e:
                return str(e)
        return None

    async def build(self, obj: dict, say=_no_log) -> Outcome:
        spec, status = obj["spec"], obj["status"]
        own_containerfile = status.get("recipe") == "containerfile"
        info = None if own_containerfile else BaseImageInfo.from_status(status["baseImageInfo"])
        requested: list[str] = []
        if spec["buildType"] != "ImageImport":
            requested = requested_distribution_names(self.requirements_of(obj) or [])
        # an image from the repository's own Containerfile: its python is whichever is on PATH
        checks = plan_checks(requested, info.python_path if info else "python3")
        if spec["buildType"] == "ImageImport":
            image = status["resolvedBaseImage"]
        else:
            try:
                image = await self._build_image(obj, info, say, checks)
            except PlanError as e:
                return Outcome(False, "InvalidBuildPlan", str(e))
            except StorageFull as e:
                return self.disk_full("building the image", e, model.name_of(obj), where="the builder's image storage")
            except BuildError as e:
                reason = getattr(e, "reason", None) or "BuildFailed"
                return Outcome(False, reason if reason in ("Cancelled", "PipelineRunTimeout") else "BuildFailed", str(e))

        say(f"validating {image}")
        try:
            answers = await self.builder.validate(image, checks, obj=obj)
        except BuildError as e:
            return Outcome(False, "ValidationFailed", f"the checks could not run: {e}")
        pip_list = []
        for check, (code, out, err) in zip(checks, answers):
            result = interpret_check(check, code, out, err)
            if result.ok and check.name == "packages":
                pip_list = json.loads(out.strip().splitlines()[-1])
                say(f"check packages: ok, {len(pip_list)} installed")
                continue
            say(f"check {check.name}: {'ok' if result.ok else 'FAILED'} {result.message}")
            if not result.ok:
                return Outcome(False, "ValidationFailed", f"check {check.name} failed: {result.message}")
        observed = {"packages": manifest_from_pip_list(pip_list, requested)}
        # a builder that keeps images locally (podman) pushes now; Tekton pushed as it built
        if self.push_registry and spec["buildType"] != "ImageImport" and self.builder.keeps_images_locally:
            tagged = image.split("@")[0] + ":" + status["specHash"].split(":")[-1][:12]
            say(f"pushing {tagged}")
            try:
                digest = await self.builder.push(
                    tagged, tls_verify=not self.access.is_insecure(parse_image_reference(tagged)))
            except BuildError as e:
                return Outcome(False, "PushFailed", str(e))
            image = f"{image.split('@')[0]}@{digest}"
        observed["image"] = image
        size = await self.builder.image_size(image)
        if size:
            observed["imageSize"] = size
        return Outcome(True, "Validated", f"all {len(checks)} checks passed", observed)

    async def _build_image(self, obj: dict, info: BaseImageInfo | None, say, checks) -> str:
        status = obj["status"]
        name, uid = model.name_of(obj), obj["metadata"]["uid"]
        repository = self.target_repository(name)
        target = f"{repository}:{status['specHash'].split(':')[-1][:12]}"
        lock_text = await self.store.get_artifact(name, "lock")
        build_from = status.get("resolvedBaseImage")
        layered = status.get("layeredOn")
        if layered:
            # install only what the previous generation lacks, on top of it
            old_lock = await self._artifact_or_none(layered["name"], "lock")
            delta = lock_difference(lock_text or "", old_lock or "")
            if delta and await self._still_there(layered["image"]):
                build_from, lock_text = layered["image"], delta
                say(f"building on {layered['image']}: {len(lock_entries(delta))} packages to add")
            else:
                say(f"{layered['name']} is gone: building from the base image")
        checkout = self.checkout_dir(uid)
        recipe = status.get("recipe")
        extras = set(status.get("recipeExtras", []))
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
            repo_containerfile=(gitsource.containerfile_name(gitsource.repo_files(checkout))
                                if recipe == "containerfile" else None),
            apt_packages=tuple(status.get("aptPackages", [])),
            has_postbuild="postbuild" in extras,
            base_uid=info.uid if info else None,
        )
        plan = plan_build(obj, observations)
        # a rebuild of the same input builds to the same tag, which names the previous build
        # until this one commits: a cancel must not take that build with it
        previous = (status.get("rebuildOf") or "").rpartition("@")[2]
        self._targets[uid] = (target, previous)
        self._building[uid] = obj
        secrets = {
            "cnbi-ca": Path(self.ca_bundle).read_text() if self.ca_bundle and os.path.isfile(self.ca_bundle) else "",
            "cnbi-uv-config": uv_config_toml(self.index_url or None, tuple(self.extra_index_urls)),
        }
        # a builder that builds the engine's checkout (podman) needs no credential here
        git_credential = (await self.git_credential(obj, say)
                          if status.get("gitCommit") and self.builder.fetches_repository else None)
        if isinstance(git_credential, Outcome):  # removed or changed since Prepare
            raise BuildError(git_credential.message)
        say(f"building {target}")
        digest = await self.builder.build(plan, checkout if checkout.exists() else None, secrets, say,
                                          obj=obj, checks=checks, git_credential=git_credential)
        return f"{repository}@{digest}"


# what a reused image takes from the image it reuses (and what find_reusable reads)
_REUSED_FIELDS = ("specHash", "image", "packages", "imageSize", "baseImageInfo", "reusedFrom")


def _requirement_lines(text: str) -> list[list]:
    """[line number, requirement] of a requirements file, comments and blank lines left out."""
    lines = []
    for number, line in enumerate(text.splitlines(), start=1):
        requirement = line.split(" #", 1)[0].strip()
        if requirement and not requirement.startswith("#"):
            lines.append([number, requirement])
    return lines


def _pip_section_of_environment(checkout: Path) -> list[list]:
    path = checkout / "environment.yml"
    if not path.exists():
        path = checkout / "environment.yaml"
    document = yaml.safe_load(path.read_text()) or {}
    for dependency in document.get("dependencies", []):
        if isinstance(dependency, dict) and "pip" in dependency:
            return _requirement_lines("\n".join(str(x) for x in dependency["pip"]))
    return []
