"""Local notebook base images built from Debian packages, for tests and air-gapped admins.

No container registry on the internet is needed: the Debian root filesystem comes from
``debootstrap`` (bookworm, minbase, ``http://deb.debian.org/debian``) and is imported into podman;
the notebook images are built FROM it with ``podman build``, installing ``jupyterhub`` and
``jupyterlab`` from the Python package index.

Images (``variant`` → reference):

- ``debian`` → ``localhost/cnbi/debian:bookworm`` — bare Debian with ``python3`` (and
  ``python3-venv``, ``ca-certificates``); no JupyterHub.
- ``user`` → ``localhost/cnbi/notebook-base:py311-user`` — docker-stacks style: user ``jovyan``
  (uid 1000, gid 100 ``users``, ``HOME=/home/jovyan``), a Python venv at ``/opt/venv`` on
  ``PATH`` and OWNED BY jovyan, so users can ``pip install`` into it; ``USER jovyan``,
  ``WORKDIR /home/jovyan``, ``CMD ["jupyterhub-singleuser"]``.
- ``root`` → ``localhost/cnbi/notebook-base:py311-root`` — the same, but ``/opt/venv`` is owned
  by root (users cannot install into it).

Each image is also tagged ``:<tag>-<key12>``, where the key hashes everything that decides its
content (Containerfile text, pinned versions, debootstrap recipe). An existing keyed tag means
the image is up to date and the build is skipped. Labels under ``cnbi-hub.io/`` record the
variant, the key, the venv path and the pinned versions.

The package index URL (``PIP_INDEX_URL``) and CA bundle are build settings, never baked in: the
CA bundle is handed to ``podman build`` as a build secret, so corporate mirrors work the same way.

CLI: ``python -m cnbi_hub.baseimage [--variant user|root|debian|all] [--force]`` prints the
references it built or found.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

from traitlets import Dict, Set, Unicode, default
from traitlets.config import LoggingConfigurable

from . import model
from .containers import podman_environ, run_podman
from .trust import machine_ca_bundle

DEBIAN_VARIANT = "debian"
NOTEBOOK_VARIANTS = ("user", "root")
ALL_VARIANTS = (DEBIAN_VARIANT, *NOTEBOOK_VARIANTS)

DEBIAN_REPOSITORY = "localhost/cnbi/debian"
NOTEBOOK_REPOSITORY = "localhost/cnbi/notebook-base"

VENV_PATH = "/opt/venv"
NOTEBOOK_USER = "jovyan"
NOTEBOOK_UID = 1000
NOTEBOOK_GID = 100  # "users", as in docker-stacks

LABEL_PREFIX = f"{model.PREFIX}/"

# Bump when the debootstrap/cleanup recipe below changes in a way the key would not see.
DEBIAN_RECIPE_VERSION = "1"

# Packages on top of minbase: python3 to run Python, python3-venv for the notebook venv,
# ca-certificates so TLS works against public indexes, passwd for useradd.
DEBIAN_EXTRA_PACKAGES = ("python3", "python3-venv", "ca-certificates", "passwd")

# Removed from the rootfs to keep the image small; none are needed at run time.
DEBIAN_PRUNED_PATHS = (
    "var/cache/apt/archives",
    "var/lib/apt/lists",
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
    "var/log",
)

# The build secret id under which the CA bundle is mounted during RUN.
CA_SECRET_ID = "cnbi-ca-bundle"
CA_SECRET_PATH = f"/run/secrets/{CA_SECRET_ID}"

SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
SAFE_VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9.+!_-]*")

LOCK_FILE = Path(tempfile.gettempdir()) / "cnbi-hub-baseimage.lock"


class BaseImageError(RuntimeError):
    """A base image could not be built; the message says which step failed and why."""


# -- pure planning ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ImagePlan:
    """What to build for one variant: its references and the content that decides its key."""

    variant: str
    repository: str
    tag: str
    content_key: str
    containerfile: str | None  # None for the debootstrapped Debian image

    @property
    def reference(self) -> str:
        return f"{self.repository}:{self.tag}"

    @property
    def keyed_reference(self) -> str:
        return f"{self.repository}:{self.tag}-{self.content_key[:12]}"


def content_key(*parts: str) -> str:
    """sha256 hex of the parts, length-prefixed so ("ab", "c") and ("a", "bc") differ."""
    digest = hashlib.sha256()
    for part in parts:
        data = part.encode()
        digest.update(len(data).to_bytes(8, "big"))
        digest.update(data)
    return digest.hexdigest()


def debootstrap_argv(suite: str, mirror: str, target: str) -> list[str]:
    return [
        "debootstrap",
        "--variant=minbase",
        "--include=" + ",".join(DEBIAN_EXTRA_PACKAGES),
        suite,
        target,
        mirror,
    ]


def plan_debian_image(suite: str, mirror: str) -> ImagePlan:
    recipe = json.dumps(
        {
            "recipe": DEBIAN_RECIPE_VERSION,
            "suite": suite,
            "mirror": mirror,
            "debootstrap": debootstrap_argv(suite, mirror, "TARGET"),
            "pruned": DEBIAN_PRUNED_PATHS,
        },
        sort_keys=True,
    )
    return ImagePlan(DEBIAN_VARIANT, DEBIAN_REPOSITORY, suite, content_key(recipe), None)


def notebook_containerfile(variant: str, from_image: str, versions: Mapping[str, str]) -> str:
    """The Containerfile of a notebook variant ("user": venv owned by jovyan, "root": by root)."""
    if variant not in NOTEBOOK_VARIANTS:
        raise ValueError(f"notebook variant must be one of {NOTEBOOK_VARIANTS}, not {variant!r}")
    for name, version in versions.items():
        # They end up inside a RUN line: allow only what package names and versions contain.
        if not (SAFE_NAME.fullmatch(name) and SAFE_VERSION.fullmatch(version)):
            raise ValueError(f"package pin {name!r}=={version!r} is not a plain name and version")
    requirements = " ".join(f"{name}=={version}" for name, version in sorted(versions.items()))
    venv_owner = NOTEBOOK_USER if variant == "user" else "root"
    labels = {
        "variant": variant,
        "venv": VENV_PATH,
        "venv-owner": venv_owner,
        **{f"{name}-version": version for name, version in sorted(versions.items())},
    }
    label_lines = " \\\n      ".join(f'"{LABEL_PREFIX}{k}"="{v}"' for k, v in labels.items())
    # The venv is created by the user who owns it: a later `chown -R` layer would double its size.
    install_user = NOTEBOOK_USER if variant == "user" else "root"
    return f"""\
