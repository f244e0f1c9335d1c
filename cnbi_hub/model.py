"""The CustomNBImage object: names, phases, conditions and input validation.

Objects are plain dicts shaped like the Kubernetes custom resource (see docs/object.md), so the
same value travels through the REST API, the SQLite store and a kube-apiserver unchanged.

Validation runs the CRD's own openAPIV3Schema (package data) plus the rules the CRD states as
CEL `x-kubernetes-validations`, and the rules a schema cannot say (PEP 508, image reference
grammar, git URL schemes). Every failure is an `InvalidObject` naming the field at fault.
"""

from __future__ import annotations

import copy
import re
import secrets
import string
import unicodedata
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import lru_cache
from importlib import resources
from urllib.parse import urlsplit

import jsonschema
import yaml
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from . import stacks
from .imageref import parse_image_reference

GROUP = "meteor.zone"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "CustomNBImage"
PLURAL = "customnbimages"

# Open Data Hub reads these annotations on ImageStreams and CustomNBImages alike.
ANNOTATION_DISPLAY_NAME = "opendatahub.io/notebook-image-name"
ANNOTATION_DESCRIPTION = "opendatahub.io/notebook-image-desc"
ANNOTATION_CREATOR = "opendatahub.io/notebook-image-creator"
# Our own additions live under one prefix.
PREFIX = "cnbi-hub.io"
#: the user_options key in which the spawner hooks keep the build a server started on (by digest);
#: the hub lists it with the server, so retention can tell which images running servers use
USER_OPTION_STARTED = "cnbi_started"
ANNOTATION_SHARED = f"{PREFIX}/shared"
# JupyterHub groups the image is shared with: comma-separated, sorted
ANNOTATION_SHARED_WITH_GROUPS = f"{PREFIX}/shared-with-groups"
# on an image built on another (`cnbi:<name>`): that image's uid when the service checked the
# creator may use it; a new image that later takes the name is not built on
ANNOTATION_BASE_UID = f"{PREFIX}/base-uid"
LABEL_OWNER = f"{PREFIX}/owner"

PHASE_PENDING = "Pending"
PHASE_PREPARE = "Prepare"
PHASE_RESOLVING = "Resolving"
PHASE_BUILDING = "Building"
PHASE_READY = "Ready"
PHASE_FAILED = "Failed"
PHASES = (PHASE_PENDING, PHASE_PREPARE, PHASE_RESOLVING, PHASE_BUILDING, PHASE_READY, PHASE_FAILED)
TERMINAL_PHASES = frozenset({PHASE_READY, PHASE_FAILED})

BUILD_TYPES = ("ImageImport", "PackageList", "GitRepository")

# meteor-operator's condition types, reused where they fit, and ours.
CONDITION_IMAGE_IMPORT_READY = "ImageImportReady"
CONDITION_ERROR_RESOLVING = "ErrorResolvingDependencies"
CONDITION_BUILDING = "BuildingImage"
CONDITION_ERROR_BUILDING = "ErrorBuildingImage"
CONDITION_PIPELINERUN_CREATED = "PipelineRunCreated"
CONDITION_PIPELINERUN_COMPLETED = "PipelineRunCompleted"
CONDITION_PREPARED = "Prepared"
CONDITION_RESOLVED = "Resolved"
CONDITION_VALIDATED = "Validated"
# on a Ready image built on another CustomNBImage whose newest run failed: it keeps its build
CONDITION_BASE_CURRENT = "BaseImageCurrent"

MAX_NAME_LENGTH = 63
MAX_DISPLAY_NAME_LENGTH = 256
MAX_DESCRIPTION_LENGTH = 4096
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
# metadata the server owns: accepted (a round-tripped object carries them) and ignored
_SERVER_METADATA = {
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "managedFields",
    "selfLink",
    "deletionTimestamp",
    "finalizers",
}
_CLIENT_METADATA = {"name", "generateName", "namespace", "labels", "annotations"}
# git refs: a conservative subset of git-check-ref-format (no "..", no leading "-")
_GIT_REF = re.compile(r"^(?!-)(?!.*\.\.)(?!.*//)[A-Za-z0-9._/+-]{1,256}(?<![./])$")


