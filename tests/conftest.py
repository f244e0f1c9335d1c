pytest_plugins = [
    "tests.hubfixtures",
    "tests.infra_registry",
    "tests.infra_podman",
    "tests.infra_githttp",
    "tests.infra_kube",
    "tests.uifixtures",
    "tests.spawnerfixtures",
    "tests.clusterfixtures",
]
