"""Ready images as OpenShift ImageStream tags, the way Open Data Hub lists notebook images.

Where the apiserver serves `image.openshift.io/v1` (OpenShift; Open Data Hub), the operator
publishes each Ready CustomNBImage as an ImageStream (`cnbi-<name>`, owned by the image) labelled
`opendatahub.io/notebook-image: "true"` and annotated as the Open Data Hub dashboard reads it. Each
generation is a tag (`v<generation>`); the newest is annotated recommended, older ones outdated.
OpenShift then imports the tag: only a tag listed in `status.tags` is usable, so readers look
there.

The spawner hooks list, beside CustomNBImages, the notebook ImageStreams cnbi did not publish
(images imported through the Open Data Hub dashboard); those are meant for every user.

Pure builders (`desired_imagestream`, `spawnable_tags`) are kept apart from the client
(`ImageStreams`), which only reads and writes.
"""

from __future__ import annotations

import copy
import json
import time

from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException
from traitlets import Float, Unicode
from traitlets.config import LoggingConfigurable

from . import model
from .kubeclient import api_client, api_message, serves

GROUP, VERSION, PLURAL = "image.openshift.io", "v1", "imagestreams"
API_VERSION = f"{GROUP}/{VERSION}"

LABEL_NOTEBOOK_IMAGE = "opendatahub.io/notebook-image"
ANNOTATION_URL = "opendatahub.io/notebook-image-url"
ANNOTATION_ORDER = "opendatahub.io/notebook-image-order"
ANNOTATION_SOFTWARE = "opendatahub.io/notebook-software"
ANNOTATION_DEPENDENCIES = "opendatahub.io/notebook-python-dependencies"
ANNOTATION_BUILD_COMMIT = "opendatahub.io/notebook-build-commit"
ANNOTATION_RECOMMENDED = "opendatahub.io/workbench-image-recommended"
ANNOTATION_OUTDATED = "opendatahub.io/image-tag-outdated"
LABEL_PUBLISHED_FROM = f"{model.PREFIX}/image"  # the CustomNBImage a stream was published from


def stream_name(obj: dict) -> str:
    return f"cnbi-{model.name_of(obj)}"[:253]


def tag_name(obj: dict) -> str:
    return f"v{obj['metadata'].get('generation', 1)}"


def software_of(obj: dict) -> list[dict]:
    """Open Data Hub's "software" list: the Python the image runs."""
    info = (obj.get("status") or {}).get("baseImageInfo") or {}
    version = info.get("pythonVersion") or ""
    return [{"name": "Python", "version": "v" + ".".join(version.split(".")[:2]), "visible": True}] if version else []


def dependencies_of(obj: dict) -> list[dict]:
    """Open Data Hub's "python dependencies": the packages the user asked for (visible) first."""
    packages = (obj.get("status") or {}).get("packages") or []
    listed = [{"name": p["name"], "version": p.get("version", ""), "visible": bool(p.get("visible", False))}
              for p in packages if p.get("name")]
    return sorted(listed, key=lambda p: (not p["visible"], p["name"].lower()))


def source_url(obj: dict) -> str:
    spec = obj.get("spec") or {}
    return spec.get("repository") or spec.get("fromImage") or spec.get("baseImage") or ""