class InvalidObject(ValueError):
    """Input that cannot become a CustomNBImage. `field` names the part at fault.

    The message is a plain sentence that never starts with the field's path (clients show it
    next to the field); `related_field` names a second part involved, e.g. the earlier entry of a
    duplicated package.
    """

    def __init__(self, message: str, field: str | None = None, related_field: str | None = None):
        super().__init__(message)
        self.message = message
        self.field = field
        self.related_field = related_field

    def to_json(self) -> dict:
        body = {"message": self.message}
        if self.field:
            body["field"] = self.field
        if self.related_field:
            body["relatedField"] = self.related_field
        return body


@dataclass(frozen=True)
class ValidationPolicy:
    """What an admin allows beyond the CRD's own rules (service traits fill this in)."""

    allowed_git_schemes: tuple[str, ...] = ("https",)
    allow_package_urls: bool = False
    max_packages: int = 200


@lru_cache(maxsize=1)
def load_crd() -> dict:
    text = resources.files("cnbi_hub.manifests").joinpath("crd.yaml").read_text()
    return yaml.safe_load(text)


def _strict(schema: dict) -> dict:
    """A copy of a structural schema that refuses unknown fields, as the apiserver does for a
    write with fieldValidation=Strict (a CRD's schema itself may not say additionalProperties)."""
    schema = copy.deepcopy(schema)
    if "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
        schema["additionalProperties"] = False
        schema["properties"] = {k: _strict(v) for k, v in schema["properties"].items()}
    if isinstance(schema.get("items"), dict):
        schema["items"] = _strict(schema["items"])
    return schema


@lru_cache(maxsize=1)
def _spec_validator() -> jsonschema.Draft7Validator:
    schema = load_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return jsonschema.Draft7Validator(_strict(schema["properties"]["spec"]))


def now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_iso(text: str) -> float:
    """Seconds since the epoch of a timestamp as now_iso() (or the apiserver) writes it."""
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _json_path(prefix: str, path) -> str:
    out = prefix
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def _check_spec_schema(spec) -> None:
    errors = sorted(_spec_validator().iter_errors(spec), key=lambda e: list(e.absolute_path))
    if not errors:
        return
    err = errors[0]
    where = _json_path("spec", err.absolute_path)
    if err.validator == "additionalProperties":
        extra = sorted(set(err.instance) - set(err.schema.get("properties", {})))
        name = extra[0] if extra else "?"
        raise InvalidObject(f"unknown field {where}.{name}", f"{where}.{name}")
    if err.validator == "required":
        missing = err.message.split("'")[1] if "'" in err.message else "?"
        raise InvalidObject(f"{where}.{missing} is required", f"{where}.{missing}")
    if err.validator == "enum":
        allowed = ", ".join(map(str, err.validator_value))
        raise InvalidObject(f"{where} must be one of: {allowed}", where)
    if err.validator == "maxItems":
        raise InvalidObject(f"{where} has more than {err.validator_value} entries", where)
    if err.validator == "maxLength":
        raise InvalidObject(f"{where} is longer than {err.validator_value} characters", where)
    raise InvalidObject(f"{where} is not valid: {err.message}", where)


def _check_cross_field_rules(spec: dict) -> None:
    """The CRD's x-kubernetes-validations, stated again for embedded mode."""
    build_type = spec["buildType"]
    if build_type == "ImageImport" and not spec.get("fromImage"):
        raise InvalidObject("name the image to import", "spec.fromImage")
    if build_type == "PackageList":
        if not spec.get("packageVersions"):
            raise InvalidObject("list at least one package to install", "spec.packageVersions")
        if ("baseImage" in spec) == ("runtimeEnvironment" in spec):
            raise InvalidObject(
                "buildType PackageList needs exactly one of spec.baseImage and spec.runtimeEnvironment",
                "spec.baseImage",
            )
    if build_type == "GitRepository" and not spec.get("repository"):
        raise InvalidObject("name the git repository to build", "spec.repository")
    if build_type != "GitRepository" and "gitCredential" in spec:
        raise InvalidObject("a git credential is used only by buildType GitRepository", "spec.gitCredential")


_VERSION_OPERATOR_AT_END = re.compile(r"(===|==|~=|!=|>=|<=|>|<)\s*$")


def explain_invalid_requirement(text: str, error: Exception) -> str:
    """packaging's parser error, in words a notebook user acts on (`numpy==` → a version is missing)."""
    missing_version = _VERSION_OPERATOR_AT_END.search(text)
    if missing_version:
        return f"a version is missing after {missing_version.group(1)}"
    if not re.match(r"^[A-Za-z0-9]", text):
        return f"{text!r} does not start with a package name"
    if re.match(r"^[A-Za-z0-9._-]+\s+[A-Za-z0-9._-]+$", text):
        return f"{text!r} looks like several packages: put one package on each line"
    detail = str(error).splitlines()[0].strip().rstrip(".")
    return f"{text!r} is not a package requirement such as 'pandas>=2' ({detail[:1].lower() + detail[1:]})"


