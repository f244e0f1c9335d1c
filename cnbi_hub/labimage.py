"""The notebook image that carries cnbi_hub's own Lab panel.

A server shows the Image Builder only if cnbi_hub (its jupyter_server extension and its Lab
extension) is installed in the image it runs, just as it must have jupyterhub. This builds that
image for the embedded hub: the local notebook base plus this package's wheel, installed without
dependencies (the base image already has jupyter_server and tornado, all the extension needs).
Images users build on it inherit the panel.

    python -m cnbi_hub.labimage [--from localhost/cnbi/notebook-base:py311-user]
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tempfile
from pathlib import Path

from .containers import run_podman

LAB_REPOSITORY = "localhost/cnbi/notebook-lab"
LAB_TAG = "py311"
DEFAULT_FROM = "localhost/cnbi/notebook-base:py311-user"
# what goes into the wheel: the package (with its built Lab extension) and its metadata
_SOURCE_GLOBS = ("cnbi_hub/**/*", "jupyter-config/**/*", "pyproject.toml", "install.json", "package.json")


class LabImageError(RuntimeError):
    pass


def source_tree() -> Path:
    """The checkout this package runs from (the demo runs from one)."""
    root = Path(__file__).resolve().parent.parent
    if not (root / "pyproject.toml").is_file() or not (root / "cnbi_hub" / "labextension" / "package.json").is_file():
        raise LabImageError(
            "the Lab image is built from a source checkout with its Lab extension built; "
            "run `make demo` (or `pip install -e .`) in the cnbi_hub repository"
        )
    return root


def lab_containerfile(from_image: str, wheel_name: str) -> str:
    """Pure: the Containerfile installing the wheel as the image's own user (who owns the venv)."""
    return (
        f"FROM {from_image}\n"
        f"COPY {wheel_name} /tmp/cnbi/{wheel_name}\n"
        f"RUN python -m pip install --no-deps --no-cache-dir --no-index /tmp/cnbi/{wheel_name}\n"
        f'LABEL cnbi-hub.io/lab-extension="cnbi_hub"\n'
    )


def source_key(root: Path, from_digest: str) -> str:
    """Changes when anything that goes into the wheel, or the base image, changes."""
    digest = hashlib.sha256(from_digest.encode())
    files = sorted({p for pattern in _SOURCE_GLOBS for p in root.glob(pattern) if p.is_file()})
    for path in files:
        if "__pycache__" in path.parts:
            continue
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def _podman(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return run_podman(list(args), **kwargs)


def ensure_lab_image(from_image: str = DEFAULT_FROM) -> str:
    """Build (or find, by content key) the lab image; returns its reference."""
    root = source_tree()
    inspected = _podman("image", "inspect", "--format", "{{.Digest}}", from_image)
    if inspected.returncode != 0:
        raise LabImageError(f"{from_image} is not in local storage: build it with scripts/build-base-image")
    key = source_key(root, inspected.stdout.strip())
    reference, keyed = f"{LAB_REPOSITORY}:{LAB_TAG}", f"{LAB_REPOSITORY}:{LAB_TAG}-{key}"
    if _podman("image", "exists", keyed).returncode == 0:
        _podman("tag", keyed, reference)
        return reference
    # `jupyter labextension develop` links the installed extension to the build output, and
    # an editable install then writes install.json into it; the wheel maps the root one there
    # too, and hatchling refuses the duplicate. The build output is generated: drop the copy.
    stray = root / "cnbi_hub" / "labextension" / "install.json"
    if stray.is_file() and (root / "install.json").is_file():
        stray.unlink()
    with tempfile.TemporaryDirectory(prefix="cnbi-labimage-") as context:
        built = subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
             "--wheel-dir", context, str(root)],
            capture_output=True, text=True,
        )
        wheels = list(Path(context).glob("cnbi_hub-*.whl"))
        if built.returncode != 0 or not wheels:
            raise LabImageError(f"building the cnbi_hub wheel failed:\n{built.stderr[-2000:]}")
        (Path(context) / "Containerfile").write_text(lab_containerfile(from_image, wheels[0].name))
        result = _podman("build", "--network=host", "--pull=never", "-t", keyed, "-t", reference, context)
        if result.returncode != 0:
            raise LabImageError(f"building {reference} failed:\n{(result.stderr or result.stdout)[-2000:]}")
    return reference


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="from_image", default=DEFAULT_FROM, help="the notebook image to add the panel to")
    args = parser.parse_args(argv)
    try:
        print(ensure_lab_image(args.from_image))
    except LabImageError as e:
        print(e, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