def desired_imagestream(obj: dict, existing: dict | None, *, order: str = "100") -> dict:
    """The ImageStream publishing Ready image `obj`: `existing` (if any) with this generation's
    tag pointing at the built digest, recommended, and every other tag marked outdated."""
    status = obj.get("status") or {}
    if model.phase_of(obj) != model.PHASE_READY or not status.get("image"):
        raise ValueError(f"image {model.name_of(obj)} is not Ready: nothing to publish")
    stream = copy.deepcopy(existing) if existing else {"apiVersion": API_VERSION, "kind": "ImageStream"}
    metadata = stream.setdefault("metadata", {})
    metadata["name"] = stream_name(obj)
    metadata["namespace"] = obj["metadata"].get("namespace") or metadata.get("namespace")
    labels = metadata.setdefault("labels", {})
    labels.update({
        LABEL_NOTEBOOK_IMAGE: "true",
        LABEL_PUBLISHED_FROM: model.name_of(obj),
        model.LABEL_OWNER: model.owner_label_value(model.creator_of(obj)),
    })
    annotations = metadata.setdefault("annotations", {})
    annotations.update({
        model.ANNOTATION_DISPLAY_NAME: model.display_name_of(obj),
        model.ANNOTATION_DESCRIPTION: model.description_of(obj),
        model.ANNOTATION_CREATOR: model.creator_of(obj),
        ANNOTATION_URL: source_url(obj),
        ANNOTATION_ORDER: order,
    })
    if obj["metadata"].get("uid"):
        metadata["ownerReferences"] = [{
            "apiVersion": model.API_VERSION, "kind": model.KIND, "name": model.name_of(obj),
            "uid": obj["metadata"]["uid"], "blockOwnerDeletion": False,
        }]
    spec = stream.setdefault("spec", {})
    spec.setdefault("lookupPolicy", {"local": True})
    tags = [t for t in spec.get("tags") or [] if t.get("name") != tag_name(obj)]
    for older in tags:
        older.setdefault("annotations", {})
        older["annotations"].pop(ANNOTATION_RECOMMENDED, None)
        older["annotations"][ANNOTATION_OUTDATED] = "true"
    tag_annotations = {
        ANNOTATION_SOFTWARE: json.dumps(software_of(obj)),
        ANNOTATION_DEPENDENCIES: json.dumps(dependencies_of(obj)),
        ANNOTATION_RECOMMENDED: "true",
    }
    if status.get("gitCommit"):
        tag_annotations[ANNOTATION_BUILD_COMMIT] = status["gitCommit"]
    tags.append({
        "name": tag_name(obj),
        "annotations": tag_annotations,
        "from": {"kind": "DockerImage", "name": status["image"]},
        "referencePolicy": {"type": "Source"},
        "importPolicy": {},
    })
    spec["tags"] = sorted(tags, key=lambda t: _generation_of_tag(t.get("name", "")))
    return stream


def _generation_of_tag(name: str) -> int:
    return int(name[1:]) if name[:1] == "v" and name[1:].isdigit() else 0


def is_published_by_cnbi(stream: dict) -> bool:
    return LABEL_PUBLISHED_FROM in ((stream.get("metadata") or {}).get("labels") or {})


def spawnable_tags(stream: dict) -> list[dict]:
    """The tags of a notebook ImageStream a server can start on: those OpenShift imported
    (listed in `status.tags`, newest item first), not marked outdated, each as
    `{stream, tag, displayName, description, image, recommended, software, dependencies, order}`."""
    metadata = stream.get("metadata") or {}
    if ((metadata.get("labels") or {}).get(LABEL_NOTEBOOK_IMAGE)) != "true":
        return []
    annotations = metadata.get("annotations") or {}
    imported = {}
    for entry in (stream.get("status") or {}).get("tags") or []:
        items = entry.get("items") or []
        if items and items[0].get("dockerImageReference"):
            imported[entry.get("tag")] = items[0]["dockerImageReference"]
    found = []
    for tag in (stream.get("spec") or {}).get("tags") or []:
        tag_annotations = tag.get("annotations") or {}
        if tag.get("name") not in imported or tag_annotations.get(ANNOTATION_OUTDATED) == "true":
            continue
        found.append({
            "stream": metadata.get("name", ""),
            "namespace": metadata.get("namespace", ""),
            "tag": tag["name"],
            "displayName": annotations.get(model.ANNOTATION_DISPLAY_NAME) or metadata.get("name", ""),
            "description": annotations.get(model.ANNOTATION_DESCRIPTION, ""),
            "image": imported[tag["name"]],
            "recommended": tag_annotations.get(ANNOTATION_RECOMMENDED) == "true",
            "software": _json_list(tag_annotations.get(ANNOTATION_SOFTWARE)),
            "dependencies": _json_list(tag_annotations.get(ANNOTATION_DEPENDENCIES)),
            "order": annotations.get(ANNOTATION_ORDER, ""),
        })
    return found


