"""plan_build: the Containerfile both builders run, checked as text and with buildah's parser."""

import json
import os
import shutil
import subprocess

import pytest

from cnbi_hub.controller.buildplan import (
    BuildObservations,
    PlanError,
    parse_apt_txt,
    plan_build,
    quote_containerfile_string,
    spec_hash,
    uv_config_toml,
)

BASE = "localhost:5000/cnbi/base@sha256:" + "ab" * 32
COMMIT = "0123456789abcdef0123456789abcdef01234567"
LOCK = "six==1.17.0 \\\n    --hash=sha256:" + "cd" * 32 + "\n"

HOSTILE = [
    "numpy; rm -rf /",
    "$(touch /tmp/pwned)",
    "`id`",
    'x" && curl evil #',
    "a\nRUN rm -rf /",
    "${HOME}",
]


def image(
    build_type="PackageList", *, packages=None, name="my-image", creator="alice", display="My image"
):
    return {
        "apiVersion": "meteor.zone/v1alpha1",
        "kind": "CustomNBImage",
        "metadata": {
            "name": name,
            "annotations": {
                "opendatahub.io/notebook-image-name": display,
                "opendatahub.io/notebook-image-creator": creator,
            },
        },
        "spec": {
            "buildType": build_type,
            "baseImage": "localhost:5000/cnbi/base:1",
            "packageVersions": packages if packages is not None else ["six"],
            "repository": "https://github.com/org/repo",
            "gitRef": "main",
        },
    }


def observations(**overrides):
    values = dict(
        resolved_base_image=BASE,
        base_user="jovyan",
        base_uid=1000,
        python_path="/opt/conda/bin/python",
        python_env_owned_by_user=True,
        spec_hash="sha256:" + "ef" * 32,
        target="localhost:5000/cnbi/alice/my-image:abc",
        lock_text=LOCK,
    )
    values.update(overrides)
    return BuildObservations(**values)


def instructions(containerfile):
    """Logical instructions: continuation lines joined, comments dropped."""
    result, current = [], ""
    for line in containerfile.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        result.append(current + line)
        current = ""
    assert current == "", "dangling continuation"
    return result


def keyword(instruction):
    return instruction.split(None, 1)[0]


def test_user_owned_env_installs_as_the_user():
    plan = plan_build(image(), observations())
    steps = instructions(plan.containerfile)
    assert steps[0] == f"FROM {BASE}"
    assert [keyword(s) for s in steps] == [
        "FROM",
        "USER",
        "COPY",
        "USER",
        "ARG",
        "RUN",
        "USER",
        "LABEL",
    ]
    assert steps[1] == "USER root"
    assert steps[2] == "COPY cnbi/requirements.lock /cnbi/requirements.lock"
    assert steps[3] == "USER jovyan"
    run = steps[5]
    assert "--mount=type=cache,target=/cnbi-cache/uv,uid=1000" in run
    assert "--mount=type=secret,id=cnbi-ca" in run
    assert "--require-hashes --no-deps" in run
    assert '--python "$CNBI_PYTHON" -r /cnbi/requirements.lock' in run
    # the python path reaches the RUN line only as a build argument
    assert "/opt/conda/bin/python" not in run
    assert plan.build_args == {"CNBI_PYTHON": "/opt/conda/bin/python"}
    assert steps[-2] == "USER jovyan"
    assert plan.context_files == {"cnbi/requirements.lock": LOCK.encode()}
    assert plan.builder_files == {"cnbi/uv": "uv"}
    assert plan.secrets == ("cnbi-ca", "cnbi-uv-config")
    assert plan.target == "localhost:5000/cnbi/alice/my-image:abc"
    assert plan.containerfile_path == "Containerfile"


def test_root_owned_env_installs_as_root_and_ends_as_user():
    plan = plan_build(
        image(), observations(python_env_owned_by_user=False, base_user="1000:100", base_uid=None)
    )
    steps = instructions(plan.containerfile)
    assert [keyword(s) for s in steps] == ["FROM", "USER", "COPY", "ARG", "RUN", "USER", "LABEL"]
    assert "uid=0" in steps[4]
    assert steps[-2] == "USER 1000:100"


