"""Faults around the embedded engine: what it depends on is down, silent or full, and each
image still ends Failed with a true reason, in the phase where it happened, never stuck.

The engine here is the real one (SQLite store, phase work, podman builder, runner), as the
service assembles it; the faults are real too: closed ports, a server that accepts and never
answers, a disk below its floor.
"""

from __future__ import annotations

import asyncio
import pathlib
import socket
import threading

import pytest

from cnbi_hub import model
from cnbi_hub.controller.statemachine import failure_of
from tests.infra_registry import free_port
from tests.test_embedded_runner import failure_message, one_image_through_an_engine

pytestmark = pytest.mark.podman

USER_BASE = "localhost/cnbi/notebook-base:py311-user"


class SilentServer:
    """Accepts TCP connections and never answers: an index or registry that hangs."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []
        self.stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.stopped:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)

    def close(self):
        self.stopped = True
        self.sock.close()
        for conn in self.held:
            conn.close()


async def drive(tmp_path, spec: dict, name: str, **phase_options) -> dict:
    obj, _lines = await one_image_through_an_engine(tmp_path, spec, name, creator="faulty", **phase_options)
    return obj


async def test_the_registry_down_in_prepare_fails_there_naming_it(tmp_path):
    port = free_port()
    obj = await drive(tmp_path, {"buildType": "ImageImport", "fromImage": f"127.0.0.1:{port}/team/notebook:1"},
                      "import-registry-down")
    assert model.phase_of(obj) == "Failed" and obj["status"]["failedPhase"] == "Prepare"
    assert f"127.0.0.1:{port}" in failure_message(obj), failure_message(obj)


async def test_the_registry_down_during_the_push_fails_in_building_naming_it(tmp_path, notebook_base_images):
    port = free_port()
    obj = await drive(tmp_path, {"buildType": "PackageList", "baseImage": USER_BASE,
                                 "packageVersions": ["tabulate==0.9.0"]},
                      "push-registry-down", push_registry=f"127.0.0.1:{port}/pushed")
    assert model.phase_of(obj) == "Failed" and obj["status"]["failedPhase"] == "Building", failure_message(obj)
    assert "could not push" in failure_message(obj) and f"127.0.0.1:{port}" in failure_message(obj), failure_message(obj)


async def test_the_git_remote_unreachable_fails_in_prepare_naming_it(tmp_path):
    port = free_port()
    url = f"git://127.0.0.1:{port}/nowhere.git"
    obj = await drive(tmp_path, {"buildType": "GitRepository", "repository": url, "baseImage": USER_BASE},
                      "git-remote-down")
    assert model.phase_of(obj) == "Failed" and obj["status"]["failedPhase"] == "Prepare"
    assert url in failure_message(obj) or f"127.0.0.1:{port}" in failure_message(obj), failure_message(obj)


async def test_the_package_index_down_fails_in_resolving_naming_it(tmp_path, notebook_base_images):
    port = free_port()
    obj = await drive(tmp_path, {"buildType": "PackageList", "baseImage": USER_BASE,
                                 "packageVersions": ["a-package-nobody-has-cached==1.0"]},
                      "index-down", index_url=f"http://127.0.0.1:{port}/simple")
    assert model.phase_of(obj) == "Failed" and obj["status"]["failedPhase"] == "Resolving"
    message = failure_message(obj)
    assert f"127.0.0.1:{port}" in message and "Connection refused" in message, message


async def test_a_silent_package_index_fails_in_resolving_naming_the_timeout(tmp_path, notebook_base_images):
    silent = SilentServer()
    try:
        obj = await drive(tmp_path, {"buildType": "PackageList", "baseImage": USER_BASE,
                                     "packageVersions": ["another-package-nobody-has-cached==1.0"]},
                          "index-silent", index_url=f"http://127.0.0.1:{silent.port}/simple", index_timeout=2)
    finally:
        silent.close()
    assert model.phase_of(obj) == "Failed" and obj["status"]["failedPhase"] == "Resolving"
    message = failure_message(obj)
    assert "timed out" in message and f"127.0.0.1:{silent.port}" in message, message
    assert silent.held, "the resolver never reached the silent index"


async def test_the_build_process_killed_mid_build_fails_naming_it(tmp_path, make_git_repo, notebook_base_images):
    """Someone (the OOM killer, an admin) kills `podman build` itself while a step runs."""
    import os
    import signal

    marker = f"cnbi-fault-{os.getpid()}-{id(tmp_path)}"
    repo = make_git_repo(f"killed-build-{id(tmp_path)}", {"Containerfile": (
        f"FROM {USER_BASE}\nLABEL cnbi.test.run={marker}\nRUN sleep 120\n")})

    async def kill_podman_build():
        for _ in range(600):
            for pid in os.listdir("/proc"):
                if not pid.isdigit():
                    continue
                try:
                    argv = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
                except OSError:
                    continue
                if argv[0].endswith(b"podman") and b"build" in argv and any(b"killed-build" in a for a in argv):
                    await asyncio.sleep(3)  # into the RUN step
                    os.kill(int(pid), signal.SIGKILL)  # the podman build this test's engine started
                    return int(pid)
            await asyncio.sleep(0.2)

    killer = asyncio.ensure_future(kill_podman_build())
    obj = await drive(tmp_path, {"buildType": "GitRepository", "repository": repo.url, "gitRef": "main"},
                      "killed-build")
    assert await killer, "the podman build was never seen"
    assert model.phase_of(obj) == "Failed" and obj["status"]["failedPhase"] == "Building"
    assert "killed by SIGKILL from outside" in failure_message(obj), failure_message(obj)



@pytest.fixture
def small_disk(tmp_path):
    from tests.infra_disk import small_disk

    with small_disk(tmp_path / "small-disk", 8) as mount:
        yield mount


async def test_the_work_disk_really_full_fails_naming_it_and_the_next_build_goes_on(
        tmp_path, small_disk, make_git_repo, notebook_base_images):
    """The service's work directory runs out of space (ENOSPC, not a floor) while a repository
    is fetched: Failed in Prepare saying so, the space given back, and the next image builds."""
    import os

    def repository(name: str, megabytes: int):
        return make_git_repo(f"{name}-{os.getpid()}-{id(tmp_path)}", {
            "Containerfile": f"FROM {USER_BASE}\nCOPY data.bin /tmp/data.bin\n",
            "data.bin": os.urandom(megabytes * 1024 * 1024)})  # random: git cannot compress it

    too_big = repository("too-big-for-the-disk", 12)
    obj = await drive(tmp_path, {"buildType": "GitRepository", "repository": too_big.url, "gitRef": "main"},
                      "disk-full", work_dir=str(small_disk))
    assert model.phase_of(obj) == "Failed" and obj["status"]["failedPhase"] == "Prepare", obj["status"]
    condition = next(c for c in obj["status"]["conditions"] if c.get("reason") == "DiskFull")
    assert "the service's disk is full while fetching the repository" in condition["message"], condition
    assert str(small_disk) not in condition["message"]  # where is for the admin's log
    for _ in range(100):  # the engine removes a checkout in a thread after the status is written
        if not os.listdir(small_disk):
            break
        await asyncio.sleep(0.1)
    assert os.listdir(small_disk) == [], "the half-fetched checkout was left on the full disk"

    fits = repository("fits-on-the-disk", 3)
    obj = await drive(tmp_path, {"buildType": "GitRepository", "repository": fits.url, "gitRef": "main"},
                      "disk-fits", work_dir=str(small_disk))
    assert model.phase_of(obj) == "Ready", obj["status"]

def left_broken_by_a_killed_commit(tmp_path, image: str | None = None) -> str:
    """`image` (else a fresh one) left as podman 4 leaves an image it was killed committing:
    without its "manifest" item. Returns its ID, after checking that podman now fails naming it."""
    import secrets

    from tests.infra_podman import podman

    if image is None:
        context = tmp_path / f"broken-{secrets.token_hex(4)}"
        context.mkdir()
        (context / "Containerfile").write_text(f"FROM {USER_BASE}\nLABEL cnbi.test.broken={secrets.token_hex(8)}\n")
        built = podman("build", "--quiet", "--pull=never", str(context))
        assert built.returncode == 0, built.stderr
        image = built.stdout.split()[-1]
    image_id = podman("image", "inspect", "--format", "{{.Id}}", image).stdout.strip()
    graph_root = podman("info", "--format", "{{.Store.GraphRoot}}").stdout.strip()
    manifest = pathlib.Path(graph_root) / "overlay-images" / image_id / "manifest"
    assert manifest.is_file(), f"podman keeps an image's manifest elsewhere now: {manifest}"
    manifest.unlink()  # what podman had not yet written when it was killed
    listed = podman("images")
    assert listed.returncode != 0 and image_id in listed.stderr, "the broken image no longer breaks podman"
    return image_id


def test_a_broken_image_podman_left_behind_is_removed_and_base_images_are_found(tmp_path, notebook_base_images):
    """The fault a CI run met: a terminal killed during a base image's commit, and from then on
    every `podman images` (the base image check) failed."""
    from cnbi_hub.baseimage import BaseImageBuilder
    from tests.infra_podman import podman

    broken = left_broken_by_a_killed_commit(tmp_path)
    assert BaseImageBuilder().ensure("user") == notebook_base_images["user"]
    assert podman("images").returncode == 0
    assert podman("image", "exists", broken).returncode != 0


async def test_a_ready_image_podman_left_broken_is_built_again_not_reused(tmp_path, notebook_base_images):
    spec = {"buildType": "PackageList", "baseImage": USER_BASE, "packageVersions": ["tabulate==0.9.0"]}
    first = await drive(tmp_path, spec, "broken-first")
    assert model.phase_of(first) == "Ready", first["status"]
    image = first["status"]["image"]
    broken = left_broken_by_a_killed_commit(tmp_path, image)

    # the same input again, in the same store: the first image would be reused, were it whole
    obj, _lines = await one_image_through_an_engine(tmp_path, spec, "broken-second", creator="faulty",
                                                   store_name="broken-first")
    assert model.phase_of(obj) == "Ready", obj["status"]
    assert "reusedFrom" not in obj["status"], obj["status"]
    from tests.infra_podman import podman
    assert podman("images").returncode == 0
    assert podman("image", "exists", broken).returncode != 0
    assert podman("image", "exists", obj["status"]["image"]).returncode == 0


async def test_a_build_that_prints_podmans_words_for_a_broken_image_removes_nothing(tmp_path, make_git_repo,
                                                                                   notebook_base_images):
    """What a build prints is the user's: a RUN step that fails saying another image is broken
    (as podman says it) must not make the service remove that image. Only podman's own listing
    says which images are broken."""
    import os
    import secrets

    from tests.infra_podman import podman

    context = tmp_path / "someone-elses"
    context.mkdir()
    (context / "Containerfile").write_text(f"FROM {USER_BASE}\nLABEL cnbi.test.victim={secrets.token_hex(8)}\n")
    victim = f"localhost/cnbi-test/someone-elses-image:{secrets.token_hex(4)}"
    built = podman("build", "--quiet", "--pull=never", "-t", victim, str(context))
    assert built.returncode == 0, built.stderr
    victim_id = podman("image", "inspect", "--format", "{{.Id}}", victim).stdout.strip()
    words = f'locating item named "manifest" for image with ID "{victim_id}"'
    repo = make_git_repo(f"lying-build-{os.getpid()}-{id(tmp_path)}", {"Containerfile": (
        f"FROM {USER_BASE}\nLABEL cnbi.test.run={secrets.token_hex(8)}\nRUN echo '{words}' >&2; exit 1\n")})
    try:
        obj = await drive(tmp_path, {"buildType": "GitRepository", "repository": repo.url, "gitRef": "main"},
                          "lying-build")
        assert model.phase_of(obj) == "Failed" and obj["status"]["failedPhase"] == "Building", obj["status"]
        assert podman("image", "exists", victim).returncode == 0, "a build's output removed another image"
    finally:
        podman("rmi", "--force", victim)


# podman 4.3's own words, as it ended builds on a full 300 MB store here (shortened where long)
COMMIT_OUT_OF_SPACE = (
    'STEP 2/2: RUN head -c 200000000 /dev/urandom > /tmp/big && echo wrote\nwrote\nCOMMIT localhost/exp:one\n'
    'Error: committing container for step {Env:[PATH=/usr/bin HOME=/home/jovyan] Command:run '
    'Args:[head -c 200000000 /dev/urandom > /tmp/big && echo wrote] Flags:[] Attrs:map[] '
    'Message:RUN head -c 200000000 /dev/urandom > /tmp/big && echo wrote Original:RUN head -c 200000000 '
    '/dev/urandom > /tmp/big && echo wrote}: copying layers and metadata for container "5a7ae028e1cb": '
    'writing blob: adding layer with blob "sha256:6e8d204a6b10": processing tar file(write /tmp/big: '
    'no space left on device): exit status 1')
RUN_OUT_OF_SPACE_TOO = (
    'head: error writing \'standard output\': No space left on device\n'
    'Error: deleting build container "4a446085f6f4": 1 error occurred:\n'
    '\t* write /var/lib/x/overlay-containers/.tmp-containers.json572768381: no space left on device\n\n'
    ': building at STEP "RUN head -c 400000000 /dev/urandom > /tmp/big && echo wrote": while running runtime: '
    'exit status 1')


@pytest.mark.parametrize("output, podman_ran_out", [
    (COMMIT_OUT_OF_SPACE, True),
    (RUN_OUT_OF_SPACE_TOO, True),
    # the user's own step failing, whatever it prints or says in its text: not podman's storage
    ('no space left on device\nError: building at STEP "RUN echo x": while running runtime: exit status 1', False),
    ('Error: no space left on device\nError: building at STEP "RUN exit 1": while running runtime: exit status 1',
     False),
    ('Error: building at STEP "RUN echo \'no space left on device\' && exit 1": while running runtime: exit status 1',
     False),
    ('Error: building at STEP "RUN echo \'": no space left on device\' && exit 1": while running runtime: '
     'exit status 1', False),
    ('Error: committing container for step {Env:[X=no space left on device] Original:RUN x}: '
     'copying layers: exit status 1', False),
    ("COMMIT localhost/x\nsuccessfully built", False),
    # the step's output without a newline at its end: podman's error runs on from its last line
    ('Error: no space left on device\nxError: building at STEP "RUN printf x; exit 1": while running runtime: '
     'exit status 1', False),
    ('Error: deleting build container "4a44": 1 error occurred:\n\t* write /x: no space left on device\n\nx'
     'Error: building at STEP "RUN exit 1": while running runtime: exit status 1', False),
], ids=["commit", "run-and-cleanup", "step-output", "step-prints-error", "step-text", "step-text-quoted",
        "step-env", "no-error", "run-on-error", "run-on-cleanup"])
def test_only_podmans_own_words_say_its_storage_ran_out(output, podman_ran_out):
    from cnbi_hub.controller.builders.podman import ran_out_of_space

    assert ran_out_of_space(output) is podman_ran_out


def own_images(env) -> list[str]:
    """The full IDs of the images in the small disk's own store, never the machine's store it
    reads as an additional one (podman filters before it reads each image: this stays quick)."""
    from tests.infra_podman import podman

    return podman("images", "--all", "--filter", "readonly=false", "--no-trunc", "--format", "{{.ID}}",
                  env=env).stdout.split()


@pytest.fixture
def podman_on_a_small_disk(tmp_path, notebook_base_images):
    """The real podman builder with its own image storage on a 200 MB tmpfs (ENOSPC for real, not
    a floor): this machine's store is read as an additional image store, as podman allows, so
    the base images need no copy there. The test's images and containers live and go with it."""
    from traitlets import Unicode

    from cnbi_hub.containers import podman_environ
    from cnbi_hub.controller.builders.podman import PodmanBuilder
    from tests.infra_disk import small_disk
    from tests.infra_podman import podman

    machine_store = podman("info", "--format", "{{.Store.GraphRoot}}").stdout.strip()

    class PodmanOnASmallDisk(PodmanBuilder):
        storage_conf = Unicode()

        @property
        def env(self):
            return {**podman_environ(), "CONTAINERS_STORAGE_CONF": self.storage_conf}

    with small_disk(tmp_path / "image-storage", 200) as graph_root:
        conf = tmp_path / "storage.conf"
        conf.write_text(
            f'[storage]\ndriver = "overlay"\nrunroot = "{tmp_path / "run"}"\ngraphroot = "{graph_root}"\n'
            f'[storage.options]\nadditionalimagestores = ["{machine_store}"]\n'
            '[storage.options.overlay]\nmountopt = "nodev"\n')
        builder = PodmanOnASmallDisk(storage_conf=str(conf), min_free_disk=0)  # the disk really fills
        builder.graph_root_path = graph_root
        try:
            yield builder
        finally:
            env = builder.env
            podman("rm", "--all", "--force", env=env)
            own = own_images(env)
            if own:  # by ID, its own only: never an image of the machine's store
                podman("rmi", "--force", *own, env=env)


