"""cnbi_hub's podman/buildah/skopeo configuration, shipped as package data.

Every podman, buildah or skopeo process cnbi_hub starts runs with the environment from
:func:`podman_environ`, so the machine's ``/etc/containers`` is never edited by hand:

- ``containers.conf``: ``runtime = "runc"``, ``cgroup_manager = "cgroupfs"``,
  ``default_ulimits = []`` (hosts like ours refuse the default nofile/nproc limits), and the
  host network for every container (podman's bridge lives in a private range we must not use).
- ``storage.conf``: the ``overlay`` driver in the usual rootful location, so images built here are
  visible to every tool that uses the same files.

One thing these files cannot fix: podman records the storage driver in its state database the
first time it runs. If that first run used no storage.conf, the database says ``""`` and every
container's exit hook (``podman container cleanup --storage-driver overlay``) fails with
"database configuration mismatch", which makes each ``podman run`` hang 20 s before returning.
:func:`podman_state_mismatch` detects that; ``podman system reset`` (with this environment) cures it.

And one thing podman 4 does not mend itself: killed while it commits an image (a build stopped,
a service or a terminal killed), it can leave the image without its "manifest" item, and from
then on every ``podman images`` fails naming it. :func:`run_podman` removes such an image, as the
message itself advises, and runs the command again (podman 5's ``system check --repair`` does
the same).
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
from collections.abc import Mapping
from importlib import resources
from pathlib import Path

_log = logging.getLogger(__name__)
BROKEN_IMAGE = re.compile(r'locating item named "manifest" for image with ID "([0-9a-f]{64})"')
CONTAINERS_CONF = "containers.conf"
_SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|^JUPYTERHUB_|^CNBI_", re.IGNORECASE)
STORAGE_CONF = "storage.conf"


def config_path(name: str) -> Path:
    """Filesystem path of one of the shipped config files (``containers.conf``/``storage.conf``)."""
    path = Path(str(resources.files(__name__).joinpath(name)))
    if not path.is_file():
        raise FileNotFoundError(f"cnbi_hub package data missing: {path}")
    return path


def podman_environ(base_env: Mapping[str, str] | None = None) -> dict[str, str]:
    """An environment for podman/buildah/skopeo that selects cnbi_hub's container config.

    ``base_env`` defaults to ``os.environ``; it is copied, never modified, without the
    variables that hold secrets (tokens, passwords, ``JUPYTERHUB_*``, ``CNBI_*``).
    """
    # podman needs none of the service's own secrets (its API token, webhook secrets), and a
    # build or a container it starts must find none of them in its parent's environment
    env = {key: value for key, value in (os.environ if base_env is None else base_env).items()
           if not _SECRET_NAME.search(key)}
    env["CONTAINERS_CONF"] = str(config_path(CONTAINERS_CONF))
    env["CONTAINERS_STORAGE_CONF"] = str(config_path(STORAGE_CONF))
    return env


def podman_state_mismatch(env: Mapping[str, str] | None = None) -> str | None:
    """Return podman's error text if its state database disagrees with our storage.conf, else None.

    Passes ``--storage-driver overlay`` explicitly, as podman's container exit hook does; podman
    only compares the database with an explicitly given driver. ``podman info`` changes nothing.
    """
    env = podman_environ() if env is None else dict(env)
    result = subprocess.run(
        ["podman", "--storage-driver", "overlay", "info", "--format", "{{.Store.GraphDriverName}}"],
        capture_output=True,
        text=True,
        env=env,
    )
    if "database configuration mismatch" in result.stderr:
        return result.stderr.strip()
    return None


def broken_image_ids(message: str) -> list[str]:
    """Pure: the IDs of the images podman's message says are broken (no manifest), in order."""
    return list(dict.fromkeys(BROKEN_IMAGE.findall(message or "")))


def remove_broken_image(image_id: str, env: Mapping[str, str] | None = None) -> str:
    """Remove one broken image by its ID; returns podman's words (what it untagged and deleted)."""
    result = subprocess.run(["podman", "rmi", "--force", image_id], capture_output=True, text=True,
                            env=podman_environ() if env is None else dict(env))
    # its stderr repeats the breakage as warnings: the lines that say what went are on stdout
    return " ".join((result.stdout if result.returncode == 0 else result.stderr).split())


def repair_broken_images(env: Mapping[str, str] | None = None, attempts: int = 5) -> list[str]:
    """Remove the images podman itself says are broken, as `podman images` names them one at a
    time; the removed IDs. Only podman's own listing decides: never the output of a build or a
    container, which a user writes and could make name any image."""
    env = podman_environ() if env is None else dict(env)
    removed: list[str] = []
    for _ in range(attempts):
        listed = subprocess.run(["podman", "images", "--quiet"], capture_output=True, text=True, env=env)
        broken = broken_image_ids(listed.stderr) if listed.returncode != 0 else []
        if not broken:
            break
        for image_id in broken:
            _log.warning("removed a broken image podman left behind: %s", remove_broken_image(image_id, env))
            removed.append(image_id)
    return removed


def run_podman(args: list[str], *, env: Mapping[str, str] | None = None, **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run(["podman", *args])`` in cnbi_hub's environment, text captured unless told
    otherwise; when it fails with podman's words for a broken image, the broken images podman
    lists are removed (see repair_broken_images) and it runs once more."""
    env = podman_environ() if env is None else dict(env)
    kwargs.setdefault("text", True)
    if "stdout" not in kwargs and "stderr" not in kwargs:
        kwargs.setdefault("capture_output", True)
    result = subprocess.run(["podman", *args], env=env, **kwargs)
    if result.returncode == 0 or not isinstance(result.stderr, str) or not broken_image_ids(result.stderr):
        return result
    if not repair_broken_images(env):
        return result  # the words came from elsewhere (a build's own output): nothing was broken
    return subprocess.run(["podman", *args], env=env, **kwargs)


__all__ = ["broken_image_ids", "config_path", "podman_environ", "podman_state_mismatch",
           "remove_broken_image", "repair_broken_images", "run_podman"]
