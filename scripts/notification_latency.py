"""Latency of one notification between the rapid topology's workers (the prefill worker's
PrefillDone reaching the decode worker), for thread and process placement.

.venv/bin/python scripts/notification_latency.py [--n 2000]
"""

import argparse
import queue
import statistics
import threading
import time

import torch.multiprocessing as mp

from rapidserve.serving import messages as m


def echo(inbox, outbox) -> None:
    while True:
        msg = inbox.get()
        if isinstance(msg, m.Shutdown):
            return
        outbox.put(msg)


def measure(make_queue, make_worker, n: int) -> list[float]:
    a, b = make_queue(), make_queue()
    w = make_worker(target=echo, args=(a, b), daemon=True)
    w.start()
    times = []
    for i in range(n + 100):
        t = time.perf_counter()
        a.put(m.PrefillDone(str(i), i))
        b.get()
        if i >= 100:  # warm-up
            times.append((time.perf_counter() - t) / 2)  # one way = half the round trip
    a.put(m.Shutdown())
    w.join()
    return times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000)
    n = ap.parse_args().n
    ctx = mp.get_context("spawn")
    for name, mq, mw in (("thread", queue.Queue, threading.Thread), ("process", ctx.Queue, ctx.Process)):
        t = sorted(measure(mq, mw, n))
        print(f"{name:8s} one-way notification: median {statistics.median(t) * 1e6:7.1f} us, "
              f"p99 {t[int(0.99 * len(t))] * 1e6:7.1f} us over {n}")


if __name__ == "__main__":
    main()
