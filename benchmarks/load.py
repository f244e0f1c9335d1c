"""The API under load, through the hub's proxy, as ratios to the hub's own API in the same run.

1. Concurrency: `--creates` image requests from `--users` users at once, then `--clients`
   list requests at once, against the same number of concurrent `GET /hub/api/user` (the
   baseline): requests per second and p99 of each; every create answered 201 or a clear 4xx,
   none lost (the users' lists hold exactly the accepted ones).
2. Growth: for each of `--sizes` stored images (seeded straight into the service's SQLite
   store, 20 per owner), p99 of one user's `GET api/images` (their 20 and the shared ones)
   against the hub's `GET /hub/api/user` p99 in the same run: how the cost of a list grows
   with the store.

The service runs without its engine (`reconcile = False`): this measures the API, not builds
(tests/test_builds.py and benchmarks/build.py do). Bounded: every loop has a fixed count.

    .venv/bin/python benchmarks/load.py [--sizes 1000,10000,100000] [--creates 100] [--clients 200]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlalchemy.orm import Session  # noqa: E402
from tornado.httpclient import AsyncHTTPClient, HTTPRequest  # noqa: E402

from cnbi_hub import model  # noqa: E402
from cnbi_hub.store.sqlite import ImageRow, SQLImageStore  # noqa: E402
from tests.hubfixtures import start_quiet_hub, stop_hub  # noqa: E402

PER_OWNER = 20
SEED_BATCH = 5000


def percentile(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def image_body(name: str) -> dict:
    return {"metadata": {"name": name, "annotations": {model.ANNOTATION_DISPLAY_NAME: name}},
            "spec": {"buildType": "PackageList", "baseImage": "quay.io/a/b:1",
                     "packageVersions": ["pandas>=2", "scikit-learn", "matplotlib"]}}


def seed(data_dir: str, count: int) -> float:
    """`count` images straight into the service's store, PER_OWNER per owner; seconds taken.
    Rows are written in batches (the store's own create commits one at a time)."""
    start = time.perf_counter()
    store = SQLImageStore("sqlite:///" + str(Path(data_dir) / "cnbi.sqlite"))
    try:
        for first in range(0, count, SEED_BATCH):
            with Session(store.engine) as session:
                for i in range(first, min(count, first + SEED_BATCH)):
                    obj = model.validate_new_object(image_body(f"seed-{i}"), creator=f"owner{i // PER_OWNER}")
                    meta = obj["metadata"]
                    meta.update(namespace="default", uid=str(uuid.uuid4()), generation=1,
                                creationTimestamp=model.now_iso())
                    obj["status"] = model.initial_status()
                    session.add(ImageRow(namespace="default", name=meta["name"], uid=meta["uid"],
                                         resource_version=1, **store._columns(obj)))
                session.commit()
    finally:
        store.close()
    return time.perf_counter() - start


async def timed(request: HTTPRequest) -> tuple[float, int]:
    start = time.perf_counter()
    response = await AsyncHTTPClient().fetch(request, raise_error=False)
    return time.perf_counter() - start, response.code


async def at_once(requests: list[HTTPRequest]) -> tuple[list[float], list[int], float]:
    """All `requests` at the same moment: latencies, status codes, wall seconds."""
    start = time.perf_counter()
    results = await asyncio.gather(*(timed(r) for r in requests))
    return [r[0] for r in results], [r[1] for r in results], time.perf_counter() - start


def get(url: str, token: str) -> HTTPRequest:
    return HTTPRequest(url, headers={"Authorization": f"token {token}"}, request_timeout=300)


def row(label: str, latencies: list[float], wall: float, baseline_p99: float) -> str:
    p50, p99 = percentile(latencies, 50), percentile(latencies, 99)
    return (f"{label:44} {len(latencies):6d} {len(latencies) / wall:8.1f} {p50 * 1000:8.1f} {p99 * 1000:8.1f} "
            f"{p99 / baseline_p99:9.2f}")


async def concurrency(users: int, creates: int, clients: int) -> None:
    AsyncHTTPClient.configure(None, max_clients=max(creates, clients) + 10)
    with tempfile.TemporaryDirectory() as data_dir:
        seconds = seed(data_dir, 1000)
        hub = await start_quiet_hub(data_dir, wait_seconds=300, max_images_per_user=1000, reconcile=False)
        try:
            tokens = [hub.token(f"load{i}") for i in range(users)]
            for token in tokens:  # warm the service's token cache, as a running hub has it
                await timed(get(hub.service_url + "api/settings", token))
            bodies = [(tokens[i % users], image_body(f"load-{i}")) for i in range(creates)]
            create_requests = [HTTPRequest(hub.service_url + "api/images", method="POST", body=json.dumps(body),
                                           headers={"Authorization": f"token {token}"}, request_timeout=300)
                               for token, body in bodies]
            created, codes, created_wall = await at_once(create_requests)
            accepted = codes.count(201)
            refused = [c for c in codes if c != 201]
            assert all(400 <= c < 500 for c in refused), f"creates answered {sorted(set(codes))}"
            listed = 0
            for token in tokens:
                r = await AsyncHTTPClient().fetch(get(hub.service_url + "api/images", token))
                listed += sum(1 for o in json.loads(r.body)["items"] if model.name_of(o).startswith("load-"))
            assert listed == accepted, f"{accepted} accepted, {listed} listed: lost or doubled"

            list_requests = [get(hub.service_url + "api/images", tokens[i % users]) for i in range(clients)]
            hub_requests = [get(hub.url + "hub/api/user", tokens[i % users]) for i in range(clients)]
            baseline, hub_codes, baseline_wall = await at_once(hub_requests)
            listing, list_codes, listing_wall = await at_once(list_requests)
            assert set(hub_codes) == {200} and set(list_codes) == {200}, (set(hub_codes), set(list_codes))
        finally:
            await stop_hub(hub)
    base = percentile(baseline, 99)
    print(f"\n1. {creates} creates from {users} users at once, then {clients} lists at once "
          f"({1000} images seeded in {seconds:.1f} s)")
    print(f"{'requests at once':44} {'n':>6} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'p99/hub':>9}")
    print(row("GET /hub/api/user (baseline)", baseline, baseline_wall, base))
    print(row("POST api/images", created, created_wall, base))
    print(row("GET api/images", listing, listing_wall, base))
    print(f"creates: {accepted} accepted, {len(refused)} refused (4xx), none lost (listed: {listed})")


async def growth_at(size: int, requests: int) -> str:
    """One row of the growth table: a hub on a store of `size` images."""
    with tempfile.TemporaryDirectory() as data_dir:
        seconds = seed(data_dir, size)
        hub = await start_quiet_hub(data_dir, wait_seconds=300, max_images_per_user=1000, reconcile=False)
        try:
            token = hub.token("owner3")  # owns seed-60 .. seed-79
            for _ in range(20):  # warm up connections and the token cache
                await timed(get(hub.service_url + "api/images", token))
                await timed(get(hub.url + "hub/api/user", token))
            listing, baseline = [], []
            for _ in range(requests):  # interleaved: both see the same machine
                latency, code = await timed(get(hub.service_url + "api/images", token))
                assert code == 200, code
                listing.append(latency)
                latency, code = await timed(get(hub.url + "hub/api/user", token))
                assert code == 200, code
                baseline.append(latency)
            r = await AsyncHTTPClient().fetch(get(hub.service_url + "api/images", token))
            assert len(json.loads(r.body)["items"]) == PER_OWNER
        finally:
            await stop_hub(hub)
    return json.dumps({"size": size, "seed": seconds, "p50": percentile(listing, 50),
                       "p99": percentile(listing, 99), "hub": percentile(baseline, 99)})


def run_child(*args: str) -> str:
    """One hub per process: JupyterHub's app is a process-wide singleton."""
    done = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{done.stderr[-4000:]}")
    return done.stdout


def main(args) -> None:
    out = run_child("--only", "concurrency", "--users", str(args.users), "--creates", str(args.creates),
                    "--clients", str(args.clients))
    print("".join(line for line in out.splitlines(keepends=True) if "[ConfigProxy]" not in line), end="")
    print(f"\n2. one user's GET api/images as the store grows ({args.requests} requests each, one at a time)")
    print(f"{'stored images':>14} {'seed s':>7} {'list p50 ms':>12} {'list p99 ms':>12} {'hub p99 ms':>11} "
          f"{'p99/hub':>8} {'p99/first':>10}")
    first = None
    for size in [int(s) for s in args.sizes.split(",")]:
        found = json.loads(run_child("--only", f"size={size}", "--requests", str(args.requests)).strip().splitlines()[-1])
        first = first or found["p99"]
        print(f"{size:14,d} {found['seed']:7.1f} {found['p50'] * 1000:12.2f} {found['p99'] * 1000:12.2f} "
              f"{found['hub'] * 1000:11.2f} {found['p99'] / found['hub']:8.2f} {found['p99'] / first:10.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--users", type=int, default=20)
    parser.add_argument("--creates", type=int, default=100)
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--only", help=argparse.SUPPRESS)  # one part, in a child process
    arguments = parser.parse_args()
    if arguments.only == "concurrency":
        asyncio.run(concurrency(arguments.users, arguments.creates, arguments.clients))
    elif arguments.only:
        print(asyncio.run(growth_at(int(arguments.only.split("=")[1]), arguments.requests)))
    else:
        main(arguments)
