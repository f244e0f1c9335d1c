"""The embedded engine on its own (no hub): the phase work with the podman builder, driven by
the embedded runner — pushing Ready images to a registry, pull secrets, the build log."""

import asyncio
import socket
import time
import json

import pytest

from cnbi_hub import model
from cnbi_hub.controller.buildlog import BuildLog
from cnbi_hub.controller.builders.podman import PodmanBuilder
from cnbi_hub.controller.imageaccess import ImageAccess
from cnbi_hub.controller.phases import PhaseWork
from cnbi_hub.controller.rebuild import full_log
from cnbi_hub.controller.runner import EmbeddedRunner
from cnbi_hub.controller.statemachine import failure_of
from cnbi_hub.model import ValidationPolicy
from cnbi_hub.spawner import image_reference
from cnbi_hub.store.sqlite import SQLImageStore
from tests.hubfixtures import CA_BUNDLE

pytestmark = pytest.mark.podman


def embedded_engine(store, *, publish=lambda event: None, pull_secrets_dir="", builder=None,
                    **phase_options) -> EmbeddedRunner:
    """What the service assembles in embedded mode: podman builder, image access, phase work, runner."""
    builder = builder or PodmanBuilder()
    access = ImageAccess(builder=builder, pull_secrets_dir=pull_secrets_dir)
    phases = PhaseWork(store=store, builder=builder, access=access, **phase_options)
    return EmbeddedRunner(store=store, phases=phases, publish=publish)


async def one_image_through_an_engine(tmp_path, spec: dict, name: str, *, builder=None, creator="tester", timeout_s=600,
                     store_name: str | None = None, **phase_options) -> tuple[dict, list[str]]:
    """One image through a fresh engine of its own (git:// allowed) until Ready or Failed;
    returns the object and its build log's lines. Never stuck: a timeout fails the test.
    The store is the image's own unless `store_name` names an earlier image's."""
    store = SQLImageStore(f"sqlite:///{tmp_path}/cnbi-{store_name or name}.sqlite")
    events = []
    phase_options = {"work_dir": str(tmp_path / "work"), "ca_bundle": CA_BUNDLE,
                     "allowed_git_schemes": ["git", "https"], **phase_options}
    runner = embedded_engine(store, publish=events.append, builder=builder, **phase_options)
    await runner.start()
    try:
        await store.create(model.validate_new_object(
            {"metadata": {"name": name}, "spec": spec}, creator=creator,
            policy=ValidationPolicy(allowed_git_schemes=("git", "https"))))
        current = await drive_to_end(store, name, timeout_s=timeout_s)
    finally:
        await runner.stop()
    condition = failure_of(current["status"]) or {}
    print(f"{name}: {model.phase_of(current)} in {current['status'].get('failedPhase')}: {condition.get('message')}")
    lines = [e[1]["line"] for e in events if e[0] == "log" and e[1]["metadata"]["name"] == name]
    return current, lines


def failure_message(obj) -> str:
    """The message of the condition that says why the image failed (as the panel shows it)."""
    condition = failure_of(obj["status"])
    assert condition is not None, obj["status"]
    return condition.get("message", "")


async def test_ready_image_is_pushed_with_its_digest(tmp_path, local_registry, notebook_base_images, podman_env):
    store = SQLImageStore(f"sqlite:///{tmp_path}/cnbi.sqlite")
    events = []
    reconciler = embedded_engine(
        store, publish=events.append, work_dir=str(tmp_path / "builds"), ca_bundle=CA_BUNDLE,
        push_registry=f"{local_registry.host}/pushed",
    )
    await reconciler.start()
    try:
        obj = model.validate_new_object(
            {"metadata": {"name": "pushed-image"},
             "spec": {"buildType": "PackageList", "baseImage": notebook_base_images["user"],
                      "packageVersions": ["tabulate==0.9.0"]}},
            creator="pusher",
        )
        await store.create(obj)
        for _ in range(600):
            current = await store.get("pushed-image")
            if model.phase_of(current) in model.TERMINAL_PHASES:
                break
            await asyncio.sleep(0.5)
    finally:
        await reconciler.stop()
    status = current["status"]
    assert status["phase"] == "Ready", json.dumps(status.get("conditions"), indent=1)
    repository, digest = status["image"].split("@")
    assert repository == f"{local_registry.host}/pushed/pushed-image"
    result = local_registry.skopeo_inspect(f"pushed/pushed-image:{status['specHash'].split(':')[1][:12]}")
    assert result["Digest"] == digest
    log_lines = [e[1]["line"] for e in events if e[0] == "log"]
    assert any("pushing" in line for line in log_lines)
    assert any(line.startswith("==> Building -> Ready") for line in log_lines)