FROM {from_image}
# pip's default index unless the build passes --build-arg PIP_INDEX_URL (a mirror).
ARG PIP_INDEX_URL=https://pypi.org/simple
RUN useradd --create-home --no-log-init --uid {NOTEBOOK_UID} --gid {NOTEBOOK_GID} \\
      --shell /bin/bash {NOTEBOOK_USER} \\
 && install -d -o {venv_owner} -g {NOTEBOOK_GID} -m 0755 {VENV_PATH} \\
 && echo 'export VIRTUAL_ENV={VENV_PATH} PATH="{VENV_PATH}/bin:$PATH"' > /etc/profile.d/00-notebook-venv.sh
# ^ Lab's terminal runs a login shell, and /etc/profile resets PATH: put the venv back on it
USER {install_user}
# The CA bundle is a build secret (readable by the installing user), never part of a layer.
RUN --mount=type=secret,id={CA_SECRET_ID},mode=0444 \\
    PIP_CERT={CA_SECRET_PATH} SSL_CERT_FILE={CA_SECRET_PATH} \\
    PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 \\
    sh -c 'python3 -m venv {VENV_PATH} \\
      && {VENV_PATH}/bin/pip install --no-cache-dir {requirements}'
ENV VIRTUAL_ENV={VENV_PATH} \\
    PATH={VENV_PATH}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \\
    HOME=/home/{NOTEBOOK_USER} \\
    SHELL=/bin/bash \\
    LANG=C.UTF-8
LABEL {label_lines}
USER {NOTEBOOK_USER}
WORKDIR /home/{NOTEBOOK_USER}
EXPOSE 8888
CMD ["jupyterhub-singleuser"]
"""


def plan_notebook_image(
    variant: str, debian: ImagePlan, python_tag: str, versions: Mapping[str, str]
) -> ImagePlan:
    # FROM the keyed Debian tag: a new Debian image changes this text, hence the key.
    text = notebook_containerfile(variant, debian.keyed_reference, versions)
    return ImagePlan(variant, NOTEBOOK_REPOSITORY, f"{python_tag}-{variant}", content_key(text), text)


def stale_keyed_tag(reference: str, plan: ImagePlan) -> bool:
    """True if reference is a keyed tag of plan's image (any key, including the current one)."""
    repository, _, tag = reference.rpartition(":")
    prefix = plan.tag + "-"
    suffix = tag[len(prefix):]
    return (
        repository == plan.repository
        and tag.startswith(prefix)
        and len(suffix) == 12
        and all(c in "0123456789abcdef" for c in suffix)
    )


