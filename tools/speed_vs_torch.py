#!/usr/bin/env python3
"""speed_vs_torch.py: moelab against the PyTorch rebuild, side by side.

Trains the top-2 reference model (experiments/moe_reference.lua: 4 layers,
d_model 128, 4 heads, context 128, 8 experts of hidden 128, top-2, batch 16)
in moelab through run:train (tools/speed_moelab.lua) and in PyTorch with
tools/torch_ref.py at 1 and at 2 threads, interleaved R times
(moelab, torch-1, torch-2, moelab, ...), and prints the median per-step
tokens/s of each over steps FIRST..N with its spread, and the ratios.

    python3 tools/speed_vs_torch.py [--steps 150] [--repeats 3] [--first 20]
        [--moelab ./moelab] [--data data/kjv.txt] [--python /usr/bin/python3]
        [--moelab-threads 0] [--no-passive]

This driver needs only Python's standard library; the PyTorch runs use
--python (Debian's /usr/bin/python3, where python3-torch is installed).
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TOKENS_PER_STEP = 16 * 128  # batch 16 x context 128, both systems
TORCH_MODEL = ["--moe-experts", "8", "--moe-hidden", "128", "--router", "topk", "--k", "2",
               "--balance", "0.01", "--batch", "16", "--context", "128"]


class Fail(Exception):
    pass


def run(cmd, env=None):
    """Runs cmd and returns the last JSON line of its stdout and the seconds it took."""
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        raise Fail("%s exited with %d:\n%s%s" % (" ".join(cmd), p.returncode, p.stdout[-2000:],
                                                 p.stderr[-2000:]))
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line), dt
    raise Fail("%s printed no JSON line:\n%s%s" % (" ".join(cmd), p.stdout[-2000:], p.stderr[-2000:]))


def step_rates(out, steps, first, who):
    secs = out.get("step_seconds")
    if not isinstance(secs, list) or len(secs) != steps:
        raise Fail("%s: expected %d step times, got %r" % (who, steps, None if secs is None else len(secs)))
    if any(s <= 0 for s in secs):
        raise Fail("%s: a step time is not positive" % who)
    return [TOKENS_PER_STEP / s for s in secs[first - 1:]]  # steps first..N (1-based)


def spread(rates):
    q1, med, q3 = statistics.quantiles(rates, n=4, method="inclusive")
    return {"min": min(rates), "q1": q1, "median": med, "q3": q3, "max": max(rates)}


def uptime():
    try:
        return subprocess.run(["uptime"], stdout=subprocess.PIPE, text=True).stdout.strip()
    except OSError:
        with open("/proc/loadavg") as f:
            return "load average " + f.read().strip()


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=150, help="training steps per run (default 150)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds (default 3)")
    ap.add_argument("--first", type=int, default=20,
                    help="first step measured (1-based; default 20): steps FIRST..N count")
    ap.add_argument("--moelab", default="./moelab", help="the moelab binary (default ./moelab)")
    ap.add_argument("--data", default="data/kjv.txt", help="the corpus (default data/kjv.txt)")
    ap.add_argument("--python", default="/usr/bin/python3",
                    help="the Python with torch (default /usr/bin/python3)")
    ap.add_argument("--moelab-threads", type=int, default=0,
                    help="run:train's threads (default 0: all cores)")
    ap.add_argument("--no-passive", dest="passive", action="store_false",
                    help="skip the 2-thread torch run with OMP_WAIT_POLICY=passive")
    a = ap.parse_args(argv)
    if a.steps < 2 or a.repeats < 1 or not 1 <= a.first < a.steps:
        ap.error("need --steps >= 2, --repeats >= 1 and 1 <= --first < --steps")
    moelab = os.path.abspath(a.moelab)
    data = os.path.abspath(a.data)
    lua = os.path.join(HERE, "speed_moelab.lua")
    torch_ref = os.path.join(HERE, "torch_ref.py")
    if not os.access(moelab, os.X_OK):
        raise Fail("no moelab binary at %s (build it with make, or give --moelab)" % moelab)
    if not os.path.isfile(data):
        raise Fail("no corpus at %s (make data, or give --data)" % data)
    python = shutil.which(a.python)
    p = subprocess.run([python, "-c", "import torch; print(torch.__version__)"],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) \
        if python else None
    if p is None or p.returncode != 0:
        raise Fail("%s cannot import torch%s; install python3-torch (Debian) or give --python"
                   % (a.python, "" if p is None else ": " + (p.stderr.strip().splitlines() or [""])[-1]))
    torch_version = p.stdout.strip()

    base_env = dict(os.environ)
    # torch-2 waits as moelab does (a short spin, then sleep: GOMP_SPINCOUNT=300,
    # moelab's default), torch-2p sleeps at once (OMP_WAIT_POLICY=passive)
    torch_env = {"torch-1": dict(base_env, OPENBLAS_NUM_THREADS="1"),
                 "torch-2": dict(base_env, OPENBLAS_NUM_THREADS="1", GOMP_SPINCOUNT="300"),
                 "torch-2p": dict(base_env, OPENBLAS_NUM_THREADS="1", OMP_WAIT_POLICY="passive")}
    systems = ["moelab", "torch-1", "torch-2"] + (["torch-2p"] if a.passive else [])
    rates = {s: [] for s in systems}
    medians = {s: [] for s in systems}
    threads = {}
    params = {}

    print("speed_vs_torch: top-2 reference model, batch 16 x context 128, %d steps per run, "
          "steps %d..%d measured, %d round(s)" % (a.steps, a.first, a.steps, a.repeats))
    print("cpu: %s (%d online)" % (cpu_model(), os.cpu_count() or 0))
    print("OPENBLAS_CORETYPE: %s" % os.environ.get("OPENBLAS_CORETYPE", "(unset)"))
    print("moelab: %s, threads %s; OMP_WAIT_POLICY %s, GOMP_SPINCOUNT %s" % (
        moelab, a.moelab_threads or "all cores (%d)" % (os.cpu_count() or 0),
        os.environ.get("OMP_WAIT_POLICY", "(unset)"),
        os.environ.get("GOMP_SPINCOUNT", "(unset: moelab sets 300)")))
    print("torch: %s via %s; OPENBLAS_NUM_THREADS=1; 2 threads with GOMP_SPINCOUNT=300%s" % (
        torch_version, python, " and with OMP_WAIT_POLICY=passive (torch-2p)" if a.passive else ""))
    print("before: %s" % uptime())
    sys.stdout.flush()
    with tempfile.TemporaryDirectory(prefix="speed_vs_torch.") as tmp:
        for r in range(a.repeats):
            for s in systems:
                if s == "moelab":
                    cmd = [moelab, "run", lua, "db=%s" % os.path.join(tmp, "run%d.db" % r),
                           "steps=%d" % a.steps, "data=%s" % data, "threads=%d" % a.moelab_threads]
                    out, dt = run(cmd)
                    threads[s] = a.moelab_threads or os.cpu_count()
                else:
                    n = 1 if s == "torch-1" else 2
                    cmd = [python, torch_ref, "train", "--data", data, "--steps", str(a.steps),
                           "--threads", str(n), "--eval-batches", "1", "--eval-batch", "1",
                           "--no-full-val", "--step-times"] + TORCH_MODEL
                    out, dt = run(cmd, env=torch_env[s])
                    threads[s] = out.get("threads")
                params.setdefault(s, out.get("params"))
                x = step_rates(out, a.steps, a.first, s)
                rates[s] += x
                medians[s].append(statistics.median(x))
                print("  round %d  %-8s median %8.0f tokens/s  (run %.1f s)"
                      % (r + 1, s, medians[s][-1], dt))
                sys.stdout.flush()
    print("after:  %s" % uptime())
    if len(set(params.values())) != 1:
        raise Fail("the systems trained models of different sizes: %r" % params)
    print("parameters: %d (all systems)" % params["moelab"])
    print()
    print("per-step tokens/s over steps %d..%d, all rounds pooled (%d steps each):"
          % (a.first, a.steps, len(rates["moelab"])))
    print("%-8s %7s %8s %8s %8s %8s %8s  %s"
          % ("system", "threads", "min", "q1", "median", "q3", "max", "median per round"))
    stats = {}
    for s in systems:
        st = stats[s] = spread(rates[s])
        print("%-8s %7s %8.0f %8.0f %8.0f %8.0f %8.0f  %s"
              % (s, threads[s], st["min"], st["q1"], st["median"], st["q3"], st["max"],
                 " ".join("%.0f" % m for m in medians[s])))
    m = stats["moelab"]["median"]
    torches = [s for s in systems if s != "moelab"]
    fastest = max(torches, key=lambda s: stats[s]["median"])
    print()
    for s in torches:
        print("moelab / %-8s %.2fx" % (s + ":", m / stats[s]["median"]))
    print("moelab / fastest torch (%s): %.2fx" % (fastest, m / stats[fastest]["median"]))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except Fail as e:
        print("speed_vs_torch: %s" % e, file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
