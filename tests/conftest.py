pytest_plugins = [
    "tests.hubfixtures",
    "tests.infra_registry",
    "tests.infra_podman",
    "tests.uifixtures",
    "tests.spawnerfixtures",
]