def expand_variants(requested: Iterable[str]) -> list[str]:
    """Requested variants in build order (Debian first); "all" means every variant."""
    wanted = set()
    for variant in requested:
        if variant == "all":
            wanted.update(ALL_VARIANTS)
        elif variant in ALL_VARIANTS:
            wanted.add(variant)
        else:
            raise ValueError(f"unknown base image variant {variant!r}; choose from {ALL_VARIANTS} or 'all'")
    return [v for v in ALL_VARIANTS if v in wanted]


# -- side effects ----------------------------------------------------------------------------


@contextlib.contextmanager
def build_lock() -> Iterator[None]:
    """Serialize builds across processes: parallel test sessions share podman storage."""
    with open(LOCK_FILE, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class BaseImageBuilder(LoggingConfigurable):
    """Builds the local Debian and notebook base images into podman's storage."""

    debian_suite = Unicode("bookworm", help="Debian suite given to debootstrap.").tag(config=True)
    debian_mirror = Unicode(
        "http://deb.debian.org/debian",
        help="Debian mirror given to debootstrap (and left in the image's sources.list).",
    ).tag(config=True)
    python_tag = Unicode(
        "py311",
        help="Tag prefix naming the Python of the Debian suite (bookworm ships 3.11).",
    ).tag(config=True)
    package_versions = Dict(
        {"jupyterhub": "6.1.1", "jupyterlab": "4.6.6"},
        help="""Exact versions pip installs into the notebook venv, recorded as labels.

        jupyterhub-singleuser must speak the hub's API; keep jupyterhub's major version equal to
        the hub's.""",
    ).tag(config=True)
    pip_index_url = Unicode(
        help="Package index for pip during the build. Default: $PIP_INDEX_URL, else pip's own default."
    ).tag(config=True)
    ca_bundle = Unicode(
        help="CA bundle passed to the build as a secret (corporate proxies / mirrors).",
    ).tag(config=True)

    @default("pip_index_url")
    def _default_pip_index_url(self) -> str:
        return os.environ.get("PIP_INDEX_URL", "")

    @default("ca_bundle")
    def _default_ca_bundle(self) -> str:
        return machine_ca_bundle()

    # Variants this builder has already built or found, so a run checks each only once.
    _ensured = Set()

    # -- plans

    def debian_plan(self) -> ImagePlan:
        return plan_debian_image(self.debian_suite, self.debian_mirror)

    def plan(self, variant: str) -> ImagePlan:
        if variant == DEBIAN_VARIANT:
            return self.debian_plan()
        return plan_notebook_image(variant, self.debian_plan(), self.python_tag, self.package_versions)

    # -- podman

    def _run(self, argv: list[str], **kwargs) -> subprocess.CompletedProcess:
        if argv[0] == "podman":
            result = run_podman(argv[1:], **kwargs)
        else:
            result = subprocess.run(argv, env=podman_environ(), **kwargs)
        if result.returncode != 0:
            stderr = result.stderr if isinstance(result.stderr, str) else ""
            raise BaseImageError(f"{argv[0]} {argv[1]} failed ({result.returncode}) {stderr}".strip())
        return result

    def image_exists(self, reference: str) -> bool:
        return run_podman(["image", "exists", reference]).returncode == 0

    def _tag(self, source: str, target: str) -> None:
        self._run(["podman", "tag", source, target], capture_output=True, text=True)

    def ensure(self, variant: str, force: bool = False) -> str:
        """Build one variant unless its keyed tag exists; return the plain reference."""
        plan = self.plan(variant)
        if variant != DEBIAN_VARIANT and DEBIAN_VARIANT not in self._ensured:
            # The notebook image builds FROM the keyed Debian tag.
            self.ensure(DEBIAN_VARIANT, force=False)
        with build_lock():
            if not force and self.image_exists(plan.keyed_reference):
                print(f"cached: {plan.keyed_reference}", file=sys.stderr)
            elif variant == DEBIAN_VARIANT:
                self._build_debian(plan)
            else:
                self._build_notebook(plan)
            # Point the plain tag at the keyed image (cheap; also repairs a moved tag).
            self._tag(plan.keyed_reference, plan.reference)
            self._untag_stale(plan)
        self._ensured.add(variant)
        return plan.reference

    def _untag_stale(self, plan: ImagePlan) -> None:
        """Drop keyed tags of older builds of this image, so old layers can be freed."""
        listed = self._run(
            ["podman", "images", "--format", "{{.Repository}}:{{.Tag}}", plan.repository],
            capture_output=True, text=True,
        )
        stale = [
            ref for ref in listed.stdout.split()
            if stale_keyed_tag(ref, plan) and ref != plan.keyed_reference
        ]
        for reference in stale:
            # No --force: an image a container still uses stays; that is not an error here.
            run_podman(["rmi", reference])

    def _build_debian(self, plan: ImagePlan) -> None:
        if os.geteuid() != 0:
            raise BaseImageError("debootstrap needs root: run as root to build the Debian base image")
        print(f"building {plan.keyed_reference} with debootstrap", file=sys.stderr)
        with tempfile.TemporaryDirectory(prefix="cnbi-debootstrap-", dir="/var/tmp") as tmp:
            rootfs = Path(tmp) / "rootfs"
            self._run(debootstrap_argv(self.debian_suite, self.debian_mirror, str(rootfs)),
                      stdout=sys.stderr)
            for relative in DEBIAN_PRUNED_PATHS:
                self._empty_dir(rootfs / relative)
            self._import_rootfs(rootfs, plan)

    @staticmethod
    def _empty_dir(path: Path) -> None:
        # Keep the directory (apt and dpkg expect it), drop its content.
        if not path.is_dir():
            return
        for child in path.iterdir():
            if child.is_dir() and not child.is_symlink():
                subprocess.run(["rm", "-rf", "--one-file-system", "--", str(child)], check=True)
            else:
                child.unlink()

    def _import_rootfs(self, rootfs: Path, plan: ImagePlan) -> None:
        changes = [
            'CMD ["/bin/bash"]',
            "ENV LANG=C.UTF-8",
            f"LABEL {LABEL_PREFIX}variant={DEBIAN_VARIANT}",
            f"LABEL {LABEL_PREFIX}content-key={plan.content_key}",
            f"LABEL {LABEL_PREFIX}debian-suite={self.debian_suite}",
        ]
        import_argv = ["podman", "import", "--quiet"]
        for change in changes:
            import_argv += ["--change", change]
        import_argv += ["-", plan.keyed_reference]
        # /dev, /proc and /sys are provided by the runtime; their debootstrap content is noise.
        tar_argv = ["tar", "--numeric-owner", "--exclude=./dev/*", "--exclude=./proc/*",
                    "--exclude=./sys/*", "-C", str(rootfs), "-c", "."]
        with subprocess.Popen(tar_argv, stdout=subprocess.PIPE) as tar:
            imported = subprocess.run(import_argv, stdin=tar.stdout, env=podman_environ(),
                                      capture_output=True, text=True)
            tar.stdout.close()
            tar_rc = tar.wait()
        if tar_rc != 0 or imported.returncode != 0:
            raise BaseImageError(f"importing the Debian rootfs failed: tar {tar_rc}, {imported.stderr}")

    def _build_notebook(self, plan: ImagePlan) -> None:
        if not self.ca_bundle:
            raise BaseImageError("no CA bundle found; set BaseImageBuilder.ca_bundle or PIP_CERT")
        print(f"building {plan.keyed_reference} with podman build", file=sys.stderr)
        with tempfile.TemporaryDirectory(prefix="cnbi-baseimage-") as context:
            containerfile = Path(context) / "Containerfile"
            containerfile.write_text(plan.containerfile)
            argv = [
                "podman", "build",
                "--network", "host",
                "--pull=never",
                "--layers=false",
                "--secret", f"id={CA_SECRET_ID},src={self.ca_bundle}",
                "--label", f"{LABEL_PREFIX}content-key={plan.content_key}",
                "--tag", plan.keyed_reference,
                "--file", str(containerfile),
            ]
            if self.pip_index_url:
                argv += ["--build-arg", f"PIP_INDEX_URL={self.pip_index_url}"]
            argv.append(context)
            self._run(argv, stdout=sys.stderr)


def ensure_base_images(
    variants: Iterable[str] = ALL_VARIANTS, *, force: bool = False, builder: BaseImageBuilder | None = None
) -> dict[str, str]:
    """Make sure the base images exist locally; return {variant: reference}. Builds what is missing."""
    builder = builder or BaseImageBuilder()
    return {variant: builder.ensure(variant, force=force) for variant in expand_variants(variants)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cnbi_hub.baseimage",
        description="Build cnbi_hub's local Debian and notebook base images into podman storage.",
    )
    parser.add_argument("--variant", action="append", choices=[*ALL_VARIANTS, "all"],
                        help="which image to build (repeatable; default: all)")
    parser.add_argument("--force", action="store_true", help="rebuild even if the keyed tag exists")
    args = parser.parse_args(argv)
    try:
        references = ensure_base_images(args.variant or ["all"], force=args.force)
    except BaseImageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for reference in references.values():
        print(reference)
    return 0


if __name__ == "__main__":
    sys.exit(main())
