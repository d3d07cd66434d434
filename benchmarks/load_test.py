"""Load test of the app's /caption endpoint: N concurrent gradio_client clients x M requests, p50/p95 latency.

    python benchmarks/load_test.py --model checkpoints/shapes/best          # starts the app in-process
    python benchmarks/load_test.py --url http://127.0.0.1:7860/             # against a running app

Every request must succeed (exit code 1 otherwise); latencies are printed, not asserted.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def run_load_test(
    url: str, image: str | Path, clients: int = 16, requests_per_client: int = 5, decoding: str = "beam"
) -> dict[str, Any]:
    """Each client (own gradio_client.Client, own thread) sends its requests one after another."""
    from gradio_client import Client, handle_file

    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()
    start_together = threading.Barrier(clients)

    def one_client(index: int) -> None:
        try:
            client = Client(url, verbose=False)
        except Exception as error:  # noqa: BLE001 - every failure is counted and reported
            with lock:
                failures.extend([f"client {index}: connect: {error!r}"] * requests_per_client)
            start_together.abort()
            return
        try:
            start_together.wait(timeout=120)
        except threading.BrokenBarrierError:
            pass
        for request in range(requests_per_client):
            began = time.perf_counter()
            try:
                caption, data = client.predict(handle_file(str(image)), decoding, api_name="/caption")
                if not caption or len(data["attention"]) != len(data["words"]):
                    raise ValueError(f"incomplete answer: {caption!r}")
            except Exception as error:  # noqa: BLE001
                with lock:
                    failures.append(f"client {index} request {request}: {error!r}")
                continue
            with lock:
                latencies.append(time.perf_counter() - began)

    began = time.perf_counter()
    threads = [threading.Thread(target=one_client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - began
    times = np.asarray(latencies) if latencies else np.asarray([np.nan])
    return {
        "clients": clients,
        "requests": clients * requests_per_client,
        "succeeded": len(latencies),
        "failures": failures,
        "p50": float(np.percentile(times, 50)),
        "p95": float(np.percentile(times, 95)),
        "max": float(np.max(times)),
        "wall": wall,
        "throughput": len(latencies) / wall,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="base URL of a running app")
    where.add_argument("--model", help="checkpoint folder or Hub id: serve it in-process on a free port")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=5, help="requests per client")
    parser.add_argument("--decoding", choices=["greedy", "beam"], default="beam", help="beam = beam size 3")
    parser.add_argument("--image", default=str(ROOT / "examples" / "shapes_9.png"))
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "tests"))
    if args.url:
        stats = run_load_test(args.url, args.image, args.clients, args.requests, args.decoding)
    else:
        from app_helpers import build_app, serve
        from serving import load_captioner

        with serve(build_app(load_captioner(args.model), args.model)) as url:
            stats = run_load_test(url + "/", args.image, args.clients, args.requests, args.decoding)

    print(
        f"{stats['clients']} clients x {args.requests} requests ({args.decoding}): "
        f"{stats['succeeded']}/{stats['requests']} succeeded in {stats['wall']:.1f} s "
        f"({stats['throughput']:.2f} req/s); latency p50 {stats['p50']:.2f} s, p95 {stats['p95']:.2f} s, "
        f"max {stats['max']:.2f} s"
    )
    for failure in stats["failures"][:10]:
        print("FAILED:", failure)
    return 0 if not stats["failures"] else 1


if __name__ == "__main__":
    sys.exit(main())
