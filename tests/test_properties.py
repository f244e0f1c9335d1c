"""Properties of validation and the build planner, over generated input (hypothesis): whatever a
user sends, a refusal names the field at fault, and an accepted object yields a Containerfile in
which no user string appears except as a quoted label value (the packages go to the lock, a
context file). Deterministic (a fixed seed per run) and bounded, for CI."""

from __future__ import annotations

import re

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from cnbi_hub import model
from cnbi_hub.controller.buildplan import BuildObservations, plan_build

EXAMPLES = 1000
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
POLICY = model.ValidationPolicy(allowed_git_schemes=("https", "git"))
BASE = "registry.example.org/notebooks/base@sha256:" + "a" * 64

# characters that break things: quotes, shell and Containerfile syntax, controls, newlines, unicode
NASTY = st.sampled_from(['"', "'", "$", "`", "\\", "\n", "\r", "\t", "\x00", "#", ";", "&", "|", " ", "=", "@",
                         "{", "}", "(", ")", "-", "--", "${HOME}", "$(id)", "\u2028", "é", "\U0001f600"])
TEXT = st.lists(st.one_of(st.text(max_size=8), NASTY), max_size=8).map("".join)
NAME = st.from_regex(r"[A-Za-z][A-Za-z0-9._-]{0,15}", fullmatch=True)
VERSION = st.from_regex(r"[0-9]{1,3}(\.[0-9]{1,3}){0,2}", fullmatch=True)
REQUIREMENT = st.one_of(
    NAME,
    st.builds(lambda n, op, v: f"{n}{op}{v}", NAME, st.sampled_from(["==", ">=", "<", "~=", "!="]), VERSION),
    TEXT,  # mostly refused: it must name spec.packageVersions[i]
)
HOST = st.from_regex(r"[a-z][a-z0-9-]{0,10}(\.[a-z]{2,5}){1,2}", fullmatch=True)
REPOSITORY = st.one_of(
    st.builds(lambda h, p: f"https://{h}/{p}", HOST, TEXT),
    st.builds(lambda s, r: f"{s}{r}", st.sampled_from(["ext::", "file://", "--upload-pack=", "-c ", "ssh://",
                                                       "git://", "http://", ""]), TEXT),
)
GIT_REF = st.one_of(NAME, st.builds(lambda t: t, TEXT), st.sampled_from(["--upload-pack=touch /tmp/x", "-c", "main"]))


@st.composite
def bodies(draw) -> dict:
    build_type = draw(st.sampled_from(["PackageList", "GitRepository"]))
    spec: dict = {"buildType": build_type, "baseImage": "registry.example.org/notebooks/base:1"}
    if build_type == "PackageList":
        spec["packageVersions"] = draw(st.lists(REQUIREMENT, min_size=1, max_size=6))
    else:
        spec["repository"] = draw(REPOSITORY)
        if draw(st.booleans()):
            spec["gitRef"] = draw(GIT_REF)
    annotations = {model.ANNOTATION_DISPLAY_NAME: draw(TEXT), model.ANNOTATION_DESCRIPTION: draw(TEXT)}
    return {"metadata": {"annotations": annotations}, "spec": spec}


def user_strings(body: dict) -> list[str]:
    spec, annotations = body["spec"], body["metadata"]["annotations"]
    strings = [*spec.get("packageVersions", []), spec.get("gitRef", ""), spec.get("repository", ""),
               annotations[model.ANNOTATION_DISPLAY_NAME], annotations[model.ANNOTATION_DESCRIPTION]]
    return [s for s in strings if len(s.strip()) >= 6]  # short strings are in any text by chance


def unquote_label_values(instruction: str) -> list[str]:
    """The values of a LABEL instruction as the Containerfile parser reads them back."""
    values = []
    for match in re.finditer(r'"((?:[^"\\]|\\.)*)"="((?:[^"\\]|\\.)*)"', instruction):
        values.append(re.sub(r"\\(.)", r"\1", match.group(2)))
    return values


@SETTINGS
@given(bodies())
def test_a_refusal_names_a_field_and_an_accepted_object_plans_without_user_text_in_the_containerfile(body):
    try:
        obj = model.validate_new_object(body, creator="alice", policy=POLICY)
    except model.InvalidObject as e:
        event(f"refused: {e.field.split('[')[0] if e.field else None}")
        assert e.field and re.match(r"^(spec|metadata)\.", e.field), (e.field, e.message)
        assert e.message and not e.message.startswith(e.field)
        return
    event(f"accepted: {body['spec']['buildType']}")
    obj["metadata"]["name"] = "generated-image"
    git = obj["spec"]["buildType"] == "GitRepository"
    observations = BuildObservations(
        resolved_base_image=BASE, base_user="1000", python_path="/opt/conda/bin/python",
        python_env_owned_by_user=True, spec_hash="sha256:" + "b" * 64,
        target="registry.example.org/cnbi/generated-image:bbbbbbbbbbbb",
        lock_text="".join(f"pkg{i}==1.0 --hash=sha256:{'c' * 64}\n" for i in range(3)),
        git_commit="d" * 40 if git else None, recipe="requirements" if git else None)
    plan = plan_build(obj, observations)
    containerfile = plan.containerfile
    body_text, _, label = containerfile.rpartition("\nLABEL ")
    # every instruction is ours: no user string outside the one LABEL instruction...
    for text in user_strings(body):
        assert text not in body_text, (text, containerfile)
    # ...which is one instruction (continued lines only) whose values read back exactly
    lines = label.rstrip("\n").split("\n")
    assert all(line.endswith(" \\") for line in lines[:-1]), label
    assert unquote_label_values(label) == list(plan.labels.values())
    if git:
        assert obj["spec"]["repository"] in plan.labels.values()
    # the packages reach the build as a context file only
    for requirement in obj["spec"].get("packageVersions", []):
        assert len(requirement) < 6 or requirement not in containerfile
    assert set(plan.context_files) <= {"cnbi/requirements.lock", "cnbi/apt.txt", ".containerignore"}
