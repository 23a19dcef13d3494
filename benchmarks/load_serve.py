"""Load test of ``lakead serve``: concurrent predictions; latency percentiles and errors.

Loopback only: the service is either started here (the default: ``python -m lakead.cli serve``
in a subprocess, over a temporary models directory, with a model fitted through the API) or
an already running one given with ``--url``, which must resolve to a loopback address.
Bounded: at most ``--requests`` requests and ``--duration`` seconds. Exits 1 when any
request failed. Needs the serve extra and httpx (``pip install 'lakead[serve,test]'``).

    # service overhead, with the tiny random CLIP and generated 256 px images
    python benchmarks/load_serve.py --preset tiny --fit-option k=8 --fit-option layer=2

    # a ViT-B/16-sized CLIP (random weights, real arithmetic) on real 800x600 images
    python benchmarks/load_serve.py --preset vit-b-16 --fit-option layer=9 \\
        --normal ../shared/data/mvtec3d_tire/tire/train/good --images ../shared/data/mvtec3d_tire/tire/test

    # a running service and one of its models
    python benchmarks/load_serve.py --url http://127.0.0.1:8000 --token T --model screw-1a2b3c4d --images DIR
"""

from __future__ import annotations

import argparse
import io
import ipaddress
import json
import math
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np


def loopback_only(url: str) -> None:
    host = urlsplit(url).hostname
    if not host:
        sys.exit(f"error: --url {url!r} has no host")
    try:
        addrs = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except socket.gaierror as exc:
        sys.exit(f"error: cannot resolve {host!r}: {exc}")
    if not all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addrs):
        sys.exit(f"error: {host} resolves to {sorted(addrs)}: this load test runs against loopback addresses only")


def texture_pngs(n: int, size: int, seed: int) -> list[tuple[str, bytes]]:
    """Smoothed-noise textures (normal-looking images) as PNG bytes."""
    from PIL import Image
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        t = gaussian_filter(rng.normal(0.0, 1.0, (size, size)), 1.5)
        t = (0.3 + 0.4 * (t - t.min()) / (t.max() - t.min())) * 255
        buf = io.BytesIO()
        Image.fromarray(np.repeat(t[:, :, None], 3, axis=2).astype(np.uint8)).save(buf, format="PNG")
        out.append((f"texture_{seed}_{i:03d}.png", buf.getvalue()))
    return out


