"""The local base images, run with real podman; the podman config; the git test server."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import subprocess
import zipfile
from pathlib import Path

import pytest

from cnbi_hub import baseimage
from cnbi_hub.baseimage import (
    BaseImageBuilder,
    ImagePlan,
    ensure_base_images,
    expand_variants,
    notebook_containerfile,
    stale_keyed_tag,
)
from cnbi_hub.containers import config_path, podman_environ

from .infra_podman import SAMPLE_CONTAINERFILE_MARKER, git, podman


NOTEBOOK = ["user", "root"]


def run_in(image: str, *argv: str, input: bytes | None = None, user: str | None = None):
    """podman run --rm --network host IMAGE ARGV...; returns the CompletedProcess (bytes)."""
    args = ["run", "--rm", "--network", "host"]
    if input is not None:
        args.append("--interactive")
    if user:
        args += ["--user", user]
    return podman(*args, image, *argv, input=input, text=False)


def labels_of(reference: str) -> dict[str, str]:
    result = podman("image", "inspect", "--format", "{{json .Config.Labels}}", reference)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def probe_wheel() -> bytes:
    """A minimal pure-Python wheel (cnbi_probe 1.0), so pip installs without any index."""
    files = {
        "cnbi_probe/__init__.py": b"VALUE = 42\n",
        "cnbi_probe-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: cnbi-probe\nVersion: 1.0\n",
        "cnbi_probe-1.0.dist-info/WHEEL": (
            b"Wheel-Version: 1.0\nGenerator: cnbi-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }
    record = []
    for name, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(data)}")
    record.append("cnbi_probe-1.0.dist-info/RECORD,,")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as wheel:
        for name, data in files.items():
            wheel.writestr(name, data)
        wheel.writestr("cnbi_probe-1.0.dist-info/RECORD", "\n".join(record) + "\n")
    return buffer.getvalue()


# -- pure planning ------------------------------------------------------------------------------


def test_containerfile_differs_by_venv_owner():
    versions = {"jupyterhub": "1.0", "jupyterlab": "2.0"}
    user = notebook_containerfile("user", "localhost/cnbi/debian:x", versions)
    root = notebook_containerfile("root", "localhost/cnbi/debian:x", versions)
    assert "install -d -o jovyan" in user and "install -d -o root" in root
    assert "jupyterhub==1.0 jupyterlab==2.0" in user
    assert user.startswith("FROM localhost/cnbi/debian:x\n")
    # The CA bundle is only ever a build secret, never copied into a layer.
    assert "COPY" not in user and "--mount=type=secret" in user
    with pytest.raises(ValueError, match="not a plain name and version"):
        notebook_containerfile("user", "x", {"jupyterhub": "1.0; rm -rf /"})
    with pytest.raises(ValueError, match="notebook variant"):
        notebook_containerfile("debian", "x", versions)


def test_content_key_follows_versions_and_debian_recipe():
    base = BaseImageBuilder(package_versions={"jupyterhub": "1.0", "jupyterlab": "2.0"})
    bumped = BaseImageBuilder(package_versions={"jupyterhub": "1.0", "jupyterlab": "2.1"})
    other_mirror = BaseImageBuilder(
        package_versions={"jupyterhub": "1.0", "jupyterlab": "2.0"}, debian_mirror="http://mirror.invalid/debian"
    )
    assert base.plan("user").content_key == BaseImageBuilder(package_versions=base.package_versions).plan("user").content_key
    assert base.plan("user").content_key != bumped.plan("user").content_key
    assert base.plan("user").content_key != base.plan("root").content_key
    # A different Debian image changes the FROM line, hence the notebook key too.
    assert base.plan("debian").content_key != other_mirror.plan("debian").content_key
    assert base.plan("user").content_key != other_mirror.plan("user").content_key
    plan = base.plan("root")
    assert plan.reference == "localhost/cnbi/notebook-base:py311-root"
    assert re.fullmatch(r"localhost/cnbi/notebook-base:py311-root-[0-9a-f]{12}", plan.keyed_reference)


def test_expand_variants_and_stale_tags():
    assert expand_variants(["all"]) == ["debian", "user", "root"]
    assert expand_variants(["root", "debian"]) == ["debian", "root"]
    with pytest.raises(ValueError, match="unknown base image variant"):
        expand_variants(["alpine"])
    plan = ImagePlan("user", "localhost/cnbi/notebook-base", "py311-user", "a" * 64, "")
    assert stale_keyed_tag("localhost/cnbi/notebook-base:py311-user-0123456789ab", plan)
    assert not stale_keyed_tag("localhost/cnbi/notebook-base:py311-user", plan)
    assert not stale_keyed_tag("localhost/cnbi/notebook-base:py311-user-mine", plan)
    assert not stale_keyed_tag("localhost/cnbi/notebook-base:py311-root-0123456789ab", plan)


# -- podman config ------------------------------------------------------------------------------


def test_podman_environ_points_at_package_config(podman_env):
    env = podman_environ({"PATH": "/usr/bin"})
    assert env["PATH"] == "/usr/bin"
    conf = Path(env["CONTAINERS_CONF"]).read_text()
    assert 'runtime = "runc"' in conf and 'cgroup_manager = "cgroupfs"' in conf
    assert "default_ulimits = []" in conf
    assert 'driver = "overlay"' in Path(env["CONTAINERS_STORAGE_CONF"]).read_text()
    assert env["CONTAINERS_CONF"] == str(config_path("containers.conf"))
    info = podman("info", "--format", "{{.Host.OCIRuntime.Name}} {{.Host.CgroupManager}} {{.Store.GraphDriverName}}",
                  env=podman_env)
    assert info.returncode == 0, info.stderr
    assert info.stdout.split() == ["runc", "cgroupfs", "overlay"]


def test_containers_default_to_the_host_network(notebook_base_images):
    # No --network flag: containers.conf alone must put the container in the host's namespace.
    result = podman("run", "--rm", notebook_base_images["debian"], "readlink", "/proc/1/ns/net")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == os.readlink("/proc/self/ns/net")


# -- the images ---------------------------------------------------------------------------------


def test_ensure_base_images_reuses_keyed_tags(notebook_base_images, capsys):
    again = ensure_base_images(["all"])
    assert again == notebook_base_images
    err = capsys.readouterr().err
    builder = BaseImageBuilder()
    for variant in ("debian", "user", "root"):
        plan = builder.plan(variant)
        assert f"cached: {plan.keyed_reference}" in err
        ids = {podman("image", "inspect", "--format", "{{.Id}}", ref).stdout.strip()
               for ref in (plan.reference, plan.keyed_reference)}
        assert len(ids) == 1 and "" not in ids
        assert labels_of(plan.reference)["cnbi-hub.io/content-key"] == plan.content_key


def test_cli_prints_references(notebook_base_images):
    result = subprocess.run(
        [str(Path(__file__).parent.parent / "scripts" / "build-base-image"), "--variant", "root"],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [notebook_base_images["root"]]
    assert "cached:" in result.stderr


def test_debian_image_has_python_but_no_jupyterhub(notebook_base_images):
    image = notebook_base_images["debian"]
    assert image == "localhost/cnbi/debian:bookworm"
    version = run_in(image, "python3", "-c", "import sys; print(sys.version_info >= (3, 8))")
    assert version.returncode == 0 and version.stdout.strip() == b"True"
    assert run_in(image, "sh", "-c", "command -v jupyterhub-singleuser").returncode != 0
    assert run_in(image, "python3", "-c", "import jupyterhub").returncode != 0


@pytest.mark.parametrize("variant", NOTEBOOK)
def test_singleuser_version_matches_label(notebook_base_images, variant):
    image = notebook_base_images[variant]
    assert image == f"localhost/cnbi/notebook-base:py311-{variant}"
    result = run_in(image, "jupyterhub-singleuser", "--version")
    assert result.returncode == 0, result.stderr
    labels = labels_of(image)
    assert result.stdout.decode().strip() == labels["cnbi-hub.io/jupyterhub-version"]
    lab = run_in(image, "jupyter-lab", "--version")
    assert lab.stdout.decode().strip() == labels["cnbi-hub.io/jupyterlab-version"]


@pytest.mark.parametrize("variant", NOTEBOOK)
def test_python_user_home_and_config(notebook_base_images, variant):
    image = notebook_base_images[variant]
    script = (
        "import os, sys, pwd; "
        "probe = os.path.join(os.environ['HOME'], 'probe'); open(probe, 'w').write('x'); "
        "print(sys.version_info[:2] >= (3, 8), os.getuid(), pwd.getpwuid(os.getuid()).pw_name, "
        "os.environ['HOME'], os.getcwd(), sys.prefix, os.path.exists('/run/secrets/cnbi-ca-bundle'))"
    )
    result = run_in(image, "python", "-c", script)
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().split() == [
        "True", "1000", "jovyan", "/home/jovyan", "/home/jovyan", "/opt/venv", "False"
    ]
    inspect = podman("image", "inspect", "--format", "{{.Config.User}} {{json .Config.Cmd}}", image)
    assert inspect.stdout.strip() == 'jovyan ["jupyterhub-singleuser"]'


def test_user_variant_venv_is_writable_by_jovyan(notebook_base_images):
    image = notebook_base_images["user"]
    result = run_in(
        image, "sh", "-c",
        "cat > /tmp/cnbi_probe-1.0-py3-none-any.whl"
        " && pip install --no-index --no-deps /tmp/cnbi_probe-1.0-py3-none-any.whl"
        " && python -c 'import cnbi_probe; print(cnbi_probe.VALUE, cnbi_probe.__file__)'",
        input=probe_wheel(),
    )
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.decode().splitlines()[-1] == "42 /opt/venv/lib/python3.11/site-packages/cnbi_probe/__init__.py"
    assert labels_of(image)["cnbi-hub.io/venv-owner"] == "jovyan"


def test_root_variant_venv_is_read_only_for_jovyan(notebook_base_images):
    image = notebook_base_images["root"]
    result = run_in(
        image, "sh", "-c",
        "cat > /tmp/cnbi_probe-1.0-py3-none-any.whl"
        " && pip install --no-index --no-deps /tmp/cnbi_probe-1.0-py3-none-any.whl",
        input=probe_wheel(),
    )
    assert result.returncode != 0
    assert b"Permission denied" in result.stderr + result.stdout
    owner = run_in(image, "stat", "-c", "%U %a", "/opt/venv")
    assert owner.stdout.decode().split() == ["root", "755"]
    assert labels_of(image)["cnbi-hub.io/venv-owner"] == "root"
    # Root (an admin's own Containerfile) can still install into it.
    as_root = run_in(
        image, "sh", "-c",
        "cat > /tmp/cnbi_probe-1.0-py3-none-any.whl"
        " && pip install --no-index --no-deps /tmp/cnbi_probe-1.0-py3-none-any.whl",
        input=probe_wheel(), user="root",
    )
    assert as_root.returncode == 0, as_root.stderr.decode()


# -- the git server -----------------------------------------------------------------------------


def test_git_ls_remote_returns_the_commit(make_git_repo):
    repo = make_git_repo("ls-remote-probe", {"requirements.txt": "six\n", "src/a.py": "A = 1\n"}, branch="dev")
    assert repo.url.startswith("git://127.0.0.1:") and repo.url.endswith("/ls-remote-probe.git")
    assert re.fullmatch(r"[0-9a-f]{40}", repo.commit)
    refs = dict(line.split("\t")[::-1] for line in git("ls-remote", repo.url).splitlines())
    assert refs["refs/heads/dev"] == repo.commit
    assert refs["HEAD"] == repo.commit
    with pytest.raises(ValueError, match="already exists"):
        make_git_repo("ls-remote-probe", {"x": "y"})
    with pytest.raises(ValueError, match="leaves the repository"):
        make_git_repo("escape", {"../outside": "y"})


def test_sample_repos_clone_with_their_files(sample_git_repos, tmp_path):
    requirements = sample_git_repos["requirements"]
    git("clone", "--quiet", requirements.url, str(tmp_path / "req"))
    assert (tmp_path / "req" / "requirements.txt").read_text() == "tabulate==0.9.0\n"
    assert git("rev-parse", "HEAD", cwd=tmp_path / "req") == requirements.commit
    containerfile = sample_git_repos["containerfile"]
    git("clone", "--quiet", containerfile.url, str(tmp_path / "cf"))
    text = (tmp_path / "cf" / "Containerfile").read_text()
    assert text.startswith(f"FROM {baseimage.NOTEBOOK_REPOSITORY}:py311-user\n")
    assert SAMPLE_CONTAINERFILE_MARKER in text
