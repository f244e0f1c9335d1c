"""Table-driven tests of OCI image reference parsing and normalisation."""

import dataclasses

import pytest

from cnbi_hub.imageref import ImageReference, parse_image_reference, validate_digest

HEX64 = "0123456789abcdef" * 4
DIGEST = f"sha256:{HEX64}"

VALID = [
    # text, registry, repository, tag, digest, canonical
    ("python", "docker.io", "library/python", "latest", None, "docker.io/library/python:latest"),
    ("python:3.11", "docker.io", "library/python", "3.11", None, None),
    ("jupyter/base-notebook", "docker.io", "jupyter/base-notebook", "latest", None, None),
    ("docker.io/python", "docker.io", "library/python", "latest", None, None),
    (
        "index.docker.io/library/python:3",
        "docker.io",
        "library/python",
        "3",
        None,
        "docker.io/library/python:3",
    ),
    ("quay.io/org/img:tag", "quay.io", "org/img", "tag", None, "quay.io/org/img:tag"),
    (
        f"localhost:5000/a/b:tag@{DIGEST}",
        "localhost:5000",
        "a/b",
        "tag",
        DIGEST,
        f"localhost:5000/a/b:tag@{DIGEST}",
    ),
    ("127.0.0.1:5000/x", "127.0.0.1:5000", "x", "latest", None, "127.0.0.1:5000/x:latest"),
    ("localhost/cnbi/alice/my-image", "localhost", "cnbi/alice/my-image", "latest", None, None),
    (f"quay.io/org/img@{DIGEST}", "quay.io", "org/img", None, DIGEST, f"quay.io/org/img@{DIGEST}"),
    ("[::1]:5000/ns/img:v1", "[::1]:5000", "ns/img", "v1", None, None),
    ("Registry.Example.COM/ns/img", "Registry.Example.COM", "ns/img", "latest", None, None),
    ("a.b/x__y/z.w/q-r---s/t_u:_T.a-g", "a.b", "x__y/z.w/q-r---s/t_u", "_T.a-g", None, None),
    ("ghcr.io/o/n:" + "t" * 128, "ghcr.io", "o/n", "t" * 128, None, None),
    ("localhost:5000", "docker.io", "library/localhost", "5000", None, None),
]


@pytest.mark.parametrize("text,registry,repository,tag,digest,canonical", VALID)
def test_parse_valid(text, registry, repository, tag, digest, canonical):
    ref = parse_image_reference(text)
    assert ref == ImageReference(registry, repository, tag, digest)
    expected = canonical or f"{registry}/{repository}" + (f":{tag}" if tag else "") + (
        f"@{digest}" if digest else ""
    )
    assert str(ref) == expected
    # The canonical form is a fixed point of parsing.
    assert parse_image_reference(str(ref)) == ref


INVALID = [
    # text, a fragment the error message must contain
    ("", "empty"),
    ("UPPER/case", "lowercase"),
    ("Python", "lowercase"),
    ("quay.io/Org/img", "lowercase"),
    ("a;rm -rf /", "whitespace"),
    ("a;rm", "';'"),
    ("img$(id)", "not allowed"),
    ("img`id`", "not allowed"),
    ("img|cat", "not allowed"),
    ("img&&x", "not allowed"),
    ("img>x", "not allowed"),
    ("img\nx", "whitespace"),
    (" python", "whitespace"),
    ("python ", "whitespace"),
    ("-python", "start with '-'"),
    ("--help", "start with '-'"),
    ("quay.io/-org/img", "repository path element"),
    ("quay.io/org/img-", "repository path element"),
    ("quay.io/org/.img", "repository path element"),
    ("quay.io/org//img", "empty path element"),
    ("quay.io/org/img/", "empty path element"),
    ("quay.io/", "missing"),
    (":tag", "missing"),
    ("img:", "invalid tag"),
    ("img:.tag", "invalid tag"),
    ("img:-tag", "invalid tag"),
    ("img:" + "t" * 129, "invalid tag"),
    ("img@sha256:abc", "64 lowercase hex"),
    (f"img@sha256:{HEX64.upper()}", "64 lowercase hex"),
    (f"img@md5:{HEX64}", "unsupported algorithm"),
    (f"img@{DIGEST}@{DIGEST}", "more than one '@'"),
    ("img@", "invalid digest"),
    ("-bad.io/img", "start with '-'"),
    ("bad-.io/img", "invalid registry"),
    ("reg.io:port/img", "invalid registry"),
    (HEX64, "image ID"),
    ("quay.io/" + "a" * 250, "more than the 255"),
    ("ïmg", "not allowed"),
]


@pytest.mark.parametrize("text,message_fragment", INVALID)
def test_parse_invalid(text, message_fragment):
    with pytest.raises(ValueError) as excinfo:
        parse_image_reference(text)
    assert message_fragment in str(excinfo.value)


def test_non_string_rejected():
    with pytest.raises(ValueError, match="must be a string"):
        parse_image_reference(None)


def test_name_length_limit_is_inclusive():
    # "quay.io/" is 8 characters; 247 more make exactly 255.
    ref = parse_image_reference("quay.io/" + "a" * 247)
    assert len(ref.name) == 255


def test_properties():
    ref = parse_image_reference("python:3.11")
    assert ref.name == "docker.io/library/python"
    assert ref.api_registry == "registry-1.docker.io"
    assert ref.manifest_reference == "3.11"
    local = parse_image_reference("127.0.0.1:5000/x")
    assert local.api_registry == "127.0.0.1:5000"
    assert local.name == "127.0.0.1:5000/x"


def test_with_digest_pins_and_drops_tag():
    ref = parse_image_reference("quay.io/org/img:v1")
    pinned = ref.with_digest(DIGEST)
    assert pinned == ImageReference("quay.io", "org/img", None, DIGEST)
    assert str(pinned) == f"quay.io/org/img@{DIGEST}"
    assert pinned.manifest_reference == DIGEST
    assert ref.tag == "v1"  # the original is untouched
    with pytest.raises(ValueError, match="invalid digest"):
        ref.with_digest("latest")


def test_with_tag():
    ref = parse_image_reference(f"quay.io/org/img@{DIGEST}")
    assert str(ref.with_tag("v2")) == "quay.io/org/img:v2"
    with pytest.raises(ValueError, match="invalid tag"):
        ref.with_tag("bad tag")


def test_reference_is_frozen():
    ref = parse_image_reference("python")
    with pytest.raises(dataclasses.FrozenInstanceError):
        ref.tag = "other"


@pytest.mark.parametrize(
    "digest,ok",
    [
        (DIGEST, True),
        ("sha512:" + "ab" * 64, True),
        ("sha384:" + "ab" * 48, True),
        ("sha256:" + "ab" * 31, False),
        ("sha512:" + HEX64, False),
        ("sha256" + HEX64, False),
    ],
)
def test_validate_digest(digest, ok):
    if ok:
        assert validate_digest(digest) == digest
    else:
        with pytest.raises(ValueError):
            validate_digest(digest)
