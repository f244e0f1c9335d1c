"""resolve_lock against the real package index with the real uv."""

import re
import sys

import pytest

from cnbi_hub.controller.resolve import (
    IndexSettings,
    InvalidRequirementError,
    ResolutionError,
    constraints_from_pip_list,
    explain_uv_error,
    packages_from_lock,
    resolve_lock,
    validate_requirement,
)

CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"


@pytest.mark.asyncio
async def test_resolves_small_set_with_hashes():
    lock = await resolve_lock(["six", "attrs==23.2.0"], python_version="3.11")
    names = {name.lower(): version for name, version in lock.packages}
    assert names["attrs"] == "23.2.0"
    assert "six" in names
    # every pin carries at least one sha256 hash, so the install can use --require-hashes
    blocks = re.split(r"\n(?=\S)", lock.text.strip())
    assert len(blocks) == len(lock.packages) == 2
    for block in blocks:
        assert re.search(r"--hash=sha256:[0-9a-f]{64}", block), block
    assert not any(line.startswith("#") for line in lock.text.splitlines())
    assert re.fullmatch(r"[0-9a-f]{64}", lock.sha256)


@pytest.mark.asyncio
async def test_same_input_same_lock():
    first = await resolve_lock(["attrs==23.2.0"], python_version="3.11")
    second = await resolve_lock(["attrs==23.2.0"], python_version="3.11")
    assert first.sha256 == second.sha256
    assert first.text == second.text


@pytest.mark.asyncio
async def test_missing_version_fails_with_uv_explanation():
    with pytest.raises(ResolutionError) as info:
        await resolve_lock(["six==999"], python_version="3.11")
    message = str(info.value)
    assert "six==999" in message
    assert "Because there is no version of six==999" in message
    assert "warning:" not in message


@pytest.mark.asyncio
async def test_constraints_from_base_image_win():
    # attrs has had releases after 23.2.0, so an unconstrained resolution would pick a newer one
    lock = await resolve_lock(
        ["attrs"], python_version="3.11", constraints=["attrs==23.2.0", "jupyterlab==4.2.5"]
    )
    assert ("attrs", "23.2.0") in lock.packages
    # a constraint on a package nobody asked for does not add it to the lock
    assert all(name.lower() != "jupyterlab" for name, _ in lock.packages)


@pytest.mark.asyncio
async def test_request_that_would_change_base_package_fails():
    with pytest.raises(ResolutionError) as info:
        await resolve_lock(
            ["jupyterlab<4"], python_version="3.11", constraints=["jupyterlab==4.2.5"]
        )
    message = str(info.value)
    assert "jupyterlab<4" in message and "jupyterlab==4.2.5" in message
    assert "unsatisfiable" in message


@pytest.mark.asyncio
async def test_shell_syntax_is_data_never_executed(tmp_path):
    canary = tmp_path / "pwned"
    line = f"numpy; touch {canary}"
    with pytest.raises(InvalidRequirementError) as info:
        await resolve_lock(["six", line], python_version="3.11")
    assert info.value.index == 1
    assert info.value.requirement == line
    assert "not a valid PEP 508 requirement" in str(info.value)
    assert not canary.exists()


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "line",
    [
        "-r /etc/passwd",
        "--index-url=https://127.0.0.1:9/simple",
        "six\n--extra-index-url https://127.0.0.1:9/simple",
        "six @ file:///etc",
        "",
    ],
)
async def test_requirement_file_options_are_rejected(line):
    with pytest.raises(InvalidRequirementError):
        await resolve_lock([line], python_version="3.11")


@pytest.mark.asyncio
async def test_sdist_only_package_refused_unless_builds_allowed():
    # docopt has only ever published an sdist; resolving it would run its setup.py here
    with pytest.raises(ResolutionError) as info:
        await resolve_lock(["docopt==0.6.2"], python_version="3.11")
    assert "docopt" in str(info.value)


@pytest.mark.asyncio
async def test_explicit_index_and_ca_bundle():
    lock = await resolve_lock(
        ["six"],
        python_version="3.12",
        settings=IndexSettings(index_url="https://pypi.org/simple", ca_bundle=CA_BUNDLE),
    )
    assert [name for name, _ in lock.packages] == ["six"]


@pytest.mark.asyncio
async def test_unreachable_index_is_a_resolution_error():
    # 127.0.0.1:9 (discard) refuses connections; loopback is not a private-range address
    with pytest.raises(ResolutionError) as info:
        await resolve_lock(
            ["six"],
            python_version="3.11",
            settings=IndexSettings(index_url="https://127.0.0.1:9/simple"),
        )
    assert "127.0.0.1" in str(info.value) or "onnect" in str(info.value)


@pytest.mark.asyncio
async def test_timeout_is_a_resolution_error():
    with pytest.raises(ResolutionError, match="longer than"):
        await resolve_lock(
            ["six"],
            python_version="3.11",
            settings=IndexSettings(index_url="https://127.0.0.1:9/simple"),
            timeout=0.2,
        )


