"""The build plan: a CustomNBImage plus what Prepare and Resolving observed -> a Containerfile.

Pure: no file system, no subprocess. The podman builder and the Tekton pipeline execute the
same plan.

Safety rule: no string from a user (package names, labels, annotations, URLs) is ever
interpolated into a ``RUN`` line. Package input lives in context files (the lock, the apt
list) that fixed commands read; what the base image told us (python path, user) is
validated and passed as a build argument or used only in ``USER``/``COPY --chown``; label
values are quoted for the Containerfile parser and placed after every ``RUN``.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field

__all__ = [
    "APT_PACKAGE_RE",
    "PLAN_VERSION",
    "BuildObservations",
    "BuildPlan",
    "PlanError",
    "parse_apt_txt",
    "plan_build",
    "quote_containerfile_string",
    "spec_hash",
    "uv_config_toml",
]

#: bump when the Containerfile this module writes changes, so spec_hash stops reusing old images
PLAN_VERSION = "1"

ANNOTATION_CREATOR = "opendatahub.io/notebook-image-creator"
LABEL_PREFIX = "io.cnbi-hub."

#: context paths the builder must fill in (the plan names them; it does not carry their bytes)
UV_CONTEXT_PATH = "cnbi/uv"
LOCK_CONTEXT_PATH = "cnbi/requirements.lock"
APT_CONTEXT_PATH = "cnbi/apt.txt"
REPO_CONTEXT_DIR = "repo"
#: build secrets the builder must provide, as empty files when the setting is unset
SECRET_CA = "cnbi-ca"
SECRET_UV_CONFIG = "cnbi-uv-config"

# Debian policy: lowercase letters, digits, + - . ; at least two characters, alnum first
APT_PACKAGE_RE = re.compile(r"^[a-z0-9][a-z0-9+.-]+$")
_USER_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,31})?$")
_NUMERIC_USER_RE = re.compile(r"^(\d+)(?::\d+)?$")
_PATH_RE = re.compile(r"^/[A-Za-z0-9_.+/-]+$")
_DIGEST_REF_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]*@sha256:[0-9a-f]{64}$")
_IMAGE_REF_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@-]*$")
_COMMIT_RE = re.compile(r"^(?:[0-9a-f]{40}|[0-9a-f]{64})$")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
_ROOT_USERS = ("", "root", "0", "0:0", "root:root")


class PlanError(ValueError):
    """The object and observations do not make a buildable plan; the message says what to fix."""


@dataclass(frozen=True)
class BuildObservations:
    """What Prepare and Resolving found out, everything plan_build needs besides the object."""

    #: the base image pinned by digest, ``registry/name@sha256:...``
    resolved_base_image: str
    #: the base image's configured user (``Config.User``): ``jovyan``, ``1000``, ``1000:100`` or ""
    base_user: str
    #: the python the notebook server runs on, e.g. ``/opt/conda/bin/python``
    python_path: str
    #: True when ``base_user`` can write the python environment (conda/venv owned by the user)
    python_env_owned_by_user: bool
    spec_hash: str
    #: the image reference the builder tags and pushes
    target: str
    lock_text: str | None = None
    git_commit: str | None = None
    #: GitRepository: "containerfile" | "requirements" | "environment" | None (gitsource.detect_recipe)
    recipe: str | None = None
    #: GitRepository with the "containerfile" recipe: "Containerfile" or "Dockerfile"
    repo_containerfile: str | None = None
    #: names from the repository's apt.txt (parse_apt_txt)
    apt_packages: tuple[str, ...] = ()
    has_postbuild: bool = False
    #: numeric uid of ``base_user`` when it is a name (cache mounts need a number)
    base_uid: int | None = None


@dataclass(frozen=True)
class BuildPlan:
    #: Containerfile text; None when the repository's own file is used (see containerfile_path)
    containerfile: str | None
    #: files the plan provides, by context path
    context_files: dict[str, bytes]
    target: str
    #: labels on the result; already in the Containerfile when the plan wrote it, else the
    #: builder passes them as ``--label`` (an argv item, no quoting needed)
    labels: dict[str, str]
    build_args: dict[str, str]
    #: where the Containerfile is, relative to the context root
    containerfile_path: str = "Containerfile"
    #: context paths the builder must supply, with what to put there: {"cnbi/uv": "uv"} is
    #: the uv binary (uv.find_uv_bin() on the builder's side, the task image's in Tekton)
    builder_files: dict[str, str] = field(default_factory=dict)
    #: where the builder places the git checkout in the context: "" = it is the context root
    repo_dir: str | None = None
    #: ``--secret id=...`` the builder must provide (empty files when unset); never in a layer
    secrets: tuple[str, ...] = ()


def quote_containerfile_string(value: str) -> str:
    """A double-quoted Containerfile word that the parser reads back as ``value``.

    Inside double quotes the parser treats only ``\\``, ``"`` and ``$`` (variable expansion)
    specially; control characters (a newline would end the instruction) must already be gone
    (see _clean_label_value).
    """
    if _CONTROL_RE.search(value):
        raise PlanError(f"control characters cannot be quoted for a Containerfile: {value!r}")
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$")
    return f'"{escaped}"'


def _clean_label_value(value: str) -> str:
    # labels are metadata: a newline or tab in a display name becomes a space
    return _CONTROL_RE.sub(" ", value)


def parse_apt_txt(text: str) -> tuple[str, ...]:
    """Package names from a repo2docker-style apt.txt; ValueError names the first bad line."""
    names = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if not APT_PACKAGE_RE.match(line):
            raise PlanError(
                f"apt.txt line {number}: {raw.strip()!r} is not a Debian package name "
                "(lowercase letters, digits, '+', '-', '.'; one per line)"
            )
        names.append(line)
    return tuple(names)


def uv_config_toml(index_url: str | None, extra_index_urls: tuple[str, ...] = ()) -> str:
    """uv.toml text for the ``cnbi-uv-config`` build secret (index URLs may hold credentials)."""
    lines = ["[pip]"]
    if index_url:
        lines.append(f"index-url = {json.dumps(index_url)}")
    if extra_index_urls:
        lines.append(f"extra-index-url = {json.dumps(list(extra_index_urls))}")
    # JSON string escapes are valid TOML basic-string escapes
    return "\n".join(lines) + "\n" if len(lines) > 1 else ""


def spec_hash(
    obj: dict,
    resolved_base_image: str,
    lock_sha256: str | None,
    git_commit: str | None = None,
) -> str:
    """``sha256:...`` of the effective build input: same hash, same image content.

    What the image is made of counts (build type, base digest, lock, repository and commit,
    plan version); how it was asked for does not (``pandas`` and ``pandas>=2`` resolving to
    the same lock are the same image), nor who asked or what it is called.
    """
    spec = obj.get("spec") or {}
    if git_commit is None:
        git_commit = (obj.get("status") or {}).get("gitCommit")
    key = {
        "plan": PLAN_VERSION,
        "buildType": spec.get("buildType"),
        "base": resolved_base_image,
        "lock": lock_sha256,
    }
    if spec.get("buildType") == "GitRepository":
        key["repository"] = spec.get("repository")
        key["commit"] = git_commit
    canonical = json.dumps(key, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


def _validate(obs: BuildObservations) -> None:
    if not _DIGEST_REF_RE.match(obs.resolved_base_image or ""):
        raise PlanError(
            f"base image must be pinned by digest (name@sha256:...), got {obs.resolved_base_image!r}"
        )
    if obs.base_user and not _USER_RE.match(obs.base_user):
        raise PlanError(f"base image user {obs.base_user!r} is not a user name or uid")
    if not _PATH_RE.match(obs.python_path or "") or "/../" in obs.python_path + "/":
        raise PlanError(f"python path must be an absolute path, got {obs.python_path!r}")
    if not _IMAGE_REF_RE.match(obs.target or ""):
        raise PlanError(f"target must be an image reference, got {obs.target!r}")
    if obs.git_commit is not None and not _COMMIT_RE.match(obs.git_commit):
        raise PlanError(f"git commit must be a full hex sha, got {obs.git_commit!r}")
    for name in obs.apt_packages:
        if not APT_PACKAGE_RE.match(name):
            raise PlanError(f"{name!r} is not a Debian package name")


def _labels(obj: dict, obs: BuildObservations) -> dict[str, str]:
    metadata = obj.get("metadata") or {}
    annotations = metadata.get("annotations") or {}
    spec = obj.get("spec") or {}
    labels = {
        LABEL_PREFIX + "image": str(metadata.get("name", "")),
        LABEL_PREFIX + "owner": str(annotations.get(ANNOTATION_CREATOR, "")),
        LABEL_PREFIX + "spec-hash": obs.spec_hash,
        "org.opencontainers.image.base.name": obs.resolved_base_image,
    }
    if obs.git_commit:
        labels[LABEL_PREFIX + "git-commit"] = obs.git_commit
        labels["org.opencontainers.image.revision"] = obs.git_commit
        if spec.get("repository"):
            labels["org.opencontainers.image.source"] = str(spec["repository"])
    return {key: _clean_label_value(value) for key, value in labels.items()}


def _label_instruction(labels: dict[str, str]) -> str:
    pairs = [
        f"{quote_containerfile_string(k)}={quote_containerfile_string(v)}"
        for k, v in labels.items()
    ]
    return "LABEL " + " \\\n      ".join(pairs)


def _cache_uid(obs: BuildObservations, as_user: bool) -> int:
    if not as_user:
        return 0
    numeric = _NUMERIC_USER_RE.match(obs.base_user)
    if numeric:
        return int(numeric.group(1))
    if obs.base_uid is not None:
        return int(obs.base_uid)
    raise PlanError(
        f"base image user {obs.base_user!r} is a name; Prepare must observe its numeric uid (base_uid)"
    )


# Everything below is fixed text: the lock path, the python (a build arg, quoted for the
# shell), the secrets and the cache are the same for every image.
_UV_INSTALL = """\
ARG CNBI_PYTHON
RUN --mount=type=cache,target=/cnbi-cache/uv,uid={uid} \\
    --mount=type=bind,source=cnbi,target=/cnbi-context \\
    --mount=type=secret,id={ca},target=/run/secrets/{ca},mode=0444 \\
    --mount=type=secret,id={cfg},target=/run/secrets/{cfg},mode=0444 \\
    set -e; \\
    if [ -s /run/secrets/{ca} ]; then export SSL_CERT_FILE=/run/secrets/{ca}; fi; \\
    if [ -s /run/secrets/{cfg} ]; then export UV_CONFIG_FILE=/run/secrets/{cfg}; \\
    else export UV_NO_CONFIG=1; fi; \\
    export UV_CACHE_DIR=/cnbi-cache/uv UV_LINK_MODE=copy UV_PYTHON_DOWNLOADS=never; \\
    /cnbi-context/uv pip install --require-hashes --no-deps --break-system-packages \\
        --python "$CNBI_PYTHON" -r /cnbi/requirements.lock"""
# --no-deps: the lock is complete. --break-system-packages: the user chose to extend this
# image, and a base whose python is the distribution's (PEP 668 marked) is still a base.

_APT_INSTALL = """\
COPY cnbi/apt.txt /cnbi/apt.txt
RUN set -e; export DEBIAN_FRONTEND=noninteractive; \\
    apt-get update; \\
    xargs --no-run-if-empty --arg-file=/cnbi/apt.txt \\
        apt-get install -y --no-install-recommends; \\
    rm -rf /var/lib/apt/lists/*"""

# postBuild is the repository author's own script, and running it is the point of asking
# for this repository (as repo2docker does): it runs in the build container as the image's
# user, with no secrets mounted, so it can do no more than a Containerfile in the repo could.
_POSTBUILD = """\
RUN set -e; cd /cnbi/repo; chmod u+x postBuild; ./postBuild"""


def _owner_spec(obs: BuildObservations) -> str:
    # COPY --chown takes a name or a number; the number avoids depending on /etc/passwd
    if obs.base_uid is not None and not _NUMERIC_USER_RE.match(obs.base_user):
        return str(obs.base_uid)
    return obs.base_user


def plan_build(obj: dict, obs: BuildObservations) -> BuildPlan:
    """The build plan for ``obj`` (a PackageList or GitRepository CustomNBImage)."""
    _validate(obs)
    spec = obj.get("spec") or {}
    build_type = spec.get("buildType")
    labels = _labels(obj, obs)

    if build_type == "ImageImport":
        raise PlanError("ImageImport images are not built: the imported image is used as it is")
    if build_type not in ("PackageList", "GitRepository"):
        raise PlanError(f"unknown spec.buildType {build_type!r}")

    if build_type == "GitRepository":
        if not obs.git_commit:
            raise PlanError("GitRepository build needs the pinned git commit from Prepare")
        if obs.recipe == "containerfile":
            name = obs.repo_containerfile or "Containerfile"
            if name not in ("Containerfile", "Dockerfile"):
                raise PlanError(f"unexpected container recipe file {name!r}")
            return BuildPlan(
                containerfile=None,
                context_files={},
                target=obs.target,
                labels=labels,
                build_args={},
                containerfile_path=name,
                repo_dir="",
            )
        if obs.recipe not in ("requirements", "environment", None):
            raise PlanError(f"unknown repository recipe {obs.recipe!r}")
        if obs.recipe in ("requirements", "environment") and obs.lock_text is None:
            raise PlanError(
                f"the repository's {obs.recipe} recipe needs the resolved lock from Resolving"
            )
    elif obs.lock_text is None:
        raise PlanError("PackageList build needs the resolved lock from Resolving")

    as_user = obs.python_env_owned_by_user and obs.base_user not in _ROOT_USERS
    final_user = obs.base_user or "root"

    lines = [
        f"# cnbi_hub build plan {PLAN_VERSION}",
        f"FROM {obs.resolved_base_image}",
        "USER root",
    ]
    context_files: dict[str, bytes] = {}
    builder_files: dict[str, str] = {}
    build_args: dict[str, str] = {}
    secrets: tuple[str, ...] = ()
    repo_dir = None
    current_user = "root"

    def switch_user(user: str) -> None:
        nonlocal current_user
        if user != current_user:
            lines.append(f"USER {user}")
            current_user = user

    if obs.apt_packages:
        context_files[APT_CONTEXT_PATH] = ("\n".join(obs.apt_packages) + "\n").encode()
        lines.append(_APT_INSTALL)

    if obs.lock_text is not None:
        context_files[LOCK_CONTEXT_PATH] = obs.lock_text.encode()
        builder_files[UV_CONTEXT_PATH] = "uv"
        build_args["CNBI_PYTHON"] = obs.python_path
        secrets = (SECRET_CA, SECRET_UV_CONFIG)
        lines.append(f"COPY {LOCK_CONTEXT_PATH} /cnbi/requirements.lock")
        if as_user:
            switch_user(obs.base_user)
        lines.append(
            _UV_INSTALL.format(uid=_cache_uid(obs, as_user), ca=SECRET_CA, cfg=SECRET_UV_CONFIG)
        )

    if build_type == "GitRepository" and obs.has_postbuild:
        repo_dir = REPO_CONTEXT_DIR
        # the repository's .git is history the image does not need
        context_files[".containerignore"] = f"{REPO_CONTEXT_DIR}/.git\n".encode()
        owner = _owner_spec(obs) or "root"
        lines.append(f"COPY --chown={owner} {REPO_CONTEXT_DIR}/ /cnbi/repo/")
        switch_user(final_user)
        lines.append(_POSTBUILD)

    # always end on the base image's own user, stated explicitly
    lines.append(f"USER {final_user}")
    # labels last: they differ per owner and image, and must not invalidate cached layers
    lines.append(_label_instruction(labels))
    containerfile = "\n".join(lines) + "\n"

    return BuildPlan(
        containerfile=containerfile,
        context_files=context_files,
        target=obs.target,
        labels=labels,
        build_args=build_args,
        builder_files=builder_files,
        repo_dir=repo_dir,
        secrets=secrets,
    )


def images_named_by(containerfile: str, build_args: dict[str, str] | None = None) -> list[str]:
    """The images a Containerfile's FROM lines pull (ARG defaults and build args expanded;
    earlier stages and `scratch` left out), in order, each once.

    Cluster builds pull these before the build, in a step that holds the registry credentials,
    and build with `--pull=never` in a step that holds none.
    """
    import io

    from dockerfile_parse import DockerfileParser

    parser = DockerfileParser(fileobj=io.BytesIO(containerfile.encode()), build_args=dict(build_args or {}))
    stages = set()
    for instruction in parser.structure:
        if instruction["instruction"] == "FROM":
            words = instruction["value"].split()
            if len(words) >= 3 and words[-2].lower() == "as":
                stages.add(words[-1].lower())
    named = list(parser.parent_images)
    for instruction in parser.structure:
        # `COPY --from=<image>` (uv's own image, say) pulls an image too, unless it names a stage
        if instruction["instruction"] in ("COPY", "ADD"):
            for word in instruction["value"].split():
                if not word.startswith("--"):
                    break
                if word.startswith("--from="):
                    source = word[len("--from="):]
                    if source and not source.isdigit() and source.lower() not in stages:
                        named.append(source)
    images = []
    for image in named:
        if image and image.lower() != "scratch" and image.lower() not in stages and image not in images:
            images.append(image)
    return images