def test_build_log_keeps_head_and_tail():
    log = BuildLog(head=3, tail=4)
    for i in range(20):
        log.append(f"line {i}")
    assert log.dropped == 13
    assert log.text().splitlines() == ["line 0", "line 1", "line 2", "[... 13 lines not kept ...]",
                                       "line 16", "line 17", "line 18", "line 19"]
    assert BuildLog(initial_text="a\nb\n").text() == "a\nb\n"


async def drive_to_end(store, name, timeout_s=300):
    for _ in range(int(timeout_s * 2)):
        current = await store.get(name)
        if model.phase_of(current) in model.TERMINAL_PHASES:
            return current
        await asyncio.sleep(0.5)
    raise AssertionError(f"{name} did not finish: {current['status']}")


async def test_import_honours_the_pull_secret(tmp_path, auth_registry, notebook_base_images, podman_env):
    from tests.infra_podman import podman

    destination = f"{auth_registry.host}/private/notebook:1"
    pushed = podman("push", "--quiet", "--tls-verify=false", f"--authfile={auth_registry.authfile()}",
                    notebook_base_images["user"], f"docker://{destination}", env=podman_env)
    assert pushed.returncode == 0, pushed.stderr
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "registry-creds.json").write_text(json.dumps(auth_registry.auth_json))

    store = SQLImageStore(f"sqlite:///{tmp_path}/cnbi.sqlite")
    reconciler = embedded_engine(store, work_dir=str(tmp_path / "builds"), pull_secrets_dir=str(secrets))
    await reconciler.start()
    try:
        for name, secret in (("with-secret", "registry-creds"), ("without-secret", None), ("bad-secret", "nope")):
            spec = {"buildType": "ImageImport", "fromImage": destination}
            if secret:
                spec["imagePullSecret"] = {"name": secret}
            await store.create(model.validate_new_object({"metadata": {"name": name}, "spec": spec}, creator="u"))
        results = {name: await drive_to_end(store, name) for name in ("with-secret", "without-secret", "bad-secret")}
    finally:
        await reconciler.stop()
    assert results["with-secret"]["status"]["phase"] == "Ready", results["with-secret"]["status"]
    assert results["with-secret"]["status"]["image"].startswith(f"{auth_registry.host}/private/notebook@sha256:")
    for name, reason in (("without-secret", "ImageUnauthorized"), ("bad-secret", "ImagePullFailed")):
        status = results[name]["status"]
        assert status["phase"] == "Failed" and status["failedPhase"] == "Prepare"
        failure = [c for c in status["conditions"] if c["type"] == model.CONDITION_IMAGE_IMPORT_READY][0]
        assert failure["reason"] == reason, failure
    assert "nope" in [c for c in results["bad-secret"]["status"]["conditions"]
                      if c["type"] == model.CONDITION_IMAGE_IMPORT_READY][0]["message"]


async def test_cancelled_check_leaves_no_container(notebook_base_images, podman_env):
    """A DELETE during validation cancels the check: its container must go too."""
    from cnbi_hub.controller.checks import Check
    from tests.infra_podman import podman

    builder = PodmanBuilder()
    task = asyncio.ensure_future(builder.run_check(notebook_base_images["user"], Check("slow", ("sleep", "60"))))
    for _ in range(100):  # wait until the container runs
        names = podman("ps", "--format", "{{.Names}}", env=podman_env).stdout.split()
        if any(n.startswith("cnbi-run-") for n in names):
            break
        await asyncio.sleep(0.1)
    assert any(n.startswith("cnbi-run-") for n in names), names
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    left = podman("ps", "-a", "--format", "{{.Names}}", env=podman_env).stdout.split()
    assert not [n for n in left if n.startswith("cnbi-run-")], left


