"""Wire throughput: encode+send+recv+decode of 1024-event batches vs raw pyzmq, loopback TCP.

Both paths send the same bytes between two processes (a PUSH in this process, a PULL in a
child). The codec path encodes each batch and fully decodes and validates it (finiteness
included) on arrival; the raw path sends the same buffers and only receives them. Trials
alternate between the two so that both see the same machine noise.

    python -m benchmarks.stream_throughput [--batches 300] [--trials 5]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import statistics
import time

import zmq

from stream import EventBatch, decode, encode
from stream.testing import synthetic_batch
from stream.transport import free_tcp_port

BATCH_EVENTS = 1024


def receiver(port: int, done_port: int, n_messages: int, mode: str, trials: int) -> None:
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.setsockopt(zmq.RCVHWM, 16)
    pull.bind(f"tcp://127.0.0.1:{port}")
    done = ctx.socket(zmq.PUSH)
    done.connect(f"tcp://127.0.0.1:{done_port}")
    for _ in range(trials):
        for _ in range(n_messages):
            frames = pull.recv_multipart(copy=False)
            if mode == "codec":
                batch = decode(frames)
                assert isinstance(batch, EventBatch) and len(batch) == BATCH_EVENTS
        done.send(b"done")
    pull.close()
    done.close()
    ctx.term()


def trial_rates(mode: str, n_messages: int, trials: int, batch: EventBatch) -> list[float]:
    """Messages per second for each trial of one mode, through a fresh receiver process."""
    port, done_port = free_tcp_port(), free_tcp_port()
    ctx = zmq.Context()
    done = ctx.socket(zmq.PULL)
    done.bind(f"tcp://127.0.0.1:{done_port}")
    proc = mp.get_context("spawn").Process(
        target=receiver, args=(port, done_port, n_messages, mode, trials)
    )
    proc.start()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.SNDHWM, 16)
    push.connect(f"tcp://127.0.0.1:{port}")
    raw_frames = encode(batch)
    push.send_multipart(raw_frames, copy=False)  # warm-up connection: counted below
    rates = []
    for trial in range(trials):
        t0 = time.perf_counter()
        for _ in range(n_messages - (1 if trial == 0 else 0)):
            frames = encode(batch) if mode == "codec" else raw_frames
            push.send_multipart(frames, copy=False)
        done.recv()
        rates.append(n_messages / (time.perf_counter() - t0))
    proc.join()
    push.close()
    done.close()
    ctx.term()
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=300, help="messages per trial")
    parser.add_argument("--trials", type=int, default=5, help="alternating trials per mode")
    args = parser.parse_args()
    batch = synthetic_batch(BATCH_EVENTS)
    message_bytes = sum(memoryview(f).nbytes for f in encode(batch))
    rates: dict[str, list[float]] = {"raw": [], "codec": []}
    for _ in range(args.trials):
        for mode in ("raw", "codec"):
            rates[mode] += trial_rates(mode, args.batches, 1, batch)
    result = {
        "machine": f"{platform.machine()}, {mp.cpu_count()} cores",
        "batch_events": BATCH_EVENTS,
        "message_bytes": message_bytes,
    }
    for mode in ("raw", "codec"):
        median = statistics.median(rates[mode])
        result[f"{mode}_events_per_s"] = round(median * BATCH_EVENTS)
        result[f"{mode}_mb_per_s"] = round(median * message_bytes / 1e6, 1)
        print(
            f"{mode:>6}: {median * BATCH_EVENTS:12,.0f} events/s  "
            f"{median * message_bytes / 1e6:9,.1f} MB/s  (median of {len(rates[mode])} trials)"
        )
    ratios = [c / r for c, r in zip(rates["codec"], rates["raw"], strict=True)]
    result["ratio_codec_over_raw"] = round(statistics.median(ratios), 3)
    result["ratio_per_trial"] = [round(r, 3) for r in ratios]
    print(f"codec / raw pyzmq: {result['ratio_codec_over_raw']:.3f} (goal >= 0.7)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
