#!/usr/bin/env python3
"""Soak: Redis + one API + two workers under steady load, a worker killed (SIGKILL) and restarted
every --kill-every seconds for --minutes; then every accepted job is accounted for.

    python3 tests/soak/redis_soak.py --flowgen target/release/flowgen --minutes 5

Prints (and writes to --out/summary.json): accepted, succeeded, failed, lost (accepted but unknown
or never finished: must be 0), attempts, the worst re-delivery delay (a dead worker's last
heartbeat to another worker taking its job, from the workers' logs), and throughput. Not a CI test:
it takes minutes and shares the machine's cores between the workers.
"""

import argparse
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(method, url, body=None, headers=None, timeout=10):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    if data is not None:
        req.add_header("content-type", "application/json")
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return resp.status, json.loads(resp.read() or b"null")


class Process:
    def __init__(self, name, argv, log_dir, env):
        self.name, self.argv, self.env = name, argv, env
        self.log_path = os.path.join(log_dir, f"{name}.log")
        self.restarts = 0
        self.start()

    def start(self):
        log = open(self.log_path, "a")
        log.write(f"\n---- start {self.restarts} at {time.time():.3f}\n")
        log.flush()
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=log, env=self.env, text=True)
        line = self.proc.stdout.readline()
        match = re.search(r"http://(\S+)", line)
        if not match:
            raise SystemExit(f"{self.name} did not start: {line!r}; see {self.log_path}")
        self.base = "http://" + match.group(1)
        deadline = time.time() + 120
        while True:
            try:
                if request("GET", self.base + "/ready", timeout=2)[0] == 200:
                    return
            except (urllib.error.URLError, OSError, ValueError):
                pass
            if time.time() > deadline:
                raise SystemExit(f"{self.name} never became ready; see {self.log_path}")
            time.sleep(0.1)

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def restart(self):
        self.restarts += 1
        self.start()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--flowgen", default="target/release/flowgen")
    ap.add_argument("--model", default="models/default")
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--kill-every", type=float, default=20.0)
    ap.add_argument("--rate", type=float, default=2.0, help="jobs submitted per second")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--visibility", type=int, default=30, help="queue.visibility_timeout_s")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    work = args.out or tempfile.mkdtemp(prefix="flowgen-soak-")
    os.makedirs(work, exist_ok=True)
    redis_port = free_port()
    redis = subprocess.Popen(
        ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "yes", "--appendfsync", "always", "--dir", work],
        stdout=open(os.path.join(work, "redis.log"), "w"))
    time.sleep(0.5)
    url = f"redis://127.0.0.1:{redis_port}/0"
    env = dict(os.environ, RUST_LOG="info", FLOWGEN_QUEUE__VISIBILITY_TIMEOUT_S=str(args.visibility),
               FLOWGEN_QUEUE__CAPACITY="4096", FLOWGEN_QUEUE__MAX_QUEUED_PER_KEY="4096")
    env.pop("FLOWGEN_MODEL", None)
    common = ["--queue", url, "--model", args.model, "--data-dir", os.path.join(work, "data")]
    serve = [args.flowgen, "serve", "--listen", "127.0.0.1:0"]
    api = Process("api", serve + ["--role", "api"] + common, work, env)
    workers = [Process(f"worker{i}", serve + ["--role", "worker"] + common, work, env) for i in range(2)]
    print(f"redis {url}, api {api.base}, 2 workers; logs in {work}", flush=True)

    accepted, refused, lock = [], [], threading.Lock()
    stop = threading.Event()

    def load():
        n = 0
        next_at = time.time()
        while not stop.is_set():
            n += 1
            key = f"soak-{n}"
            body = {"label": n % 10, "seed": n, "n": 1 + n % 2, "sampler": "euler", "steps": args.steps}
            for attempt in range(20):
                try:
                    status, view = request("POST", api.base + "/v1/generations", body, {"idempotency-key": key})
                    with lock:
                        accepted.append(view["id"])
                    break
                except urllib.error.HTTPError as e:
                    if e.code in (429, 503):
                        time.sleep(0.5)
                        continue
                    with lock:
                        refused.append((key, e.code))
                    break
                except (urllib.error.URLError, OSError):
                    time.sleep(0.5)  # the same key again: never two jobs for one request
            next_at += 1.0 / args.rate
            time.sleep(max(0.0, next_at - time.time()))

    loader = threading.Thread(target=load, daemon=True)
    loader.start()
    started = time.time()
    kills = []
    victim = 0
    end = started + args.minutes * 60
    next_kill = started + args.kill_every
    while time.time() < end:
        time.sleep(min(1.0, max(0.0, next_kill - time.time())))
        if time.time() >= next_kill and time.time() < end:
            w = workers[victim]
            w.kill()
            kills.append(time.time())
            w.restart()
            victim = 1 - victim
            # Jittered, so kills do not fall at the same point of the submission rhythm.
            next_kill += args.kill_every + random.uniform(-2.0, 2.0)
            with lock:
                n = len(accepted)
            print(f"[{time.time() - started:6.1f} s] killed and restarted {w.name}; {n} jobs accepted", flush=True)
    stop.set()
    loader.join()
    load_s = time.time() - started

    # Every accepted job must end; the last kill's jobs need the visibility timeout.
    deadline = time.time() + 3 * args.visibility + 120
    final = {}
    pending = list(accepted)
    while pending and time.time() < deadline:
        still = []
        for job in pending:
            try:
                _, view = request("GET", f"{api.base}/v1/generations/{job}")
            except urllib.error.HTTPError as e:
                final[job] = {"status": f"http {e.code}"}
                continue
            if view["status"] in ("succeeded", "failed", "cancelled"):
                final[job] = view
            else:
                still.append(job)
        pending = still
        if pending:
            time.sleep(1)
    drained_s = time.time() - started
    for job in pending:
        final[job] = {"status": "never finished"}

    statuses = {}
    attempts = {}
    for view in final.values():
        statuses[view["status"]] = statuses.get(view["status"], 0) + 1
        if "attempts" in view:
            attempts[view["attempts"]] = attempts.get(view["attempts"], 0) + 1
    silent = []
    for w in workers:
        for line in open(w.log_path):
            m = re.search(r"silent_ms=(\d+)", re.sub(r"\x1b\[[0-9;]*m", "", line))
            if m:
                silent.append(int(m.group(1)))
    succeeded = statuses.get("succeeded", 0)
    images = sum(len(v.get("images", [])) for v in final.values())
    summary = {
        "minutes": args.minutes,
        "kill_every_s": args.kill_every,
        "kills": len(kills),
        "visibility_timeout_s": args.visibility,
        "accepted": len(accepted),
        "succeeded": succeeded,
        "failed": statuses.get("failed", 0),
        "cancelled": statuses.get("cancelled", 0),
        "lost": len(accepted) - sum(statuses.get(s, 0) for s in ("succeeded", "failed", "cancelled")),
        "refused": len(refused),
        "attempts": {str(k): v for k, v in sorted(attempts.items())},
        "taken_over": len(silent),
        "worst_redelivery_s": max(silent) / 1000 if silent else None,
        "median_redelivery_s": sorted(silent)[len(silent) // 2] / 1000 if silent else None,
        "images": images,
        "load_s": round(load_s, 1),
        "drained_after_s": round(drained_s, 1),
        "images_per_s": round(images / drained_s, 2),
    }
    print(json.dumps(summary, indent=2))
    with open(os.path.join(work, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    for p in [api] + workers:
        p.stop()
    redis.terminate()
    sys.exit(0 if summary["lost"] == 0 and summary["failed"] == 0 else 1)


if __name__ == "__main__":
    main()