def test_appended_lines_finds_what_a_log_kept_elsewhere_gained_between_two_reads():
    from cnbi_hub.controller.buildlog import BuildLog, appended_lines

    assert appended_lines("", "a\nb\n") == ["a", "b"]
    assert appended_lines("a\nb\n", "a\nb\nc\nd\n") == ["c", "d"]
    assert appended_lines("a\nb\n", "a\nb\n") == []
    # a log that keeps its head and tail drops lines from its middle: matched on the last lines
    log = BuildLog(head=2, tail=4)
    for line in "12345":
        log.append(line)
    before = log.text()
    for line in "678":
        log.append(line)
    assert "not kept" in log.text()
    assert appended_lines(before, log.text()) == ["6", "7", "8"]
    # a new run's log shares nothing with the last one: all of it is new
    assert appended_lines("x\ny\n", "=== Run 2 ===\nz\n") == ["=== Run 2 ===", "z"]


def test_the_log_of_a_run_that_reused_an_image_at_once_is_said_from_its_status():
    from cnbi_hub.controller.buildlog import reuse_log

    reused = {"phase": "Ready", "reusedFrom": "first", "resolvedBaseImage": "r.example/x@sha256:ab",
              "conditions": [{"type": "Prepared", "status": "True", "reason": "Reused", "message": "identical to first"}]}
    assert reuse_log(reused) == "pinned r.example/x@sha256:ab\n==> Pending -> Ready (Reused): identical to first\n"
    assert reuse_log({**reused, "resolvedBaseImage": None}) == "==> Pending -> Ready (Reused): identical to first\n"
    assert reuse_log({**reused, "phase": "Building"}) == ""  # a rebuild of it under way: its own log
    assert reuse_log({"phase": "Ready", "image": "r.example/x@sha256:ab"}) == ""  # built: its log is stored


def push_notebook_base(notebook_base_images, tag: str, podman_env) -> str:
    """The notebook base image pushed to `tag` in the local registry; the tag."""
    from tests.infra_podman import podman

    pushed = podman("push", "--quiet", "--tls-verify=false", notebook_base_images["user"], f"docker://{tag}",
                    env=podman_env)
    assert pushed.returncode == 0, pushed.stderr
    return tag


async def run_to_end(store, name: str, run: int, timeout_s: float = 300) -> dict:
    """The image once its run number `run` has finished (Ready or Failed)."""
    for _ in range(int(timeout_s * 2)):
        current = await store.get(name)
        if current["status"].get("run", 1) == run and model.phase_of(current) in model.TERMINAL_PHASES:
            return current
        await asyncio.sleep(0.5)
    raise AssertionError(f"run {run} of {name} did not finish: {current['status']}")


