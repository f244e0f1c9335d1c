"""API latency through the hub's proxy, as a ratio to the hub's own API.

1,000 images over 50 users; then, for one user, p50/p99 of `GET api/images` and
`GET api/images/{name}` through configurable-http-proxy, against the p99 of the hub's own
`GET /hub/api/user` measured in the same run with the same client. Goal: list p99 <= 3x.

    .venv/bin/python benchmarks/api_latency.py [--requests 300]
"""

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tornado.httpclient import AsyncHTTPClient  # noqa: E402

from tests.hubfixtures import start_quiet_hub, stop_hub  # noqa: E402

USERS = 50
IMAGES_PER_USER = 20


def percentile(samples, p):
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


async def timed(fetch, n):
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        response = await fetch()
        samples.append(time.perf_counter() - start)
        assert response.code == 200, response.code
    return samples


async def main(requests: int) -> None:
    with tempfile.TemporaryDirectory() as data_dir:
        hub = await start_quiet_hub(data_dir, max_images_per_user=IMAGES_PER_USER)
        try:
            tokens = [hub.token(f"user{i}") for i in range(USERS)]
            seed_start = time.perf_counter()
            for i, token in enumerate(tokens):
                for j in range(IMAGES_PER_USER):
                    body = {"metadata": {"name": f"u{i}-img{j}"},
                            "spec": {"buildType": "PackageList", "baseImage": "quay.io/a/b:1",
                                     "packageVersions": ["pandas>=2", "scikit-learn", "matplotlib"]}}
                    r = await hub.api("POST", "api/images", token, body)
                    assert r.code == 201, r.body
            print(f"seeded {USERS * IMAGES_PER_USER} images in {time.perf_counter() - seed_start:.1f}s")

            token = tokens[7]
            client = AsyncHTTPClient()
            headers = {"Authorization": f"token {token}"}
            hub_api = hub.url + "hub/api/user"
            list_url = hub.service_url + "api/images"
            get_url = hub.service_url + "api/images/u7-img3"
            for url in (hub_api, list_url, get_url):  # warm up connections and token caches
                await timed(lambda url=url: client.fetch(url, headers=headers), 20)

            baseline = await timed(lambda: client.fetch(hub_api, headers=headers), requests)
            listing = await timed(lambda: client.fetch(list_url, headers=headers), requests)
            single = await timed(lambda: client.fetch(get_url, headers=headers), requests)
        finally:
            await stop_hub(hub)

    base_p99 = percentile(baseline, 99)
    print(f"requests per route: {requests}")
    print(f"{'route':34} {'p50 ms':>8} {'p99 ms':>8} {'p99 / hub p99':>14}")
    for label, samples in [("GET /hub/api/user (baseline)", baseline),
                           ("GET api/images (20 of 1000)", listing),
                           ("GET api/images/{name}", single)]:
        p50, p99 = percentile(samples, 50), percentile(samples, 99)
        print(f"{label:34} {p50 * 1000:8.2f} {p99 * 1000:8.2f} {p99 / base_p99:14.2f}")
    ratio = percentile(listing, 99) / base_p99
    print(f"goal: list p99 <= 3.00x hub p99 -> {ratio:.2f}x ({'met' if ratio <= 3 else 'NOT met'})")
    print(f"mean list latency {statistics.mean(listing) * 1000:.2f} ms")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=300)
    asyncio.run(main(parser.parse_args().requests))