async def test_the_image_storage_really_full_fails_naming_it_and_the_next_build_goes_on(
        tmp_path, podman_on_a_small_disk, make_git_repo):
    """podman runs out of space committing a step (ENOSPC in its own storage, not a floor):
    Failed in Building with DiskFull and no server path; the steps it made are gone from the
    full disk, but not the images a step names as podman names its steps (someone else's, one
    tagged and one not); a step that only says the disk is full is the user's failure; the
    next build goes on."""
    import os
    import secrets
    import shutil

    from tests.infra_podman import podman

    builder = podman_on_a_small_disk
    someone_elses = []
    for tag in (["-t", "localhost/cnbi-test/someone-elses:1"], []):
        others = tmp_path / f"others-{len(someone_elses)}"
        others.mkdir()
        (others / "Containerfile").write_text(f"FROM {USER_BASE}\nRUN echo {secrets.token_hex(8)} > /tmp/someone-elses\n")
        built = podman("build", "--quiet", "--pull=never", *tag, str(others), env=builder.env)
        assert built.returncode == 0, built.stderr
        someone_elses.append(built.stdout.split()[-1])
    free_at_start = shutil.disk_usage(builder.graph_root_path).free

    def repository(name: str, steps: str):
        return make_git_repo(f"{name}-{os.getpid()}-{id(tmp_path)}", {"Containerfile": (
            f"FROM {USER_BASE}\nRUN echo {secrets.token_hex(8)} > /tmp/first-step\n{steps}")})

    # 120 MB fit in the step's container; committing them needs 120 MB more
    naming = "".join(f"RUN echo '--> {image_id}'\n" for image_id in someone_elses)
    too_big = repository("too-big-to-commit", naming + "RUN head -c 120000000 /dev/urandom > /tmp/big\n")
    obj = await drive(tmp_path, {"buildType": "GitRepository", "repository": too_big.url, "gitRef": "main"},
                      "storage-full", builder=builder)
    assert model.phase_of(obj) == "Failed" and obj["status"]["failedPhase"] == "Building", obj["status"]
    condition = next(c for c in obj["status"]["conditions"] if c.get("reason") == "DiskFull")
    assert "the service's disk is full while building the image" in condition["message"], condition
    assert str(builder.graph_root_path) not in condition["message"]
    assert sorted(image_id.removeprefix("sha256:") for image_id in own_images(builder.env)) == sorted(someone_elses), \
        "the failed build's steps stayed on the full disk, or the images its output named went"
    assert shutil.disk_usage(builder.graph_root_path).free > free_at_start - 8_000_000

    # as podman would say it, and with no newline at its end, so podman's own error runs on from it
    saying_so = repository("says-the-disk-is-full", "RUN printf 'Error: no space left on device\\nx' >&2; exit 1\n")
    obj = await drive(tmp_path, {"buildType": "GitRepository", "repository": saying_so.url, "gitRef": "main"},
                      "says-disk-full", builder=builder)
    assert model.phase_of(obj) == "Failed", obj["status"]
    assert (failure_of(obj["status"]) or {}).get("reason") == "BuildFailed", obj["status"]

    fits = repository("fits-the-disk", "RUN head -c 20000000 /dev/urandom > /tmp/small\n")
    obj = await drive(tmp_path, {"buildType": "GitRepository", "repository": fits.url, "gitRef": "main"},
                      "storage-fits", builder=builder)
    assert model.phase_of(obj) == "Ready", obj["status"]