async def test_an_identical_import_is_ready_while_the_only_build_slot_is_busy(
        tmp_path, local_registry, notebook_base_images, podman_env):
    """Reusing an import costs a registry request and one write: it does not wait for the slot
    a build holds. A registry that never answers keeps the one slot busy meanwhile."""
    base = push_notebook_base(notebook_base_images, f"{local_registry.host}/cnbi/notebook-base:py311-user", podman_env)
    store = SQLImageStore(f"sqlite:///{tmp_path}/cnbi.sqlite")
    events = []
    runner = embedded_engine(store, publish=events.append, work_dir=str(tmp_path / "builds"), ca_bundle=CA_BUNDLE)
    runner.max_concurrent_builds = 1

    def image(name, from_image):
        return model.validate_new_object({"metadata": {"name": name},
                                          "spec": {"buildType": "ImageImport", "fromImage": from_image}},
                                         creator="importer")

    await runner.start()
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        try:
            await store.create(image("first", base))
            first = await drive_to_end(store, "first")
            assert model.phase_of(first) == "Ready", first["status"]
            await store.create(image("holder", f"127.0.0.1:{silent.getsockname()[1]}/never/answers:1"))
            for _ in range(120):  # its look outside the slots times out, then it takes the slot
                if model.phase_of(await store.get("holder")) == "Prepare":
                    break
                await asyncio.sleep(0.25)
            assert model.phase_of(await store.get("holder")) == "Prepare"
            changes = store.watch()
            await store.create(image("again", base))
            again = await drive_to_end(store, "again", timeout_s=8)
            assert model.phase_of(await store.get("holder")) == "Prepare"  # the slot is still taken
            written = []
            with changes:
                while True:
                    try:
                        event = await changes.get(timeout=0.5)
                    except asyncio.TimeoutError:
                        break
                    if model.name_of(event.object) == "again":
                        written.append(model.phase_of(event.object))
        finally:
            await runner.stop()
    status = again["status"]
    assert status["phase"] == "Ready" and status["reusedFrom"] == "first", status
    assert status["image"] == first["status"]["image"] and status["specHash"] == first["status"]["specHash"]
    assert status["baseImageInfo"] == first["status"]["baseImageInfo"] and "queuePosition" not in status
    assert {"Pending", "Prepare", "Ready"} <= set(status["phaseTimes"])
    assert written == ["Pending", "Ready"]  # created, then one status write
    assert await store.get_artifact("again", "log") is None  # nothing stored: the one write is its status
    log = await full_log(store, again)  # what the logs route serves: said from its status
    assert log == f"pinned {status['resolvedBaseImage']}\n==> Pending -> Ready (Reused): identical to first\n", log
    assert any(e[0] == "log" and e[1]["line"].startswith("==> Pending -> Ready") for e in events)


async def test_an_image_whose_base_tag_moved_is_rebuilt_on_the_new_digest(
        tmp_path, local_registry, notebook_base_images, podman_env):
    """The base image check pins the tags Ready images were built on; when one names another
    digest (here: the same base with one more label, pushed to the same tag), the images on it
    are rebuilt, the trigger recorded. An image named by digest is left alone."""
    from tests.infra_podman import podman

    tag = push_notebook_base(notebook_base_images, f"{local_registry.host}/moving/base:latest", podman_env)
    store = SQLImageStore(f"sqlite:///{tmp_path}/cnbi.sqlite")
    runner = embedded_engine(store, work_dir=str(tmp_path / "builds"), ca_bundle=CA_BUNDLE)
    runner.rebuild_check_interval = 0  # rounds are run by hand here

    def image(name, from_image):
        return model.validate_new_object({"metadata": {"name": name},
                                          "spec": {"buildType": "ImageImport", "fromImage": from_image}},
                                         creator="importer")

    await runner.start()
    try:
        await store.create(image("follows-tag", tag))
        first = await drive_to_end(store, "follows-tag")
        assert model.phase_of(first) == "Ready", first["status"]
        old_digest = first["status"]["baseImageDigest"]
        await store.create(image("pinned", f"{tag.rsplit(':', 1)[0]}@{old_digest}"))
        assert model.phase_of(await drive_to_end(store, "pinned")) == "Ready"
        assert await runner.check_base_images() == 0  # nothing moved yet

        # the tag moves: the same base with one more label is pushed to it
        context = tmp_path / "moved"
        context.mkdir()
        (context / "Containerfile").write_text(f"FROM {notebook_base_images['user']}\nLABEL cnbi.test.moved=yes\n")
        built = podman("build", "--quiet", "-t", "localhost/cnbi-test/moved:1", str(context), env=podman_env)
        assert built.returncode == 0, built.stderr
        pushed = podman("push", "--quiet", "--tls-verify=false", "localhost/cnbi-test/moved:1", f"docker://{tag}",
                        env=podman_env)
        assert pushed.returncode == 0, pushed.stderr
        assert await runner.check_base_images() == 1
        current = await run_to_end(store, "follows-tag", run=2)
    finally:
        await runner.stop()
    status = current["status"]
    assert status["phase"] == "Ready", status
    assert status["baseImageDigest"] != old_digest and status["resolvedBaseImage"].endswith(status["baseImageDigest"])
    [trigger] = status["triggers"]
    assert (trigger["kind"], trigger["image"], trigger["from"], trigger["to"]) == (
        "baseImage", tag, old_digest, status["baseImageDigest"])
    assert (await store.get("pinned"))["status"].get("run", 1) == 1  # named by digest: never moves


