"""STAND-IN for OpenShift's image import, for tests only: fills ImageStreams' `status.tags`.

On OpenShift, openshift-controller-manager imports each `spec.tags[]` entry of an ImageStream
whose `from` is a `DockerImage`: it looks the reference up in its registry, and records the
result in `status.tags[]` as `{tag, items: [{created, dockerImageReference, image, generation}]}`,
newest item first (older items stay as history); a failed import leaves a condition
`{type: ImportSuccess, status: "False", reason, message}` on that tag instead. Clients (the Open
Data Hub dashboard, cnbi's spawner hooks) treat a tag as usable only once it is in status.tags.

This does the same against the test cluster's ImageStream CRD (tests/openshift/imagestream-crd.yaml)
and a real registry, with cnbi's own registry client. It is not OpenShift: no image objects,
no scheduled re-imports, no internal registry.

    python -m tests.openshift_standin --kubeconfig FILE [--insecure-registry HOST:PORT ...]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from datetime import datetime, timezone

from kubernetes_asyncio import client, watch
from kubernetes_asyncio.client.exceptions import ApiException

from cnbi_hub.controller.registry import RegistryClient, RegistryError
from cnbi_hub.imageref import parse_image_reference
from cnbi_hub.imagestreams import GROUP, PLURAL, VERSION
from cnbi_hub.kubeclient import api_client

log = logging.getLogger("openshift-standin")
STAND_IN_REGISTRY = "image-registry.openshift-image-registry.svc:5000"  # what OpenShift reports


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


async def imported_status(stream: dict, registry: RegistryClient) -> dict:
    """The stream's status after importing each DockerImage tag (kept as is when unchanged)."""
    status = dict(stream.get("status") or {})
    metadata = stream["metadata"]
    status["dockerImageRepository"] = f"{STAND_IN_REGISTRY}/{metadata['namespace']}/{metadata['name']}"
    previous = {t.get("tag"): t for t in status.get("tags") or []}
    tags = []
    for tag in (stream.get("spec") or {}).get("tags") or []:
        source = tag.get("from") or {}
        old = previous.get(tag["name"], {"tag": tag["name"], "items": []})
        if source.get("kind") != "DockerImage" or not source.get("name"):
            continue
        try:
            reference = parse_image_reference(source["name"])
            digest = reference.digest or (await registry.resolve(reference)).digest
            pinned = str(reference.with_digest(digest))
        except (ValueError, RegistryError) as e:
            tags.append({"tag": tag["name"], "items": old.get("items") or [],
                         "conditions": [{"type": "ImportSuccess", "status": "False", "reason": "NotFound",
                                         "message": str(e), "lastTransitionTime": now(),
                                         "generation": metadata.get("generation", 1)}]})
            continue
        items = list(old.get("items") or [])
        if not items or items[0].get("image") != digest:
            items.insert(0, {"created": now(), "dockerImageReference": pinned, "image": digest,
                             "generation": metadata.get("generation", 1)})
        tags.append({"tag": tag["name"], "items": items})
    status["tags"] = tags
    return status


async def reconcile(objects: client.CustomObjectsApi, stream: dict, registry: RegistryClient) -> None:
    status = await imported_status(stream, registry)
    if status == stream.get("status"):
        return
    body = {**stream, "status": status}
    metadata = stream["metadata"]
    try:
        await objects.replace_namespaced_custom_object_status(GROUP, VERSION, metadata["namespace"], PLURAL,
                                                              metadata["name"], body)
        log.info("imported %s/%s: %s", metadata["namespace"], metadata["name"],
                 [t["tag"] for t in status["tags"] if t.get("items")])
    except ApiException as e:
        if e.status not in (404, 409):  # gone, or changed meanwhile: the watch brings it again
            raise


async def run(kubeconfig: str, insecure_registries: list[str], stop: asyncio.Event) -> None:
    api = await api_client(kubeconfig)
    objects = client.CustomObjectsApi(api)
    registry = RegistryClient(insecure_registries=insecure_registries)
    try:
        while not stop.is_set():
            try:
                listing = await objects.list_cluster_custom_object(GROUP, VERSION, PLURAL)
                for stream in listing.get("items", []):
                    await reconcile(objects, stream, registry)
                stream_watch = watch.Watch()
                async with stream_watch.stream(objects.list_cluster_custom_object, GROUP, VERSION, PLURAL,
                                               resource_version=listing["metadata"]["resourceVersion"],
                                               timeout_seconds=30) as events:
                    async for event in events:
                        if event["type"] in ("ADDED", "MODIFIED"):
                            await reconcile(objects, event["object"], registry)
            except Exception as e:  # relist and go on, as a controller does
                log.warning("stand-in import loop: %s", e)
                await asyncio.sleep(1)
    finally:
        await api.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--insecure-registry", action="append", default=[])
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    async def serve():
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        task = asyncio.create_task(run(args.kubeconfig, args.insecure_registry, stop))
        await stop.wait()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(serve())


if __name__ == "__main__":
    main()