def test_numeric_user_needs_no_observed_uid_but_a_name_does():
    plan = plan_build(image(), observations(base_user="1001", base_uid=None))
    assert "uid=1001" in plan.containerfile
    with pytest.raises(PlanError, match="base_uid"):
        plan_build(image(), observations(base_user="jovyan", base_uid=None))


def test_labels_and_their_escaping():
    obj = image(creator='eve "$HOME" \\ `x`', name="my-image")
    plan = plan_build(obj, observations())
    assert plan.labels["io.cnbi-hub.image"] == "my-image"
    assert plan.labels["io.cnbi-hub.owner"] == 'eve "$HOME" \\ `x`'
    assert plan.labels["io.cnbi-hub.spec-hash"] == "sha256:" + "ef" * 32
    assert "io.cnbi-hub.git-commit" not in plan.labels
    label = instructions(plan.containerfile)[-1]
    assert '"io.cnbi-hub.owner"="eve \\"\\$HOME\\" \\\\ `x`"' in label


def test_quote_containerfile_string():
    assert quote_containerfile_string('a"b') == '"a\\"b"'
    assert quote_containerfile_string("$X") == '"\\$X"'
    assert quote_containerfile_string("a\\b") == '"a\\\\b"'
    with pytest.raises(PlanError):
        quote_containerfile_string("a\nb")


def test_hostile_strings_never_reach_a_run_line():
    for bad in HOSTILE:
        obj = image(packages=[bad, "six"], creator=bad, display=bad, name="x")
        obj["metadata"]["annotations"]["opendatahub.io/notebook-image-desc"] = bad
        obj["metadata"].setdefault("labels", {})["cnbi-hub.io/owner"] = bad
        obj["spec"]["repository"] = bad
        for build_type in ("PackageList", "GitRepository"):
            obj["spec"]["buildType"] = build_type
            extra = dict(
                git_commit=COMMIT, recipe="requirements", has_postbuild=True, apt_packages=("curl",)
            )
            plan = plan_build(obj, observations(**(extra if build_type == "GitRepository" else {})))
            steps = instructions(plan.containerfile)
            for step in steps:
                if keyword(step) != "LABEL":
                    for fragment in (
                        bad,
                        bad.split("\n")[-1],
                        "pwned",
                        "numpy",
                        "rm -rf /\n",
                        "curl evil",
                        "`id`",
                        "HOME}",
                    ):
                        assert fragment not in step, (bad, step)
            # the newline was turned into a space: no injected instruction line
            assert not any(line.startswith("RUN rm") for line in plan.containerfile.splitlines())
            assert {keyword(s) for s in steps} <= {"FROM", "USER", "COPY", "ARG", "RUN", "LABEL"}


def test_hostile_observations_are_refused():
    for bad in [
        dict(base_user="jovyan\nRUN id"),
        dict(base_user="x y"),
        dict(python_path="/usr/bin/python; id"),
        dict(python_path="python"),
        dict(python_path="/opt/../../bin/sh"),
        dict(resolved_base_image="localhost/base:latest"),
        dict(resolved_base_image=BASE + "\nRUN id"),
        dict(apt_packages=("curl", "-o APT::Update::Pre-Invoke::=id")),
        dict(target="x y"),
    ]:
        with pytest.raises(PlanError):
            plan_build(image(), observations(**bad))


