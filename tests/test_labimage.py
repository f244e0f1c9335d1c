"""The notebook image with cnbi_hub's Lab panel (used by the embedded demo)."""

import pytest

from cnbi_hub import labimage
from tests.infra_podman import podman


def test_containerfile_installs_the_wheel_alone():
    text = labimage.lab_containerfile("localhost/cnbi/notebook-base:py311-user", "cnbi_hub-0.1.0-py3-none-any.whl")
    assert text.startswith("FROM localhost/cnbi/notebook-base:py311-user\n")
    assert "--no-deps" in text and "--no-index" in text


def test_source_key_follows_the_sources_and_the_base(tmp_path):
    (tmp_path / "cnbi_hub").mkdir()
    module = tmp_path / "cnbi_hub" / "x.py"
    module.write_text("A = 1\n")
    first = labimage.source_key(tmp_path, "sha256:base1")
    assert labimage.source_key(tmp_path, "sha256:base1") == first
    assert labimage.source_key(tmp_path, "sha256:base2") != first
    module.write_text("A = 2\n")
    assert labimage.source_key(tmp_path, "sha256:base1") != first


@pytest.mark.podman
def test_lab_image_has_both_extensions_enabled(notebook_base_images, podman_env):
    reference = labimage.ensure_lab_image(notebook_base_images["user"])
    result = podman("run", "--rm", "--network=host", reference, "sh", "-c",
                    "jupyter server extension list 2>&1; jupyter labextension list 2>&1", env=podman_env)
    assert result.returncode == 0, result.stderr
    assert "cnbi_hub" in result.stdout and "cnbi-hub v" in result.stdout
    # cached by content: asking again builds nothing and answers the same reference
    assert labimage.ensure_lab_image(notebook_base_images["user"]) == reference