async def test_an_image_on_a_weekly_schedule_is_rebuilt_when_a_week_has_passed(
        tmp_path, local_registry, notebook_base_images, podman_env):
    tag = push_notebook_base(notebook_base_images, f"{local_registry.host}/scheduled/base:1", podman_env)
    store = SQLImageStore(f"sqlite:///{tmp_path}/cnbi.sqlite")
    runner = embedded_engine(store, work_dir=str(tmp_path / "builds"), ca_bundle=CA_BUNDLE)
    runner.rebuild_check_interval = 0  # rounds are run by hand, with the clock moved on
    await runner.start()
    try:
        for name, schedule in (("weekly", {"rebuildSchedule": "weekly"}), ("unscheduled", {})):
            await store.create(model.validate_new_object(
                {"metadata": {"name": name}, "spec": {"buildType": "ImageImport", "fromImage": tag, **schedule}},
                creator="scheduler"))
            assert model.phase_of(await drive_to_end(store, name)) == "Ready"
        assert await runner.check_schedules() == 0  # just built
        assert await runner.check_schedules(now=time.time() + 8 * 86400) == 1
        current = await run_to_end(store, "weekly", run=2)
    finally:
        await runner.stop()
    assert model.phase_of(current) == "Ready", current["status"]
    [trigger] = current["status"]["triggers"]
    assert trigger["kind"] == "schedule" and trigger["schedule"] == "weekly"
    assert current["status"]["rebuildRequestedBy"] == "its weekly schedule"
    assert (await store.get("unscheduled"))["status"].get("run", 1) == 1