def test_git_repository_with_requirements_apt_and_postbuild():
    obj = image("GitRepository")
    plan = plan_build(
        obj,
        observations(
            git_commit=COMMIT,
            recipe="requirements",
            apt_packages=("curl", "libpq5"),
            has_postbuild=True,
        ),
    )
    steps = instructions(plan.containerfile)
    kinds = [keyword(s) for s in steps]
    assert kinds == [
        "FROM",
        "USER",
        "COPY",
        "RUN",
        "COPY",
        "USER",
        "ARG",
        "RUN",
        "COPY",
        "RUN",
        "USER",
        "LABEL",
    ]
    apt_run = steps[3]
    assert "--arg-file=/cnbi/apt.txt" in apt_run and "apt-get install -y" in apt_run
    assert steps[1] == "USER root"  # apt runs as root
    assert plan.context_files["cnbi/apt.txt"] == b"curl\nlibpq5\n"
    assert steps[8] == "COPY --chown=1000 repo/ /cnbi/repo/"
    # postBuild runs as the image's user
    assert steps[5] == "USER jovyan" and "./postBuild" in steps[9]
    assert plan.repo_dir == "repo"
    assert plan.context_files[".containerignore"] == b"repo/.git\n"
    assert plan.labels["io.cnbi-hub.git-commit"] == COMMIT
    assert plan.labels["org.opencontainers.image.revision"] == COMMIT
    assert plan.labels["org.opencontainers.image.source"] == "https://github.com/org/repo"


def test_git_repository_with_own_containerfile():
    plan = plan_build(
        image("GitRepository"),
        observations(
            git_commit=COMMIT,
            recipe="containerfile",
            repo_containerfile="Dockerfile",
            lock_text=None,
        ),
    )
    assert plan.containerfile is None
    assert plan.containerfile_path == "Dockerfile"
    assert plan.repo_dir == ""
    assert plan.context_files == {}
    assert plan.labels["io.cnbi-hub.git-commit"] == COMMIT
    assert plan.labels["io.cnbi-hub.owner"] == "alice"


def test_git_repository_with_only_apt():
    plan = plan_build(
        image("GitRepository"),
        observations(git_commit=COMMIT, recipe=None, lock_text=None, apt_packages=("git",)),
    )
    assert "uv pip install" not in plan.containerfile
    assert plan.builder_files == {} and plan.secrets == ()
    assert "--arg-file=/cnbi/apt.txt" in plan.containerfile


def test_missing_inputs_are_plan_errors():
    with pytest.raises(PlanError, match="lock"):
        plan_build(image(), observations(lock_text=None))
    with pytest.raises(PlanError, match="commit"):
        plan_build(image("GitRepository"), observations(recipe="requirements"))
    with pytest.raises(PlanError, match="lock"):
        plan_build(
            image("GitRepository"),
            observations(git_commit=COMMIT, recipe="requirements", lock_text=None),
        )
    with pytest.raises(PlanError, match="not built"):
        plan_build(image("ImageImport"), observations())


def test_parse_apt_txt():
    assert parse_apt_txt("# tools\ncurl\n\nlibpq5  # postgres\ng++\n") == ("curl", "libpq5", "g++")
    for bad in ["curl wget", "-oDpkg::x=y", "Curl", "$(id)", "a"]:
        with pytest.raises(ValueError, match="line 1"):
            parse_apt_txt(bad + "\n")


def test_spec_hash_is_the_effective_input():
    lock_sha = "11" * 32
    base = spec_hash(image(packages=["pandas"]), BASE, lock_sha)
    assert base.startswith("sha256:")
    # how packages were asked for, who asked, and the name do not matter
    assert (
        spec_hash(image(packages=["pandas>=2"], creator="bob", name="other"), BASE, lock_sha)
        == base
    )
    # the base digest and the lock do
    assert spec_hash(image(), BASE.replace("ab", "ac"), lock_sha) != base
    assert spec_hash(image(), BASE, "22" * 32) != base
    git = image("GitRepository")
    one = spec_hash(git, BASE, None, COMMIT)
    assert spec_hash(git, BASE, None, COMMIT.replace("0", "f")) != one
    git["status"] = {"gitCommit": COMMIT}
    assert spec_hash(git, BASE, None) == one