def check_requirement(text: str, where: str, policy: ValidationPolicy) -> Requirement:
    """One PEP 508 requirement, nothing else: no pip options, paths or (by default) URLs.

    Messages name no position: the field does (the Lab panel turns it into a line number)."""
    if not isinstance(text, str):
        raise InvalidObject(f"a package must be text, not {type(text).__name__}", where)
    stripped = text.strip()
    if not stripped:
        raise InvalidObject("the entry is empty: name a package", where)
    if stripped.startswith("-"):
        raise InvalidObject(
            f"pip options such as {stripped.split()[0]!r} are not allowed: list one package per line", where
        )
    if stripped.startswith((".", "/", "~")) or "\\" in stripped:
        raise InvalidObject("local paths are not allowed: name a package from the index", where)
    try:
        req = Requirement(stripped)
    except InvalidRequirement as e:
        raise InvalidObject(explain_invalid_requirement(stripped, e), where)
    if req.url and not policy.allow_package_urls:
        raise InvalidObject("direct URLs are not allowed: name a package from the index", where)
    return req


_FIELD_WORDS = {"spec.baseImage": "the base image", "spec.fromImage": "the image to import"}


def check_image_reference(text, where: str) -> str:
    if not isinstance(text, str):
        raise InvalidObject(f"{_FIELD_WORDS.get(where, where)} must be text", where)
    try:
        return str(parse_image_reference(text.strip()))
    except ValueError as e:
        raise InvalidObject(f"{_FIELD_WORDS.get(where, where)}: {e}", where)