async def test_a_stack_is_built_and_rebuilt_in_order_and_a_failed_base_leaves_the_rest_on_their_builds(
        tmp_path, local_registry, notebook_base_images, podman_env):
    """Three images, each on the one below (`cnbi:<name>`), created at once: each starts when
    the one below is Ready and is built on its build. The bottom one's base tag moves: it is
    rebuilt, then the middle one on its new build, then the top one (parents Ready before
    children start). The tag moves to an image that cannot be inspected: the bottom one's
    rebuild fails, and the two above keep their builds with a condition saying why."""
    from tests.infra_podman import podman

    tag = push_notebook_base(notebook_base_images, f"{local_registry.host}/stacked/base:latest", podman_env)
    store = SQLImageStore(f"sqlite:///{tmp_path}/cnbi.sqlite")
    runner = embedded_engine(store, work_dir=str(tmp_path / "builds"), ca_bundle=CA_BUNDLE)
    runner.rebuild_check_interval = 0  # rounds are run by hand here
    # packages the notebook base does not have (its own are kept at their versions)
    levels = [("stack-a", tag, "tabulate==0.9.0"), ("stack-b", "cnbi:stack-a", "toolz==0.12.1"),
              ("stack-c", "cnbi:stack-b", "more-itertools==10.5.0")]

    def push_to_tag(containerfile: str, name: str) -> None:
        context = tmp_path / name
        context.mkdir()
        (context / "Containerfile").write_text(containerfile)
        (context / "hello").write_text("hello\n")
        built = podman("build", "--quiet", "-t", f"localhost/cnbi-test/{name}:1", str(context), env=podman_env)
        assert built.returncode == 0, built.stderr
        pushed = podman("push", "--quiet", "--tls-verify=false", f"localhost/cnbi-test/{name}:1", f"docker://{tag}",
                        env=podman_env)
        assert pushed.returncode == 0, pushed.stderr

    await runner.start()
    try:
        for name, base, package in reversed(levels):  # the top first: it waits all the same
            await store.create(model.validate_new_object(
                {"metadata": {"name": name},
                 "spec": {"buildType": "PackageList", "baseImage": base, "packageVersions": [package]}},
                creator="stacker"))
        first = {name: await run_to_end(store, name, run=1, timeout_s=600) for name, _, _ in levels}
        # created before the one below, an image waited for it in Pending: no failed first run
        assert all("runs" not in obj["status"] for obj in first.values()), [o["status"] for o in first.values()]
        for below, above in (("stack-a", "stack-b"), ("stack-b", "stack-c")):
            assert model.phase_of(first[above]) == "Ready", first[above]["status"]
            assert first[above]["status"]["resolvedBaseImage"] == first[below]["status"]["image"]
            assert first[above]["status"]["phaseTimes"]["Prepare"] >= first[below]["status"]["phaseTimes"]["Ready"]
        top_packages = {p["name"].lower() for p in first["stack-c"]["status"]["packages"]}
        assert {"tabulate", "toolz", "more-itertools"} <= top_packages, top_packages

        # the bottom one's base tag moves: the whole stack follows, level by level
        push_to_tag(f"FROM {notebook_base_images['user']}\nLABEL cnbi.test.stack=moved\n", "moved")
        assert await runner.check_base_images() == 1  # only the bottom: the others follow its build
        second = {name: await run_to_end(store, name, run=2, timeout_s=600) for name, _, _ in levels}
        for below, above in (("stack-a", "stack-b"), ("stack-b", "stack-c")):
            status = second[above]["status"]
            assert model.phase_of(second[above]) == "Ready", status
            assert status["resolvedBaseImage"] == second[below]["status"]["image"] != first[below]["status"]["image"]
            # it started only once the one below was Ready again
            assert status["phaseTimes"]["Pending"] >= second[below]["status"]["phaseTimes"]["Ready"]
            trigger = status["triggers"][-1]
            assert (trigger["kind"], trigger["image"], trigger["to"]) == (
                "baseImage", f"cnbi:{below}", second[below]["status"]["image"].rsplit("@", 1)[1])
        assert await runner.check_base_images() == 0  # all current now

        # the tag moves to an image with no Python at all: the bottom one's rebuild fails
        push_to_tag("FROM scratch\nCOPY hello /hello\n", "broken")
        assert await runner.check_base_images() == 1
        failed = await run_to_end(store, "stack-a", run=3)
        assert model.phase_of(failed) == "Failed", failed["status"]
        # servers still start on its newest good build
        assert image_reference(failed) == second["stack-a"]["status"]["image"]
        for _ in range(60):
            above = {name: await store.get(name) for name in ("stack-b", "stack-c")}
            notes = {name: [c for c in obj["status"]["conditions"] if c["type"] == model.CONDITION_BASE_CURRENT]
                     for name, obj in above.items()}
            if all(notes.values()):
                break
            await asyncio.sleep(0.5)
    finally:
        await runner.stop()
    for name, obj in above.items():
        assert model.phase_of(obj) == "Ready" and obj["status"].get("run") == 2, obj["status"]
        assert obj["status"]["image"] == second[name]["status"]["image"]  # its build stays
        [note] = notes[name]
        assert note["status"] == "False" and note["reason"] == "BaseImageFailed"
        assert note["message"].startswith("stack-a failed (") and "keeps its current build" in note["message"]


class StoreAwayOnPhaseWrites(SQLImageStore):
    """The SQLite store, away (ConnectionError) for the next `away` status writes that move an
    image into a working phase, as a store behind a restarting apiserver is."""

    away = 0

    async def update_status(self, name, status, resource_version=None):
        if self.away and status.get("phase") in ("Prepare", "Resolving", "Building"):
            self.away -= 1
            raise ConnectionError("the store is away (a test)")
        return await super().update_status(name, status, resource_version)