def image_files(spec: str, limit: int | None) -> list[tuple[str, bytes]]:
    from lakead.images import list_images

    paths = list_images([spec])[:limit]
    return [(str(p.relative_to(spec)) if Path(spec).is_dir() else p.name, p.read_bytes()) for p in paths]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Spawned:
    """``lakead serve`` in a subprocess, stopped on exit."""

    def __init__(self, backbone: str, device: str, workers: int, token: str | None, tmp: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / "serve.log"
        cmd = [sys.executable, "-m", "lakead.cli", "--quiet", "serve", "--models-dir", str(tmp / "models"),
               "--backbone", backbone, "--port", str(self.port), "--device", device, "--workers", str(workers)]
        env = dict(os.environ, HF_HUB_OFFLINE="1", **({"LAKEAD_TOKEN": token} if token else {}))
        self.proc = subprocess.Popen(cmd, stdout=self.log.open("w"), stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, client, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                sys.exit(f"error: the service exited with status {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                if client.get(self.url + "/healthz").status_code == 200:
                    return
            except Exception:  # noqa: BLE001 - not listening yet
                pass
            time.sleep(0.2)
        sys.exit(f"error: the service did not answer within {timeout:.0f} s:\n{self.log.read_text()}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else math.nan


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[1:]))
    ap.add_argument("--url", help="a running service (loopback only); default: start one")
    ap.add_argument("--token", help="the service's token (default: $LAKEAD_TOKEN)", default=os.environ.get("LAKEAD_TOKEN"))
    ap.add_argument("--model", help="id of an existing model; default: fit one through the API")
    ap.add_argument("--backbone", help="backbone of a started service (a local CLIP directory)")
    ap.add_argument("--preset", default="tiny", help="random CLIP preset built when no --backbone is given (lakead.testing)")
    ap.add_argument("--device", default="cpu", help="device of a started service")
    ap.add_argument("--workers", type=int, default=2, help="prediction workers of a started service")
    ap.add_argument("--normal", help="folder of normal images for the fitted model (default: generated textures)")
    ap.add_argument("--shots", type=int, default=8, help="normal images for the fitted model")
    ap.add_argument("--fit-option", action="append", default=[], metavar="NAME=VALUE", help="a detector option for the fit")
    ap.add_argument("--images", help="folder or file of test images (default: generated textures)")
    ap.add_argument("--size", type=int, default=256, help="side of generated images, pixels")
    ap.add_argument("--requests", type=int, default=200, help="most prediction requests")
    ap.add_argument("--duration", type=float, default=120.0, help="most seconds of load (requests still running finish)")
    ap.add_argument("--concurrency", type=int, default=8, help="requests in flight at once")
    ap.add_argument("--batch", type=int, default=1, help="images per request")
    ap.add_argument("--warmup", type=int, default=2, help="requests sent first and not counted")
    ap.add_argument("--attack", type=int, default=0, metavar="N",
                    help="N attacker threads beside the normal traffic, taking turns at the memory attack (a blank "
                         "6000x6000 PNG to predict, 11 per request) and the CPU attack (a model created at the largest "
                         "input size the server allows); their answers are counted apart, the errors of normal requests alone fail the run")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)
    for name in ("requests", "concurrency", "batch", "shots"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be at least 1")

    import httpx

    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    client = httpx.Client(headers=headers, timeout=600.0, limits=httpx.Limits(max_connections=args.concurrency + 2))
    tmp_dir = tempfile.TemporaryDirectory(prefix="lakead-load-")
    tmp = Path(tmp_dir.name)
    server = None
    try:
        if args.url:
            loopback_only(args.url)
            url = args.url.rstrip("/")
            backbone = None
        else:
            backbone = args.backbone
            if backbone is None:
                from lakead.testing import save_random_clip

                backbone = str(save_random_clip(tmp / f"clip-{args.preset}", args.preset))
            server = Spawned(backbone, args.device, args.workers, args.token, tmp)
            url = server.url
            server.wait_ready(client)

        info = client.get(url + "/info")
        if info.status_code != 200:
            sys.exit(f"error: GET /info answered {info.status_code}: {info.text}")
        info = info.json()
        model_id = args.model
        fit_seconds = None
        if model_id is None:
            normal = image_files(args.normal, args.shots) if args.normal else texture_pngs(args.shots, args.size, seed=1)
            form = dict(o.split("=", 1) for o in args.fit_option)
            form.setdefault("class_name", "part")
            t0 = time.perf_counter()
            r = client.post(url + "/models", data=form, files=[("images", (n, b, "application/octet-stream")) for n, b in normal])
            fit_seconds = time.perf_counter() - t0
            if r.status_code != 201:
                sys.exit(f"error: creating the model answered {r.status_code}: {r.text}")
            model_id = r.json()["id"]
        model = client.get(f"{url}/models/{model_id}")
        if model.status_code != 200:
            sys.exit(f"error: GET /models/{model_id} answered {model.status_code}: {model.text}")
        model = model.json()

        tests = image_files(args.images, None) if args.images else texture_pngs(16, args.size, seed=2)
        endpoint = f"{url}/models/{model_id}/predict"
        lock = threading.Lock()
        issued = 0
        latencies: list[float] = []
        errors: list[str] = []
        stop_at = [math.inf]

        def one(k: int) -> tuple[float, str | None]:
            batch = [tests[(k * args.batch + j) % len(tests)] for j in range(args.batch)]
            t0 = time.perf_counter()
            try:
                r = client.post(endpoint, files=[("images", (n, b, "application/octet-stream")) for n, b in batch])
            except httpx.HTTPError as exc:
                return time.perf_counter() - t0, f"{type(exc).__name__}: {exc}"
            dt = time.perf_counter() - t0
            if r.status_code != 200:
                return dt, f"HTTP {r.status_code}: {r.text[:200]}"
            res = r.json()["results"]
            if len(res) != len(batch) or not all(math.isfinite(x["score"]) and x["overlay_png"] for x in res):
                return dt, "incomplete answer"
            return dt, None

        for k in range(args.warmup):
            _, problem = one(k)
            if problem:
                errors.append(f"warm-up: {problem}")

        def worker() -> None:
            nonlocal issued
            while True:
                with lock:
                    if issued >= args.requests or time.perf_counter() > stop_at[0]:
                        return
                    k = issued
                    issued += 1
                dt, problem = one(k)
                with lock:
                    latencies.append(dt)
                    if problem:
                        errors.append(problem)

        attacks: dict[str, int] = {}  # "memory 413" -> count
        done = threading.Event()

        def attacker(a: int) -> None:
            from PIL import Image

            buf = io.BytesIO()
            Image.new("RGB", (6000, 6000)).save(buf, format="PNG")
            bomb = buf.getvalue()  # about 100 kB that decodes to 108 MB
            small = texture_pngs(2, 64, seed=3)
            size = int(info.get("limits", {}).get("max_image_size") or 1024)
            turn = a
            while not done.is_set():
                kind = "memory" if turn % 2 == 0 else "cpu"
                turn += 1
                try:
                    if kind == "memory":
                        r = client.post(endpoint, files=[("images", (f"bomb{i}.png", bomb, "image/png")) for i in range(11)])
                    else:
                        r = client.post(url + "/models", data={"class_name": "attack", "image_size": str(size)},
                                        files=[("images", (n, b, "image/png")) for n, b in small])
                        if r.status_code == 201:
                            client.delete(f"{url}/models/{r.json()['id']}")
                    key = f"{kind} {r.status_code}"
                except httpx.HTTPError as exc:
                    key = f"{kind} {type(exc).__name__}"
                with lock:
                    attacks[key] = attacks.get(key, 0) + 1

        load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        t_start = time.perf_counter()
        stop_at[0] = t_start + args.duration
        with ThreadPoolExecutor(args.concurrency + args.attack) as pool:
            bad = [pool.submit(attacker, a) for a in range(args.attack)]
            for f in [pool.submit(worker) for _ in range(args.concurrency)]:
                f.result()
            done.set()
            for f in bad:
                f.result()
        wall = time.perf_counter() - t_start
        peak_rss_mb = None
        if server is not None:
            try:
                status = Path(f"/proc/{server.proc.pid}/status").read_text()
                peak_rss_mb = int(next(l.split()[1] for l in status.splitlines() if l.startswith("VmHWM:"))) / 1024
            except (OSError, StopIteration, ValueError):
                pass
    finally:
        if server is not None:
            server.stop()
        client.close()

    ms = [v * 1000 for v in latencies]
    sizes = sorted({len(b) for _, b in tests})
    result = {
        "command": "python benchmarks/load_serve.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "service": url if args.url else "started here (python -m lakead.cli serve)",
        "backbone": model["backbone"], "device": info["device"], "workers": args.workers if server else None,
        "model": model_id, "model_image_size": model["image_size"], "model_support_images": model["support_images"],
        "fit_seconds": fit_seconds,
        "test_images": len(tests), "test_image_bytes": [sizes[0], sizes[-1]],
        "requests": len(latencies), "images_per_request": args.batch, "concurrency": args.concurrency,
        "errors": len(errors), "first_errors": errors[:5],
        "attackers": args.attack, "attack_answers": dict(sorted(attacks.items())),
        "server_peak_rss_mb": peak_rss_mb,
        "latency_ms": {"p50": percentile(ms, 50), "p95": percentile(ms, 95), "p99": percentile(ms, 99),
                       "max": max(ms) if ms else math.nan, "mean": float(np.mean(ms)) if ms else math.nan},
        "wall_seconds": wall,
        "requests_per_second": len(latencies) / wall if wall > 0 else math.nan,
        "images_per_second": len(latencies) * args.batch / wall if wall > 0 else math.nan,
        "machine": {"cpus": os.cpu_count(), "load_average_1min_before": load_before, "platform": platform.platform(),
                    "python": platform.python_version()},
    }
    lat = result["latency_ms"]
    print(f"lakead load test: {result['requests']} request(s) x {args.batch} image(s), concurrency {args.concurrency}, "
          f"model {model_id} (backbone {model['backbone']}, {model['image_size']} px, device {info['device']})")
    if fit_seconds is not None:
        print(f"model fitted through the API on {model['support_images']} image(s) in {fit_seconds:.2f} s")
    print(f"errors: {len(errors)}" + "".join(f"\n  {e}" for e in errors[:5]))
    if args.attack:
        print(f"attack answers ({args.attack} attacker(s)): " + ", ".join(f"{k}: {v}" for k, v in sorted(attacks.items())))
    if peak_rss_mb is not None:
        print(f"server peak resident memory: {peak_rss_mb:.0f} MB")
    print(f"latency ms: p50 {lat['p50']:.1f}  p95 {lat['p95']:.1f}  p99 {lat['p99']:.1f}  max {lat['max']:.1f}  mean {lat['mean']:.1f}")
    print(f"throughput: {result['requests_per_second']:.2f} requests/s, {result['images_per_second']:.2f} images/s "
          f"over {wall:.1f} s on {os.cpu_count()} CPU(s)" + (f" (1-min load average {load_before:.2f} before)" if load_before is not None else ""))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    tmp_dir.cleanup()
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
