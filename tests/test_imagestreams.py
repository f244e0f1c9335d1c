"""Publishing Ready images as Open Data Hub ImageStreams, and reading dashboard-imported ones
(the pure builders; tests/test_cluster.py does it against a real apiserver)."""

from __future__ import annotations

import json

import pytest

from cnbi_hub import imagestreams as ist
from cnbi_hub import model
from cnbi_hub.spawner import images_choice_profile, imagestream_tag_profile

DIGEST1 = "sha256:" + "1" * 64
DIGEST2 = "sha256:" + "2" * 64


def ready_image(generation=1, digest=DIGEST1, **spec):
    return {
        "apiVersion": model.API_VERSION, "kind": model.KIND,
        "metadata": {"name": "pandas-x1", "namespace": "cnbi", "uid": "u-1", "generation": generation,
                     "annotations": {model.ANNOTATION_DISPLAY_NAME: "Pandas <lab>",
                                     model.ANNOTATION_DESCRIPTION: "Data frames",
                                     model.ANNOTATION_CREATOR: "alice"}},
        "spec": {"buildType": "PackageList", "baseImage": "quay.io/jupyter/minimal-notebook:2024-10-07",
                 "packageVersions": ["pandas==2.2.3"], **spec},
        "status": {"phase": "Ready", "image": f"registry.example.org/built/pandas-x1@{digest}",
                   "baseImageInfo": {"pythonVersion": "3.11.10"},
                   "packages": [{"name": "numpy", "version": "2.1.0", "visible": False},
                                {"name": "pandas", "version": "2.2.3", "visible": True}]},
    }


def test_a_ready_image_becomes_a_notebook_imagestream_with_one_recommended_tag():
    stream = ist.desired_imagestream(ready_image(), None)
    metadata = stream["metadata"]
    assert (stream["apiVersion"], stream["kind"], metadata["name"]) == ("image.openshift.io/v1", "ImageStream",
                                                                        "cnbi-pandas-x1")
    assert metadata["labels"][ist.LABEL_NOTEBOOK_IMAGE] == "true"
    assert metadata["labels"][ist.LABEL_PUBLISHED_FROM] == "pandas-x1"
    assert metadata["annotations"][model.ANNOTATION_DISPLAY_NAME] == "Pandas <lab>"
    assert metadata["annotations"][model.ANNOTATION_CREATOR] == "alice"
    assert metadata["annotations"][ist.ANNOTATION_URL] == "quay.io/jupyter/minimal-notebook:2024-10-07"
    assert metadata["ownerReferences"][0]["uid"] == "u-1"
    [tag] = stream["spec"]["tags"]
    assert tag["name"] == "v1" and tag["from"] == {"kind": "DockerImage",
                                                   "name": f"registry.example.org/built/pandas-x1@{DIGEST1}"}
    annotations = tag["annotations"]
    assert annotations[ist.ANNOTATION_RECOMMENDED] == "true" and ist.ANNOTATION_OUTDATED not in annotations
    assert json.loads(annotations[ist.ANNOTATION_SOFTWARE]) == [{"name": "Python", "version": "v3.11", "visible": True}]
    # what the user asked for first, then what came with it
    assert json.loads(annotations[ist.ANNOTATION_DEPENDENCIES]) == [
        {"name": "pandas", "version": "2.2.3", "visible": True}, {"name": "numpy", "version": "2.1.0", "visible": False}]
    assert ist.ANNOTATION_BUILD_COMMIT not in annotations


def test_a_new_generation_is_recommended_and_older_tags_are_marked_outdated():
    first = ist.desired_imagestream(ready_image(), None)
    first["metadata"]["resourceVersion"] = "7"
    second = ist.desired_imagestream(ready_image(generation=2, digest=DIGEST2), first)
    assert second["metadata"]["resourceVersion"] == "7"  # a replace of what was read
    v1, v2 = second["spec"]["tags"]
    assert (v1["name"], v2["name"]) == ("v1", "v2")
    assert v1["annotations"][ist.ANNOTATION_OUTDATED] == "true" and ist.ANNOTATION_RECOMMENDED not in v1["annotations"]
    assert v2["annotations"][ist.ANNOTATION_RECOMMENDED] == "true"
    assert v2["from"]["name"].endswith(DIGEST2)
    # publishing the same again changes nothing
    assert ist.desired_imagestream(ready_image(generation=2, digest=DIGEST2), second) == second


