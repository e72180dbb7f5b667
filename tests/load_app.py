"""Load on the web app, measured as its users make it: `python app.py` on a free port, and 1, 4 and 8
gradio_client clients at once, each uploading a sample image and pressing Generate, again and again.
Prints requests per second and the median and 95th-percentile time of one request, for each
--concurrency asked for (1: one request decoded at a time; 8: up to 8 decoded together in one batch).

    python tests/load_app.py --checkpoint vlm_model.pt --concurrency 1 8 --rounds 6

The table in docs/webapp.md comes from it. Not a test (pytest does not collect it): it takes minutes.
"""
import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(checkpoint, concurrency, device, quantize, log):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "app.py", "--checkpoint", checkpoint, "--port", str(port),
                             "--device", device, "--concurrency", str(concurrency), "--quantize", quantize],
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return proc, url
        except OSError:
            if proc.poll() is not None:
                sys.exit(f"app.py did not start; see {log.name}")
            time.sleep(0.3)


def load(url, clients, rounds, settings):
    """clients threads, each rounds times upload + Generate: (requests/s, median s, p95 s)."""
    from gradio_client import Client, handle_file
    photos = sorted((ROOT / "data" / "images").glob("*.jpg"))
    connected = [Client(url, verbose=False) for _ in range(clients)]
    times, errors = [], []

    def one(k):
        for r in range(rounds):
            start = time.perf_counter()
            try:
                connected[k].predict(handle_file(photos[(k * rounds + r) % len(photos)]), *settings,
                                     api_name="/on_generate")
            except Exception as err:
                errors.append(repr(err))
            times.append(time.perf_counter() - start)

    threads = [threading.Thread(target=one, args=(k,)) for k in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    if errors:
        sys.exit(f"{len(errors)} requests failed, e.g. {errors[0]}")
    p95 = statistics.quantiles(times, n=20, method="inclusive")[-1] if len(times) > 1 else times[0]
    return len(times) / wall, statistics.median(times), p95


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="vlm_model.pt", help="checkpoint to serve (default: %(default)s)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8], help="app.py --concurrency values to compare")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8], help="clients at once (default: 1 4 8)")
    p.add_argument("--rounds", type=int, default=6, help="requests each client makes (default: %(default)s)")
    p.add_argument("--length", type=int, default=40, help="most new tokens per story (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="app.py --device (default: %(default)s)")
    p.add_argument("--quantize", default="none", help="app.py --quantize (default: %(default)s)")
    args = p.parse_args()
    settings = ("", "sample", 0.8, args.length, 1)  # the page's defaults, but the length
    print(f"| app.py --concurrency | clients | requests/s | median s | p95 s |\n|---|---|---|---|---|")
    for concurrency in args.concurrency:
        with tempfile.NamedTemporaryFile("w", prefix="load_app.", suffix=".log", delete=False) as log:
            proc, url = serve(args.checkpoint, concurrency, args.device, args.quantize, log)
            try:
                load(url, 1, 1, settings)  # warm-up: the first request pays for lazy imports
                for clients in args.clients:
                    rate, median, p95 = load(url, clients, args.rounds, settings)
                    print(f"| {concurrency} | {clients} | {rate:.2f} | {median:.2f} | {p95:.2f} |", flush=True)
            finally:
                proc.terminate()
                proc.wait(timeout=30)
        os.unlink(log.name)


if __name__ == "__main__":
    main()