async def test_an_image_whose_work_broke_off_on_the_store_starts_again_and_is_never_stuck(
        tmp_path, local_registry, notebook_base_images, podman_env):
    base = push_notebook_base(notebook_base_images, f"{local_registry.host}/cnbi/notebook-base:py311-user", podman_env)
    store = StoreAwayOnPhaseWrites(f"sqlite:///{tmp_path}/cnbi.sqlite")
    runner = embedded_engine(store, work_dir=str(tmp_path / "builds"), ca_bundle=CA_BUNDLE)
    runner.max_unexpected_failures = 3
    await runner.start()
    try:
        store.away = 2  # twice: each time the work breaks off, it starts again (after 2 s, 4 s)
        await store.create(model.validate_new_object(
            {"metadata": {"name": "comes-back"}, "spec": {"buildType": "ImageImport", "fromImage": base}},
            creator="importer"))
        back = await drive_to_end(store, "comes-back", timeout_s=120)
        assert store.away == 0 and model.phase_of(back) == "Ready", back["status"]

        store.away = 100  # for good: after 3 in a row it ends Failed, naming the error
        other = push_notebook_base(notebook_base_images, f"{local_registry.host}/cnbi/other-base:1", podman_env)
        await store.create(model.validate_new_object(
            {"metadata": {"name": "gives-up"}, "spec": {"buildType": "ImageImport", "fromImage": other}},
            creator="importer"))
        ended = await drive_to_end(store, "gives-up", timeout_s=120)
    finally:
        await runner.stop()
    assert model.phase_of(ended) == "Failed", ended["status"]
    failure = failure_of(ended["status"])
    assert failure["reason"] == "EngineError" and "3 times in a row" in failure["message"], failure
    assert "ConnectionError: the store is away" in failure["message"]


class LaggingFeedStore(SQLImageStore):
    """The real SQLite store whose change feed brings each Ready a while after it was written,
    as an apiserver's watch does under load."""

    feed_lag = 1.5

    def watch(self):
        return _LaggingSubscription(super().watch(), self.feed_lag)


class _LaggingSubscription:
    def __init__(self, inner, lag: float):
        self.inner, self.lag = inner, lag

    @property
    def overflowed(self) -> bool:
        return self.inner.overflowed

    async def get(self, timeout: float | None = None):
        event = await self.inner.get(timeout)
        if event.type == "MODIFIED" and model.phase_of(event.object) == "Ready":
            await asyncio.sleep(self.lag)
        return event

    def close(self) -> None:
        self.inner.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


async def test_identical_imports_are_each_reused_once_while_the_feed_lags(
        tmp_path, local_registry, notebook_base_images, podman_env):
    """An import that reused an identical image has left Pending when its write returns, not
    when the change feed brings that write: a feed behind (an apiserver's watch under load)
    must not send it through the reuse a second time (another registry request and write)."""
    base = push_notebook_base(notebook_base_images, f"{local_registry.host}/cnbi/notebook-base:py311-user", podman_env)
    store = LaggingFeedStore(f"sqlite:///{tmp_path}/cnbi.sqlite")
    runner = embedded_engine(store, work_dir=str(tmp_path / "builds"), ca_bundle=CA_BUNDLE)

    def image(name):
        return model.validate_new_object({"metadata": {"name": name},
                                          "spec": {"buildType": "ImageImport", "fromImage": base}}, creator="importer")

    names = [f"again-{i}" for i in range(4)]
    reuses: dict[str, int] = {}
    reuse_at_once = runner.phases.reuse_at_once

    async def counted_reuse(obj, say):  # the real reuse, counted: each is a registry request
        reuses[model.name_of(obj)] = reuses.get(model.name_of(obj), 0) + 1
        return await reuse_at_once(obj, say)

    runner.phases.reuse_at_once = counted_reuse
    await runner.start()
    try:
        await store.create(image("first"))
        assert model.phase_of(await drive_to_end(store, "first")) == "Ready"
        for name in names:
            await store.create(image(name))
        for name in names:
            again = await drive_to_end(store, name, timeout_s=30)
            assert again["status"].get("reusedFrom") == "first", again["status"]
        await asyncio.sleep(3 * store.feed_lag)  # until the feed has brought every Ready
    finally:
        await runner.stop()
    assert {name: reuses.get(name) for name in names} == {name: 1 for name in names}