@pytest.mark.asyncio
async def test_bad_python_version_rejected():
    with pytest.raises(ResolutionError, match="python version"):
        await resolve_lock(["six"], python_version="3.11; rm -rf /")


def test_constraints_from_pip_list():
    pip_list = [
        {"name": "jupyterlab", "version": "4.2.5"},
        {"name": "PyYAML", "version": "6.0.1"},
        {"name": "setuptools", "version": "69.0.0"},
        {"name": "mypkg", "version": "0.1.dev0", "editable_project_location": "/home/me/mypkg"},
        {"name": "oldthing", "version": "1.0-legacy-weird version"},
        {"name": "pyyaml", "version": "5.0"},  # shadowed duplicate: first one wins
        {"name": "broken"},
    ]
    assert constraints_from_pip_list(pip_list) == [
        "jupyterlab==4.2.5",
        "PyYAML==6.0.1",
        "setuptools==69.0.0",
    ]


def test_packages_from_lock_and_error_trimming():
    lock = (
        "attrs==23.2.0 \\\n    --hash=sha256:aa\nzope-interface==6.0 ; python_version >= '3.8' \\\n"
    )
    assert packages_from_lock(lock) == [("attrs", "23.2.0"), ("zope-interface", "6.0")]
    stderr = (
        "warning: something deprecated\n"
        "Resolved 3 packages in 20ms\n"
        "  × No solution found when resolving dependencies:\n"
        "  ╰─▶ Because there is no version of six==999 and you require six==999, we can\n"
        "      conclude that your requirements are unsatisfiable.\n"
    )
    message = explain_uv_error(stderr)
    assert message.splitlines() == [
        "No solution found when resolving dependencies:",
        "Because there is no version of six==999 and you require six==999, we can conclude that your "
        "requirements are unsatisfiable.",
    ]
    assert "warning" not in message and "Resolved 3" not in message
    # uv's plain output (no terminal): its first sentence has no end of its own
    plain = ("error: No solution found when resolving dependencies\n"
             "  cause: Because pandsa was not found in the package registry and you require pandsa, we can "
             "conclude that your requirements are unsatisfiable.\n")
    assert explain_uv_error(plain).splitlines() == [
        "No solution found when resolving dependencies:",
        "Because pandsa was not found in the package registry and you require pandsa, we can conclude that "
        "your requirements are unsatisfiable.",
    ]


def test_validate_requirement_accepts_markers_and_extras():
    req = validate_requirement('pandas[excel]>=2; python_version >= "3.9"')
    assert req.name == "pandas" and "excel" in req.extras


@pytest.mark.asyncio
async def test_lock_installs_with_require_hashes_and_no_deps(tmp_path):
    """The lock is what the build plan feeds to `uv pip install --require-hashes --no-deps`."""
    import subprocess

    import uv

    lock = await resolve_lock(["attrs==23.2.0", "six"], python_version="3.11")
    (tmp_path / "requirements.lock").write_text(lock.text)
    uv_bin = uv.find_uv_bin()
    subprocess.run(
        [uv_bin, "venv", "-q", "--python", sys.executable, str(tmp_path / "env")], check=True
    )
    python = tmp_path / "env" / "bin" / "python"
    subprocess.run(
        [uv_bin, "pip", "install", "-q", "--require-hashes", "--no-deps", "--python", str(python),
         "-r", str(tmp_path / "requirements.lock")],
        check=True, timeout=300,
    )  # fmt: skip
    out = subprocess.run(
        [str(python), "-c", "import attrs, six; print(attrs.__version__)"],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    assert out.strip() == "23.2.0"
    # a tampered hash is refused: the hashes are really checked
    tampered = re.sub(r"sha256:[0-9a-f]{64}", "sha256:" + "0" * 64, lock.text)
    (tmp_path / "tampered.lock").write_text(tampered)
    proc = subprocess.run(
        [uv_bin, "pip", "install", "--reinstall", "--no-cache", "--require-hashes", "--no-deps",
         "--python", str(python), "-r", str(tmp_path / "tampered.lock")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "hash" in proc.stderr.lower()


LOCK_A = """\
tabulate==0.9.0 \\
    --hash=sha256:aaa \\
    --hash=sha256:bbb
toolz==0.12.1 \\
    --hash=sha256:ccc
"""
LOCK_B = LOCK_A + """\
text-unidecode==1.3 \\
    --hash=sha256:ddd
"""


def test_lock_difference_is_the_added_entries_with_their_hashes():
    from cnbi_hub.controller.resolve import lock_difference, lock_entries

    assert set(lock_entries(LOCK_B)) == {("tabulate", "0.9.0"), ("toolz", "0.12.1"), ("text-unidecode", "1.3")}
    assert lock_difference(LOCK_B, LOCK_A) == "text-unidecode==1.3 \\\n    --hash=sha256:ddd\n"
    # the old lock pins something the new one does not: no layering
    assert lock_difference(LOCK_A, LOCK_B) is None
    assert lock_difference(LOCK_A.replace("0.12.1", "1.0.0"), LOCK_A) is None
    assert lock_difference(LOCK_A, "") is None
