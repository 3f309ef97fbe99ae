"""Load on `medfm serve`: concurrent clients prompting uploaded images; latency, errors, server memory.

Starts ``medfm serve`` (the default model) on 127.0.0.1 and a free port as a separate process,
uploads ``--images`` copies of the bundled ultrasound image and the bundled CT volume, then runs
``--clients`` concurrent clients that each send ``--requests`` box prompts (each box jittered by a
few pixels). Client ``i`` prompts image ``i mod images`` (2D) or, every third client, a slice of
the CT volume chosen at random among 8, so encodings (first prompt of each image or slice) overlap
with prompts on images that are already encoded. Prints p50/p90/p99/max latency of the prompt
requests, the errors (must be 0), the throughput, the embeddings encoded, and the server process's
peak resident memory (VmHWM).

    python benchmarks/serve_load.py [--clients 20] [--requests 50] [--images 4]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from litemedsam_speed import cpu_name  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PNG = REPO / "examples" / "busi_benign_001.png"
CT = REPO / "examples" / "totalseg_example_ct.nii.gz"
PNG_BOX = (215, 107, 265, 132)
CT_BOX = (30, 30, 70, 70)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def peak_rss_mib(pid: int) -> float:
    """The process's peak resident set size (Linux VmHWM), MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc (Linux only)")


def start_server(port: int) -> subprocess.Popen:
    command = [sys.executable, "-c", "from medfm.cli import main; main()", "serve", "--port", str(port)]
    server = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"medfm serve exited with {server.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/health", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            time.sleep(0.2)
    server.terminate()
    raise RuntimeError("medfm serve did not answer within 120 s")


async def client(http: httpx.AsyncClient, target: dict, requests: int, seed: int, latencies: dict, errors: list) -> None:
    rng = random.Random(seed)
    for _ in range(requests):
        x0, y0, x1, y1 = (value + rng.randint(-3, 3) for value in target["box"])
        body = {"boxes": [[x0, y0, x1, y1]]}
        if target["slices"]:
            body["slice"] = rng.choice(target["slices"])
        started = time.perf_counter()
        try:
            response = await http.post(f"/v1/images/{target['id']}/segment", json=body)
            if response.status_code != 200:
                errors.append(f"{response.status_code} {response.text[:120]}")
        except httpx.HTTPError as error:
            errors.append(repr(error))
        latencies["CT" if target["slices"] else "2D"].append(time.perf_counter() - started)


async def run(url: str, clients: int, requests: int, images: int) -> tuple[dict[str, list[float]], list[str], float]:
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=httpx.Limits(max_connections=clients)) as http:
        targets = []
        for index in range(images):
            answer = (await http.post("/v1/images", files={"file": (f"busi_{index}.png", PNG.read_bytes())})).json()
            targets.append({"id": answer["id"], "box": PNG_BOX, "slices": None})
        volume = (await http.post("/v1/images", files={"file": ("ct.nii.gz", CT.read_bytes())}, data={"modality": "CT"})).json()
        ct_target = {"id": volume["id"], "box": CT_BOX, "slices": list(range(11, 19))}
        latencies: dict[str, list[float]] = {"2D": [], "CT": []}
        errors: list[str] = []
        started = time.perf_counter()
        await asyncio.gather(*(
            client(http, ct_target if i % 3 == 2 else targets[i % images], requests, i, latencies, errors) for i in range(clients)
        ))
        return latencies, errors, time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--requests", type=int, default=50, help="prompt requests per client")
    parser.add_argument("--images", type=int, default=4, help="2D uploads (plus one CT volume)")
    args = parser.parse_args(argv)

    load_before = os.getloadavg()[0]
    port = free_port()
    server = start_server(port)
    url = f"http://127.0.0.1:{port}"
    try:
        baseline = peak_rss_mib(server.pid)
        latencies, errors, seconds = asyncio.run(run(url, args.clients, args.requests, args.images))
        encoded = httpx.get(f"{url}/v1/health").json()["encoded"]
        peak = peak_rss_mib(server.pid)
    finally:
        server.terminate()
        server.wait(timeout=30)
    ms = np.asarray(latencies["2D"] + latencies["CT"]) * 1000
    by_kind = {kind: np.asarray(values) * 1000 for kind, values in latencies.items() if values}
    print(f"medfm serve under load: {cpu_name()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
          f"load average before the run {load_before:.1f}")
    print(f"{args.clients} clients x {args.requests} box prompts on {args.images} PNG uploads + 1 CT volume (8 slices)\n")
    rows = [
        ("requests", f"{len(ms)}"),
        ("errors", f"{len(errors)}"),
        ("latency p50", f"{np.percentile(ms, 50):.0f} ms"),
        ("latency p90", f"{np.percentile(ms, 90):.0f} ms"),
        ("latency p99", f"{np.percentile(ms, 99):.0f} ms"),
        ("latency max", f"{ms.max():.0f} ms"),
        *((f"p50 / p99, {kind} clients", f"{np.percentile(v, 50):.0f} / {np.percentile(v, 99):.0f} ms") for kind, v in by_kind.items()),
        ("throughput", f"{len(ms) / seconds:.1f} prompts/s"),
        ("slices encoded", f"{encoded}"),
        ("server peak RSS", f"{peak:.0f} MiB (after start-up {baseline:.0f} MiB)"),
    ]
    print("| measure | value |\n| --- | --- |")
    for name, value in rows:
        print(f"| {name} | {value} |")
    for error in errors[:5]:
        print("error:", error)
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