def test_git_builds_carry_their_commit_and_only_ready_images_are_published():
    obj = ready_image(buildType="GitRepository", repository="https://example.org/r.git")
    obj["spec"].pop("packageVersions")
    obj["status"]["gitCommit"] = "a" * 40
    tag = ist.desired_imagestream(obj, None)["spec"]["tags"][0]
    assert tag["annotations"][ist.ANNOTATION_BUILD_COMMIT] == "a" * 40
    failed = ready_image()
    failed["status"]["phase"] = "Failed"
    with pytest.raises(ValueError, match="not Ready"):
        ist.desired_imagestream(failed, None)


def dashboard_stream(tags, imported, outdated=()):
    """An ImageStream as the Open Data Hub dashboard creates it, after OpenShift imported `imported`."""
    return {
        "metadata": {"name": "custom-torch", "namespace": "opendatahub",
                     "labels": {ist.LABEL_NOTEBOOK_IMAGE: "true"},
                     "annotations": {model.ANNOTATION_DISPLAY_NAME: "Torch", ist.ANNOTATION_ORDER: "3"}},
        "spec": {"tags": [{"name": t, "from": {"kind": "DockerImage", "name": f"quay.io/x/torch:{t}"},
                           "annotations": {ist.ANNOTATION_OUTDATED: "true"} if t in outdated else {
                               ist.ANNOTATION_SOFTWARE: '[{"name": "CUDA", "version": "12.4"}]',
                               ist.ANNOTATION_DEPENDENCIES: "not json"}} for t in tags]},
        "status": {"tags": [{"tag": t, "items": [{"dockerImageReference": f"quay.io/x/torch@{DIGEST1}",
                                                 "image": DIGEST1}]} for t in imported]},
    }


def test_only_imported_tags_that_are_not_outdated_can_be_started():
    stream = dashboard_stream(["2024.1", "2024.2", "2025.1"], imported=["2024.1", "2024.2"], outdated=["2024.1"])
    [tag] = ist.spawnable_tags(stream)
    assert tag["tag"] == "2024.2" and tag["image"] == f"quay.io/x/torch@{DIGEST1}"
    assert tag["displayName"] == "Torch" and tag["order"] == "3"
    assert tag["software"] == [{"name": "CUDA", "version": "12.4"}] and tag["dependencies"] == []
    unlabelled = dashboard_stream(["1"], imported=["1"])
    unlabelled["metadata"]["labels"] = {}
    assert ist.spawnable_tags(unlabelled) == []
    assert not ist.is_published_by_cnbi(stream)
    assert ist.is_published_by_cnbi(ist.desired_imagestream(ready_image(), None))


def test_imagestream_tags_become_escaped_kubespawner_choices():
    [tag] = ist.spawnable_tags(dashboard_stream(["2024.2"], imported=["2024.2"]))
    tag["displayName"] = "Torch <b>GPU</b>"
    profile = imagestream_tag_profile(tag, slug_prefix="cnbi-", extra_override={"environment": {"A": "1"}})
    assert profile["slug"] == "cnbi-imagestream-custom-torch-2024.2"
    assert profile["display_name"] == "Torch &lt;b&gt;GPU&lt;/b&gt; (2024.2)"
    assert "CUDA 12.4" in profile["description"]
    override = profile["kubespawner_override"]
    assert override["image"] == f"quay.io/x/torch@{DIGEST1}"
    assert override["environment"] == {"A": "1", "JUPYTER_IMAGE": f"quay.io/x/torch@{DIGEST1}"}
    choice = images_choice_profile([], slug="cnbi-images", display_name="Images", description="", stream_tags=[tag])
    [(key, entry)] = choice["profile_options"]["image"]["choices"].items()
    assert key == "imagestream-custom-torch-2024.2" and entry["kubespawner_override"]["image"] == override["image"]
