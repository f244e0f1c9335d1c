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
ANNOTATION_SHARED = f"{PREFIX}/shared"
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
    """Input that cannot become a CustomNBImage. `field` names the part at fault."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.message = message
        self.field = field

    def to_json(self) -> dict:
        body = {"message": self.message}
        if self.field:
            body["field"] = self.field
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


@lru_cache(maxsize=1)
def _spec_validator() -> jsonschema.Draft7Validator:
    schema = load_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return jsonschema.Draft7Validator(schema["properties"]["spec"])


def now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


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
    raise InvalidObject(f"{where}: {err.message}", where)


def _check_cross_field_rules(spec: dict) -> None:
    """The CRD's x-kubernetes-validations, stated again for embedded mode."""
    build_type = spec["buildType"]
    if build_type == "ImageImport" and not spec.get("fromImage"):
        raise InvalidObject("spec.fromImage is required for buildType ImageImport", "spec.fromImage")
    if build_type == "PackageList":
        if not spec.get("packageVersions"):
            raise InvalidObject(
                "spec.packageVersions must list at least one package for buildType PackageList",
                "spec.packageVersions",
            )
        if ("baseImage" in spec) == ("runtimeEnvironment" in spec):
            raise InvalidObject(
                "buildType PackageList needs exactly one of spec.baseImage and spec.runtimeEnvironment",
                "spec.baseImage",
            )
    if build_type == "GitRepository" and not spec.get("repository"):
        raise InvalidObject("spec.repository is required for buildType GitRepository", "spec.repository")


def check_requirement(text: str, where: str, policy: ValidationPolicy) -> Requirement:
    """One PEP 508 requirement, nothing else: no pip options, paths or (by default) URLs."""
    stripped = text.strip()
    if not stripped:
        raise InvalidObject(f"{where} is empty", where)
    if stripped.startswith("-"):
        raise InvalidObject(
            f"{where}: pip options such as {stripped.split()[0]!r} are not allowed; list one package per entry",
            where,
        )
    if stripped.startswith((".", "/", "~")) or "\\" in stripped:
        raise InvalidObject(f"{where}: local paths are not allowed, name a package", where)
    try:
        req = Requirement(stripped)
    except InvalidRequirement as e:
        first_line = str(e).splitlines()[0]
        raise InvalidObject(f"{where}: {stripped!r} is not a PEP 508 requirement ({first_line})", where)
    if req.url and not policy.allow_package_urls:
        raise InvalidObject(f"{where}: direct URLs are not allowed, name a package from the index", where)
    return req


def check_image_reference(text, where: str) -> str:
    if not isinstance(text, str):
        raise InvalidObject(f"{where} must be a string", where)
    try:
        return str(parse_image_reference(text.strip()))
    except ValueError as e:
        raise InvalidObject(f"{where}: {e}", where)


def check_git_repository(url: str, policy: ValidationPolicy) -> None:
    where = "spec.repository"
    if url != url.strip() or any(c.isspace() for c in url) or url.startswith("-"):
        raise InvalidObject(f"{where} must be a URL without spaces", where)
    parts = urlsplit(url)
    if parts.scheme not in policy.allowed_git_schemes:
        allowed = ", ".join(policy.allowed_git_schemes)
        raise InvalidObject(
            f"{where}: scheme {parts.scheme or '(none)'!r} is not allowed (allowed: {allowed})", where
        )
    if parts.scheme != "file" and not parts.hostname:
        raise InvalidObject(f"{where} must name a host", where)


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
        if key in spec:
            spec[key] = check_image_reference(spec[key], f"spec.{key}")
    seen = {}
    packages = spec.get("packageVersions") or []
    if len(packages) > policy.max_packages:
        raise InvalidObject(
            f"spec.packageVersions has more than {policy.max_packages} entries", "spec.packageVersions"
        )
    for i, text in enumerate(packages):
        where = f"spec.packageVersions[{i}]"
        req = check_requirement(text, where, policy)
        key = canonicalize_name(req.name)
        if key in seen:
            raise InvalidObject(f"{where}: {req.name} is already listed at entry {seen[key]}", where)
        seen[key] = i
        packages[i] = text.strip()
    if "repository" in spec:
        check_git_repository(spec["repository"], policy)
    if "gitRef" in spec and not _GIT_REF.match(spec["gitRef"]):
        raise InvalidObject("spec.gitRef is not a valid branch, tag or commit name", "spec.gitRef")
    if spec["buildType"] != "PackageList" and packages:
        raise InvalidObject(
            "spec.packageVersions is only used with buildType PackageList", "spec.packageVersions"
        )

    annotations = dict(metadata.get("annotations") or {})
    labels = dict(metadata.get("labels") or {})
    display_name = annotations.get(ANNOTATION_DISPLAY_NAME, "")
    description = annotations.get(ANNOTATION_DESCRIPTION, "")
    check_display_text(display_name, description)
    annotations[ANNOTATION_CREATOR] = creator
    annotations.pop(ANNOTATION_SHARED, None)  # sharing is an admin decision, made by PATCH
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
    return obj["metadata"].get("annotations", {}).get(ANNOTATION_SHARED) == "true"


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
    condition's status did not change (the metav1 convention)."""
    new = copy.deepcopy(status)
    conditions = new.setdefault("conditions", [])
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