def check_git_repository(url: str, policy: ValidationPolicy) -> None:
    where = "spec.repository"
    if url != url.strip() or any(c.isspace() for c in url) or url.startswith("-"):
        raise InvalidObject("the repository URL must not contain spaces or start with '-'", where)
    if any(ord(c) < 0x20 or ord(c) == 0x7F or unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") for c in url):
        raise InvalidObject("the repository URL must not contain control characters", where)
    parts = urlsplit(url)
    if parts.scheme not in policy.allowed_git_schemes:
        allowed = ", ".join(f"{s}://" for s in policy.allowed_git_schemes)
        found = f"{parts.scheme}://" if parts.scheme else "no scheme"
        raise InvalidObject(f"the repository URL must start with {allowed} (it has {found})", where)
    if parts.scheme != "file" and not parts.hostname:
        raise InvalidObject("the repository URL must name a host, e.g. https://github.com/org/repo", where)
    if "@" in parts.netloc:
        # it would be stored, shown and logged as given: a token goes in spec.gitCredential
        raise InvalidObject("the repository URL must not carry a user name or token; store a credential "
                            "(api/credentials) and name it in spec.gitCredential", where)


def check_dns_label(name, where: str = "metadata.name") -> str:
    if not isinstance(name, str) or not _DNS_LABEL.match(name) or len(name) > MAX_NAME_LENGTH:
        raise InvalidObject(
            f"{where} must be a DNS-1123 label: lowercase letters, digits and '-', "
            f"starting and ending with a letter or digit, at most {MAX_NAME_LENGTH} characters",
            where,
        )
    return name


def slugify(text: str, max_length: int = 40) -> str:
    """A DNS-label-safe slug of a display name ("Mein Bild ü" → "mein-bild-u")."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")
    return slug[:max_length].strip("-")


def generate_name(display_name: str | None, taken=lambda name: False) -> str:
    """slug + short random suffix; `taken(name)` says whether a candidate already exists."""
    stem = slugify(display_name or "") or "image"
    alphabet = string.ascii_lowercase + string.digits
    for _ in range(20):
        candidate = f"{stem}-{''.join(secrets.choice(alphabet) for _ in range(5))}"
        if not taken(candidate):
            return candidate
    raise RuntimeError("could not generate a free name")  # 36**5 suffixes: practically unreachable


def _check_metadata(metadata) -> dict:
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise InvalidObject("metadata must be an object", "metadata")
    for key in metadata:
        if key not in _CLIENT_METADATA and key not in _SERVER_METADATA:
            raise InvalidObject(f"unknown field metadata.{key}", f"metadata.{key}")
    for key in ("labels", "annotations"):
        value = metadata.get(key) or {}
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):
            raise InvalidObject(f"metadata.{key} must map strings to strings", f"metadata.{key}")
    return metadata


def validate_new_object(body, *, creator: str, policy: ValidationPolicy = ValidationPolicy()) -> dict:
    """Check a client's CustomNBImage and return the clean object to store.

    The creator annotation and owner label are always the authenticated user: whatever the
    client sent there is overwritten, so nobody can create an image in someone else's name.
    `status` and server-owned metadata are dropped, as the kube-apiserver does on create.
    """
    if not isinstance(body, dict):
        raise InvalidObject("the request body must be a JSON object", None)
    for key in body:
        if key not in ("apiVersion", "kind", "metadata", "spec", "status"):
            raise InvalidObject(f"unknown field {key}", key)
    if body.get("apiVersion", API_VERSION) != API_VERSION:
        raise InvalidObject(f"apiVersion must be {API_VERSION}", "apiVersion")
    if body.get("kind", KIND) != KIND:
        raise InvalidObject(f"kind must be {KIND}", "kind")
    metadata = _check_metadata(body.get("metadata"))
    spec = body.get("spec")
    if not isinstance(spec, dict):
        raise InvalidObject("spec is required and must be an object", "spec")
    spec = copy.deepcopy(spec)
    _check_spec_schema(spec)
    _check_cross_field_rules(spec)

    for key in ("fromImage", "baseImage"):
        if key == "baseImage" and stacks.parent_of(spec):
            # another CustomNBImage: the service checks that it exists, is yours to use and
            # closes no cycle (that needs the store)
            named = stacks.parent_of(spec)
            if not _DNS_LABEL.match(named) or len(named) > MAX_NAME_LENGTH:
                raise InvalidObject(f"{stacks.PREFIX}{named} does not name an image: after {stacks.PREFIX} comes "
                                    "an image's name (lowercase letters, digits and '-')", "spec.baseImage")
        elif key in spec:
            spec[key] = check_image_reference(spec[key], f"spec.{key}")
    seen = {}
    packages = spec.get("packageVersions") or []
    if len(packages) > policy.max_packages:
        raise InvalidObject(
            f"at most {policy.max_packages} packages may be listed", "spec.packageVersions"
        )
    for i, text in enumerate(packages):
        where = f"spec.packageVersions[{i}]"
        req = check_requirement(text, where, policy)
        key = canonicalize_name(req.name)
        if key in seen:
            raise InvalidObject(f"{req.name} is already listed", where, f"spec.packageVersions[{seen[key]}]")
        seen[key] = i
        packages[i] = text.strip()
    if "repository" in spec:
        check_git_repository(spec["repository"], policy)
    if "gitCredential" in spec:
        check_dns_label(spec["gitCredential"], "spec.gitCredential")
    if "gitRef" in spec and not _GIT_REF.match(spec["gitRef"]):
        raise InvalidObject(
            "the git ref must be a branch, tag or commit name (letters, digits, '.', '_', '/', '+', '-'; "
            "not starting with '-', no '..')",
            "spec.gitRef",
        )
    if spec["buildType"] != "PackageList" and packages:
        raise InvalidObject(
            "packages are listed only for buildType PackageList (a repository lists its own)", "spec.packageVersions"
        )

    annotations = dict(metadata.get("annotations") or {})
    labels = dict(metadata.get("labels") or {})
    display_name = annotations.get(ANNOTATION_DISPLAY_NAME, "")
    description = annotations.get(ANNOTATION_DESCRIPTION, "")
    check_display_text(display_name, description)
    annotations[ANNOTATION_CREATOR] = creator
    annotations.pop(ANNOTATION_BASE_UID, None)  # the service sets it, after its own check
    # sharing is decided afterwards, by PATCH (everyone: admins; groups: admins and the owner)
    annotations.pop(ANNOTATION_SHARED, None)
    annotations.pop(ANNOTATION_SHARED_WITH_GROUPS, None)
    labels[LABEL_OWNER] = owner_label_value(creator)

    clean_meta = {"annotations": annotations, "labels": labels}
    if metadata.get("name") is not None:
        clean_meta["name"] = check_dns_label(metadata["name"])
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": clean_meta, "spec": spec}


def check_display_text(display_name, description) -> None:
    if not isinstance(display_name, str) or len(display_name) > MAX_DISPLAY_NAME_LENGTH:
        raise InvalidObject(
            f"the display name must be text of at most {MAX_DISPLAY_NAME_LENGTH} characters",
            f"metadata.annotations[{ANNOTATION_DISPLAY_NAME}]",
        )
    if not isinstance(description, str) or len(description) > MAX_DESCRIPTION_LENGTH:
        raise InvalidObject(
            f"the description must be text of at most {MAX_DESCRIPTION_LENGTH} characters",
            f"metadata.annotations[{ANNOTATION_DESCRIPTION}]",
        )


def owner_label_value(username: str) -> str:
    """Label values are limited to 63 chars of [A-Za-z0-9._-]; hub names are not."""
    value = re.sub(r"[^A-Za-z0-9._-]", "_", username)[:63].strip("._-")
    return value or "_"


# --- reading an object -------------------------------------------------------------------


def name_of(obj: dict) -> str:
    return obj["metadata"]["name"]


def creator_of(obj: dict) -> str:
    return obj["metadata"].get("annotations", {}).get(ANNOTATION_CREATOR, "")


def display_name_of(obj: dict) -> str:
    return obj["metadata"].get("annotations", {}).get(ANNOTATION_DISPLAY_NAME) or name_of(obj)


def description_of(obj: dict) -> str:
    return obj["metadata"].get("annotations", {}).get(ANNOTATION_DESCRIPTION, "")


def is_shared(obj: dict) -> bool:
    """Shared with everyone."""
    return obj["metadata"].get("annotations", {}).get(ANNOTATION_SHARED) == "true"


def shared_groups_of(obj: dict) -> list[str]:
    """The JupyterHub groups an image is shared with."""
    text = obj["metadata"].get("annotations", {}).get(ANNOTATION_SHARED_WITH_GROUPS, "")
    return [g for g in text.split(",") if g]


def with_shared_groups(annotations: dict, groups) -> dict:
    """`annotations` with the shared-with-groups annotation set to `groups` (removed when empty)."""
    out = dict(annotations)
    names = sorted(set(groups))
    if names:
        out[ANNOTATION_SHARED_WITH_GROUPS] = ",".join(names)
    else:
        out.pop(ANNOTATION_SHARED_WITH_GROUPS, None)
    return out


# JupyterHub accepts most group names; ours end up in an annotation joined by commas
_GROUP_NAME = re.compile(r"^[^,\s]{1,255}$")


def check_group_names(groups, where: str = "sharedWithGroups") -> list[str]:
    if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
        raise InvalidObject("sharedWithGroups must be a list of group names", where)
    for i, group in enumerate(groups):
        if not _GROUP_NAME.match(group):
            raise InvalidObject(f"{group!r} is not a group name (no spaces or commas)", f"{where}[{i}]")
    return sorted(set(groups))


def may_use(obj: dict, username: str, groups=()) -> bool:
    """Whether a (non-admin) user may see and start an image: their own, or shared with them."""
    return (
        creator_of(obj) == username
        or is_shared(obj)
        or bool(set(groups) & set(shared_groups_of(obj)))
    )


def phase_of(obj: dict) -> str:
    return (obj.get("status") or {}).get("phase", PHASE_PENDING)


# --- status ------------------------------------------------------------------------------


@dataclass
class Condition:
    type: str
    status: str
    reason: str
    message: str = ""
    lastTransitionTime: str = field(default_factory=now_iso)
    observedGeneration: int | None = None

    def to_json(self) -> dict:
        out = {
            "type": self.type,
            "status": self.status,
            "reason": self.reason,
            "message": self.message,
            "lastTransitionTime": self.lastTransitionTime,
        }
        if self.observedGeneration is not None:
            out["observedGeneration"] = self.observedGeneration
        return out


def set_condition(status: dict, condition: Condition) -> dict:
    """Return a copy of `status` with `condition` set, keeping lastTransitionTime when the
    condition's status did not change (the metav1 convention). The copy is shallow: it shares
    everything but the conditions list with `status` (a status holds package lists of many kB,
    copied once per condition this was a reconcile's largest cost)."""
    new = dict(status)
    conditions = new["conditions"] = list(status.get("conditions") or [])
    for i, old in enumerate(conditions):
        if old["type"] == condition.type:
            entry = condition.to_json()
            if old.get("status") == condition.status:
                entry["lastTransitionTime"] = old.get("lastTransitionTime", entry["lastTransitionTime"])
            conditions[i] = entry
            return new
    conditions.append(condition.to_json())
    return new


def initial_status() -> dict:
    return {"phase": PHASE_PENDING, "conditions": [], "phaseTimes": {PHASE_PENDING: now_iso()}}
