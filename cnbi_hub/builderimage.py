"""The image Tekton's build steps run in: buildah, git and uv, on the local Debian image.

Cluster mode builds with buildah inside a privileged Tekton step (container storage on the
step's emptyDir, `vfs`: overlay on overlay fails). Admins usually point
`TektonBuilder.builder_image` at an image of their own registry; this makes one from Debian
packages and this machine's uv, for clusters (and tests) that reach no public registry.

    python -m cnbi_hub.builderimage [--from localhost/cnbi/debian:bookworm] [--push REGISTRY/REPO]
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import uv

from .containers import run_podman

BUILDER_REPOSITORY = "localhost/cnbi/builder"
DEFAULT_FROM = "localhost/cnbi/debian:bookworm"
PACKAGES = ("buildah", "git", "uidmap", "fuse-overlayfs", "ca-certificates", "slirp4netns", "util-linux")


class BuilderImageError(RuntimeError):
    pass


def builder_containerfile(from_image: str) -> str:
    """Pure: Debian's buildah and git, and uv at /usr/local/bin/uv (the plan installs with it)."""
    return (
        f"FROM {from_image}\n"
        "RUN apt-get update -qq \\\n"
        f" && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends {' '.join(PACKAGES)} \\\n"
        " && rm -rf /var/lib/apt/lists/*\n"
        "COPY uv /usr/local/bin/uv\n"
        # buildah reads this: vfs needs no kernel module or fuse (overlay on overlay fails), and
        # the storage sits where the Task mounts its emptyDir
        "RUN printf '[storage]\\ndriver = \"vfs\"\\nrunroot = \"/run/containers/storage\"\\n"
        "graphroot = \"/var/lib/containers/storage\"\\n' > /etc/containers/storage.conf\n"
        'LABEL cnbi-hub.io/builder="buildah"\n'
    )


def _podman(*args: str) -> subprocess.CompletedProcess:
    return run_podman(list(args))


def ensure_builder_image(from_image: str = DEFAULT_FROM) -> str:
    """Build (or find, by a key of its Containerfile, base digest and uv) the builder image."""
    base = _podman("image", "inspect", "--format", "{{.Digest}}", from_image)
    if base.returncode != 0:
        raise BuilderImageError(f"{from_image} is not in local storage: build it with scripts/build-base-image")
    uv_bin = Path(uv.find_uv_bin())
    text = builder_containerfile(from_image)
    key = hashlib.sha256((text + base.stdout.strip()).encode() + uv_bin.read_bytes()).hexdigest()[:12]
    reference = f"{BUILDER_REPOSITORY}:{key}"
    if _podman("image", "exists", reference).returncode == 0:
        return reference
    with tempfile.TemporaryDirectory(prefix="cnbi-builderimage-") as context:
        shutil.copy2(uv_bin, Path(context) / "uv")
        (Path(context) / "Containerfile").write_text(text)
        built = _podman("build", "--network=host", "--pull=never", "-t", reference, context)
        if built.returncode != 0:
            raise BuilderImageError(f"building {reference} failed:\n{(built.stderr or built.stdout)[-2000:]}")
    return reference


def push(reference: str, destination: str) -> None:
    """Push to a registry (plain http for loopback ones, as podman does)."""
    host = destination.split("/", 1)[0].split(":")[0]
    tls = "false" if host in ("127.0.0.1", "localhost") else "true"
    pushed = _podman("push", "--quiet", f"--tls-verify={tls}", reference, f"docker://{destination}")
    if pushed.returncode != 0:
        raise BuilderImageError(f"pushing {reference} to {destination} failed: {pushed.stderr[-1000:]}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="from_image", default=DEFAULT_FROM)
    parser.add_argument("--push", help="also push it there, e.g. registry.example.org/cnbi/builder:1")
    args = parser.parse_args(argv)
    try:
        reference = ensure_builder_image(args.from_image)
        if args.push:
            push(reference, args.push)
    except BuilderImageError as e:
        print(e, file=sys.stderr)
        return 1
    print(reference)
    return 0


if __name__ == "__main__":
    sys.exit(main())
