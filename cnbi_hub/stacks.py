"""Stacks: an image built on another CustomNBImage, named as `spec.baseImage: cnbi:<name>`.

Pure: which image a spec stands on, the chain of images above it (and the cycle a new one would
close), and the images below one. The service checks a new image with these before storing it;
the engine resolves the base to the named image's current build and rebuilds the images below
an image after each new build of it. Lookups are passed in, so both modes use the same code.
"""

from __future__ import annotations

from typing import Awaitable, Callable, Iterable

from . import model

PREFIX = "cnbi:"
#: how many images may stand on each other: deeper stacks are refused (each level is a build)
MAX_DEPTH = 8


class StackError(ValueError):
    """A stack that cannot be: a cycle or one too deep. The message names the images."""


def parent_of(spec: dict | None) -> str | None:
    """The name of the image `spec` is built on, when its base is another CustomNBImage."""
    base = (spec or {}).get("baseImage")
    if isinstance(base, str) and base.startswith(PREFIX):
        return base[len(PREFIX):]
    return None


def reference(name: str) -> str:
    return PREFIX + name


async def check_chain(name: str, parent: str, parent_of_name: Callable[[str], Awaitable[str | None]],
                      shown: Callable[[str], str] = str) -> list[str]:
    """The chain above an image `name` built on `parent`: [name, parent, its parent, ...].

    `parent_of_name(n)` answers the image `n` stands on (None: a plain base, or no such image).
    Raises StackError for a cycle (an image below `name` reused its name as a base, e.g. after
    `name` was deleted and made again) or a chain deeper than MAX_DEPTH, naming each image as
    `shown` says (the service does not name images the caller may not see).
    """
    chain = [name]
    current: str | None = parent
    while current is not None:
        if current in chain:
            cycle = chain[chain.index(current):] + [current]
            raise StackError("this makes a cycle of images built on each other: " + " → ".join(map(shown, cycle)))
        chain.append(current)
        if len(chain) > MAX_DEPTH + 1:
            raise StackError(f"images may stand on each other at most {MAX_DEPTH} deep: "
                             + " → ".join(map(shown, chain[:4])) + " → …")
        current = await parent_of_name(current)
    return chain


def below(name: str, parents: dict[str, str | None]) -> list[str]:
    """Every image built on `name`, directly or through others, nearest first (the order in
    which they are rebuilt): from `parents`, each image's name → the image it stands on."""
    children: dict[str, list[str]] = {}
    for child, parent in parents.items():
        if parent is not None:
            children.setdefault(parent, []).append(child)
    order, seen, frontier = [], {name}, [name]
    while frontier:
        next_frontier = []
        for parent in frontier:
            for child in sorted(children.get(parent, [])):
                if child not in seen:  # a cycle (made outside the service) is walked once
                    seen.add(child)
                    order.append(child)
                    next_frontier.append(child)
        frontier = next_frontier
    return order


def direct_children(name: str, parents: dict[str, str | None]) -> Iterable[str]:
    return sorted(child for child, parent in parents.items() if parent == name)


def refusal(child: dict, parent: dict) -> str | None:
    """Why `child` may not be built on `parent` now, or None. The service checked, when the child
    was made, that its creator may use that image and pinned its uid: a new image that took
    the name since (the old one deleted) is not that image, and one its owner no longer shares
    is no longer theirs to build on. (Group membership is the hub's to know: an image still
    shared with some group counts.)"""
    name = model.name_of(parent)
    pinned = (child["metadata"].get("annotations") or {}).get(model.ANNOTATION_BASE_UID)
    if pinned and pinned != parent["metadata"].get("uid"):
        return (f"the image {name} it was built on was deleted and a new image took its name; "
                f"to build on the new one, create an image on it")
    if not (model.creator_of(parent) == model.creator_of(child) or model.is_shared(parent)
            or model.shared_groups_of(parent)):
        return f"the image {name} it was built on is no longer shared with you"
    return None


def failure_words(failed: dict, reader: dict, why: str) -> str:
    """`why` the image `failed` failed, for the owner of `reader`: named only when they may use
    it (a failure's words hold its repository, paths and build output)."""
    if model.may_use(failed, model.creator_of(reader)):
        return f"{model.name_of(failed)} failed ({why})"
    return "an image below it failed to rebuild"
