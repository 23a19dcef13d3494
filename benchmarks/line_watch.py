#!/usr/bin/env python
"""``lakead watch`` on real images (issue 29): latency to the MQTT broker, and what happens when
images arrive faster than the model scores them.

A LAKE model (MobileNetV2 ONNX of ../shared/models, block 400, k 32) is fitted on ``--shots``
train images of a real category and saved. Debian's mosquitto is started on a loopback port (the
benchmark stops, saying so, where it is not installed) and a subscriber records when each message
arrives.

1. **latency**: ``--images`` good test images are written into a watched folder one by one, each
   by a rename (complete at once), ``--interval`` seconds apart (slower than the model scores);
   the watch (``--settle``, poll 0.05 s) publishes each result to the broker. Latency: from the
   rename to the message's arrival at the subscriber, p50 and p99; beside it the result's own
   ``latency_s`` (file seen complete -> row written) and, on the same images in the same process,
   the time ``predict`` takes per image (read and score, one at a time, the model loaded: what
   ``lakead predict`` spends per image once started).
2. **faster than scoring**: a video file made of the same images (``--frames`` frames, MJPG) is
   watched with a queue of ``--queue`` items, once with ``--when-behind block`` and once with
   ``drop-oldest``: frames decode far faster than they are scored, so the queue fills. Items
   scored and dropped, items scored per second, and latency from the frame grab to the row.

    python benchmarks/line_watch.py --category magnetic_tile/tile --images 30 --out docs/line

The machine these figures come from has 2 cores shared with other developers: compare only
figures from one run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from realdata import add_options  # noqa: E402
from scale import loadavg  # noqa: E402


def start_broker(work: Path) -> tuple[subprocess.Popen, int]:
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(exe).exists():
        sys.exit("mosquitto is not installed (apt-get install mosquitto): the latency to a broker cannot be measured")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conf = work / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    proc = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            return proc, port
        except OSError:
            time.sleep(0.05)
    proc.kill()
    sys.exit("mosquitto did not start")


def quantiles(xs: list[float]) -> dict[str, float | None]:
    if not xs:
        return {"p50": None, "p99": None}
    return {"p50": float(np.quantile(xs, 0.5)), "p99": float(np.quantile(xs, 0.99))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_options(ap)
    ap.add_argument("--category", default="magnetic_tile/tile")
    ap.add_argument("--shots", type=int, default=16)
    ap.add_argument("--images", type=int, default=30)
    ap.add_argument("--interval", type=float, default=1.0)
    ap.add_argument("--settle", type=float, default=0.2)
    ap.add_argument("--frames", type=int, default=60)
    ap.add_argument("--queue", type=int, default=4)
    ap.add_argument("--out", default=None)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: on a loaded machine, two threads "
                    "each waiting on the other made small searches x8-x15 slower, the refit's and the update's alike)")
    args = ap.parse_args()

    import cv2
    import paho.mqtt.client as mqtt
    import torch
    from PIL import Image

    from lakead.backbones import load_backbone
    from lakead.line.sinks import MqttSink
    from lakead.line.watch import watch
    from lakead.methods.lake.detector import LakeDetector

    torch.set_num_threads(args.threads)
    root = Path(args.data) / args.category
    train = sorted((root / "train" / "good").glob("*.png"))[: args.shots]
    goods = sorted((root / "test" / "good").glob("*.png"))[: args.images]
    work = Path(tempfile.mkdtemp(prefix="line-watch-"))
    model = work / "model"
    bb = load_backbone(f"onnx:{args.model}", need_text=False)
    det = LakeDetector(bb, layer=args.layer, k=args.k, device="cpu").fit([str(p) for p in train], args.category)
    det.save(model)
    broker, port = start_broker(work)
    arrived: dict[str, float] = {}
    ready = threading.Event()
    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-subscriber")
    sub.on_connect = lambda c, u, f, rc, p=None: (c.subscribe("lakead/#", qos=1), ready.set())
    sub.on_message = lambda c, u, msg: arrived.setdefault(json.loads(msg.payload)["item"], time.time())
    sub.connect("127.0.0.1", port)
    sub.loop_start()
    ready.wait(10)
    try:
        # 1. latency: files arriving one by one, slower than scoring
        folder, out = work / "in", work / "out"
        folder.mkdir()
        complete: dict[str, float] = {}

        def write() -> None:
            time.sleep(1.0)
            for p in goods:
                tmp = folder / f".{p.name}.part"
                shutil.copyfile(p, tmp)
                os.rename(tmp, folder / p.name)
                complete[p.name] = time.time()
                time.sleep(args.interval)

        writer = threading.Thread(target=write)
        writer.start()
        summary = watch(model, str(folder), out, settle=args.settle, poll=0.05, idle_exit=3.0 + args.interval,
                        device="cpu", make_sinks=lambda r: [MqttSink(f"127.0.0.1:{port}", qos=1, model="bench")])
        writer.join()
        deadline = time.time() + 30
        while len(arrived) < len(goods) and time.time() < deadline:
            time.sleep(0.05)
        to_broker = [arrived[k] - complete[k] for k in complete if k in arrived]
        t_pred = []
        for p in goods:  # predict on the same images, one at a time, the model loaded
            t0 = time.perf_counter()
            det.predict([str(p)])
            t_pred.append(time.perf_counter() - t0)
        latency = {"images": len(goods), "published": len(to_broker), "interval_s": args.interval, "settle_s": args.settle,
                   "file_complete_to_broker_s": quantiles(to_broker), "seen_complete_to_row_s": quantiles(summary.latencies),
                   "predict_per_image_s": quantiles(t_pred)}
        print(json.dumps(latency))
        # 2. faster than scoring: a video file, each policy
        video = work / "line.avi"
        w = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 30.0, (224, 224))
        frames = [np.asarray(Image.open(p).convert("RGB").resize((224, 224))) for p in goods]
        for i in range(args.frames):
            w.write(frames[i % len(frames)][:, :, ::-1].copy())
        w.release()
        behind = {}
        for policy in ("block", "drop-oldest"):
            t0 = time.perf_counter()
            s = watch(model, str(video), work / f"out-{policy}", when_behind=policy, queue_size=args.queue, device="cpu")
            wall = time.perf_counter() - t0
            behind[policy] = {"frames": args.frames, "scored": s.scored, "dropped": s.dropped, "wall_s": wall,
                              "scored_per_s": s.scored / wall, "grab_to_row_s": quantiles(s.latencies)}
            print(policy, json.dumps(behind[policy]))
    finally:
        sub.loop_stop()
        broker.terminate()
        broker.wait(5)
        shutil.rmtree(work, ignore_errors=True)
    result = {"command": "python " + " ".join(sys.argv), "loadavg_end": loadavg(), "category": args.category,
              "latency": latency, "faster_than_scoring": behind}
    print(f"load average at the end: {result['loadavg_end']}")
    if args.out:
        o = Path(args.out)
        o.mkdir(parents=True, exist_ok=True)
        (o / "watch.json").write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {o / 'watch.json'}")


if __name__ == "__main__":
    main()