def _json_list(text: str | None) -> list:
    try:
        value = json.loads(text or "[]")
    except ValueError:
        return []  # a hand-written annotation that is not JSON: show the tag without it
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


class ImageStreams(LoggingConfigurable):
    """Reads and writes notebook ImageStreams through the apiserver (when it serves them)."""

    kubeconfig = Unicode(help="kubeconfig file; default $KUBECONFIG, else in-cluster.").tag(config=True)

    order = Unicode("100", help=f"The `{ANNOTATION_ORDER}` of published streams (the dashboard sorts by it).").tag(
        config=True)

    discovery_seconds = Float(
        300.0, help="How long the answer to \"does this cluster serve image.openshift.io?\" is reused."
    ).tag(config=True)

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._api_client = None
        self._served: tuple[float, bool] | None = None

    async def _objects(self) -> client.CustomObjectsApi:
        if self._api_client is None:
            self._api_client = await api_client(self.kubeconfig)
        return client.CustomObjectsApi(self._api_client)

    async def close(self) -> None:
        if self._api_client is not None:
            await self._api_client.close()
            self._api_client = None

    async def available(self) -> bool:
        now = time.monotonic()
        if self._served is None or now - self._served[0] > self.discovery_seconds:
            objects = await self._objects()
            self._served = (now, await serves(objects.api_client, API_VERSION, PLURAL))
        return self._served[1]

    async def publish(self, obj: dict) -> dict | None:
        """Create or update the stream of Ready image `obj`; None where there is no image API."""
        if not await self.available():
            return None
        objects = await self._objects()
        namespace = obj["metadata"]["namespace"]
        for _ in range(5):  # a 409 means someone else wrote it in between: read it again
            try:
                existing = await objects.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL,
                                                                      stream_name(obj))
            except ApiException as e:
                if e.status != 404:
                    raise
                existing = None
            desired = desired_imagestream(obj, existing, order=self.order)
            if existing is not None and _same(existing, desired):
                return existing
            try:
                if existing is None:
                    return await objects.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, desired)
                return await objects.replace_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL,
                                                                      stream_name(obj), desired)
            except ApiException as e:
                if e.status != 409:
                    raise RuntimeError(f"could not publish ImageStream {stream_name(obj)}: {api_message(e)}") from None
        raise RuntimeError(f"could not publish ImageStream {stream_name(obj)}: it kept changing")

    async def unpublish(self, obj: dict) -> None:
        """Remove the image's stream (and so its tags), if there is one."""
        if not await self.available():
            return
        objects = await self._objects()
        try:
            await objects.delete_namespaced_custom_object(GROUP, VERSION, obj["metadata"]["namespace"], PLURAL,
                                                          stream_name(obj))
        except ApiException as e:
            if e.status != 404:
                raise

    async def notebook_tags(self, namespaces: list[str]) -> list[dict]:
        """Spawnable tags of the notebook streams in `namespaces` that cnbi did not publish
        (those are listed as CustomNBImages, with their owners' visibility)."""
        if not await self.available():
            return []
        objects = await self._objects()
        found = []
        for namespace in namespaces:
            listing = await objects.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL,
                                                                  label_selector=f"{LABEL_NOTEBOOK_IMAGE}=true")
            for stream in listing.get("items", []):
                if not is_published_by_cnbi(stream):
                    found.extend(spawnable_tags(stream))
        return sorted(found, key=lambda t: (_order_key(t["order"]), t["displayName"].lower(), t["tag"]))


def _order_key(order: str) -> tuple:
    return (0, int(order)) if order.isdigit() else (1, 0)


def _same(existing: dict, desired: dict) -> bool:
    return all(existing.get(k) == desired.get(k) for k in ("spec",)) and all(
        (existing.get("metadata") or {}).get(k) == desired["metadata"].get(k)
        for k in ("labels", "annotations", "ownerReferences"))