def test_uv_config_toml_is_read_by_real_uv(tmp_path):
    import tomllib

    text = uv_config_toml("https://127.0.0.1:9/simple", ("https://127.0.0.1:9/extra",))
    assert tomllib.loads(text)["pip"]["index-url"] == "https://127.0.0.1:9/simple"
    assert uv_config_toml(None) == ""
    config = tmp_path / "uv.toml"
    config.write_text(text)
    (tmp_path / "r.in").write_text("six\n")
    import uv

    env = {**os.environ, "UV_CONFIG_FILE": str(config), "UV_HTTP_RETRIES": "0", "UV_NO_CACHE": "1"}
    proc = subprocess.run(
        [uv.find_uv_bin(), "pip", "compile", "--python-version", "3.11", "r.in"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "127.0.0.1" in proc.stderr


@pytest.mark.skipif(shutil.which("buildah") is None, reason="needs buildah")
def test_buildah_reads_labels_back_exactly(tmp_path):
    creator = "eve \"$HOME\" ${USER} \\ `x` 'q' \\n ünï"
    plan = plan_build(image(creator=creator, display="two\nlines"), observations())
    label = instructions(plan.containerfile)[-1]
    label_lines = plan.containerfile[plan.containerfile.index("LABEL ") :]
    context = tmp_path / "ctx"
    context.mkdir()
    (context / "Containerfile").write_text("FROM scratch\n" + label_lines)
    storage = [
        "--root",
        str(tmp_path / "root"),
        "--runroot",
        str(tmp_path / "run"),
        "--storage-driver",
        "vfs",
    ]
    subprocess.run(
        ["buildah", *storage, "build", "-q", "-t", "localhost/cnbi-label-test:1", str(context)],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    out = subprocess.run(
        ["buildah", *storage, "inspect", "localhost/cnbi-label-test:1"],
        check=True, capture_output=True, text=True, timeout=60,
    ).stdout  # fmt: skip
    labels = json.loads(out)["OCIv1"]["config"]["Labels"]
    assert label.startswith("LABEL ")
    for key, value in plan.labels.items():
        assert labels[key] == value, key
    assert labels["io.cnbi-hub.owner"] == creator
    subprocess.run(["buildah", *storage, "rmi", "-a", "-f"], capture_output=True, timeout=60)


def test_every_run_line_is_valid_shell():
    """`sh -n` parses each RUN body the way the build container's /bin/sh will."""
    plan = plan_build(
        image("GitRepository"),
        observations(
            git_commit=COMMIT, recipe="requirements", apt_packages=("curl",), has_postbuild=True
        ),
    )
    runs = [s for s in instructions(plan.containerfile) if keyword(s) == "RUN"]
    assert len(runs) == 3
    for run in runs:
        words = run.split()[1:]
        while words[0].startswith("--mount="):
            words.pop(0)
        script = " ".join(words)
        proc = subprocess.run(["sh", "-n", "-c", script], capture_output=True, text=True)
        assert proc.returncode == 0, (script, proc.stderr)


def test_images_named_by_lists_what_the_from_lines_pull():
    from cnbi_hub.controller.buildplan import images_named_by

    text = (
        "ARG BASE=registry.example/notebook:1\n"
        "FROM --platform=linux/amd64 $BASE AS builder\n"
        "RUN make\n"
        "FROM scratch AS empty\n"
        "FROM builder\n"
        "FROM \\\n  registry.example/python:3.11\n"
        "COPY --from=builder /a /a\n"
        "FROM registry.example/notebook:1\n"
    )
    assert images_named_by(text) == ["registry.example/notebook:1", "registry.example/python:3.11"]
    assert images_named_by(text, {"BASE": "other.example/base@sha256:" + "a" * 64}) == [
        "other.example/base@sha256:" + "a" * 64, "registry.example/python:3.11", "registry.example/notebook:1"]
    assert images_named_by("# no FROM at all\nRUN true\n") == []
    multi = ("FROM registry.example/a:1 AS build\nFROM registry.example/b:2\n"
             "COPY --from=build /x /x\nCOPY --from=0 /y /y\nCOPY --chown=1000 --from=ghcr.example/uv:0.4 /uv /bin/uv\n")
    assert images_named_by(multi) == ["registry.example/a:1", "registry.example/b:2", "ghcr.example/uv:0.4"]
