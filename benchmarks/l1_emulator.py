"""L1 emulator speed and exactness: integer kernel and bridge vs hls4ml predict() vs Keras.

On the same rounded L1 background events, in one run:

- events/s of hls4ml's ``predict()`` (C++ called per event from Python), of the batched
  ctypes bridge (``kernel="hls"``), of the exact integer kernel (``kernel="integer"``,
  the default) and of the QKeras model's float ``predict()``, with ratios to hls4ml;
- bit-exactness: integer == bridge == hls4ml predict() == QKeras on mu and log sigma^2,
  and the accept decision (R_z > threshold) agreement.

    python -m benchmarks.l1_emulator --data BKG.h5 [--events 10000] [--model DIR]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from firmware.emulate import Emulator, build_project, load_emulator
from firmware.inputs import read_l1_objects, scale_l1_objects
from firmware.model import DEFAULT_MODEL_DIR, load_model
from firmware.scores import r_z


def rate(seconds: float, n: int) -> float:
    return n / seconds if seconds > 0 else float("inf")


def best_of(fn, repeats: int) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", nargs="+", required=True, help="l1bkg event cache(s)")
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--model", default=str(DEFAULT_MODEL_DIR))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    model = load_model(args.model)
    with tempfile.TemporaryDirectory(prefix="l1bench-") as tmp:
        t0 = time.perf_counter()
        emulator = load_emulator(model, cache_dir=Path(tmp) / "cache", kernel="hls")
        build_s = time.perf_counter() - t0
        integer = load_emulator(model, cache_dir=Path(tmp) / "cache", kernel="integer")
        hls_model = build_project(model, Path(tmp) / "hls")
        from firmware.vae import encoder_from_model

        encoder = encoder_from_model(model)
        objects, _ = read_l1_objects(args.data, max_events=args.events)
        x = emulator.round_inputs(scale_l1_objects(objects))
        n = len(x)
        ours = emulator.predict(x)
        fast = integer.predict(x)
        theirs = np.asarray(hls_model.predict(x), np.float32).reshape(ours.shape)
        keras = encoder.predict(x, verbose=0, batch_size=1024)

        t_hls = best_of(lambda: hls_model.predict(x), 1)
        t_bridge = best_of(lambda: emulator.predict(x), args.repeats)
        t_integer = best_of(lambda: integer.predict(x), args.repeats)
        t_integer_rz = best_of(lambda: r_z(*integer.encode(x)), args.repeats)
        threaded = Emulator(
            emulator.library,
            input_type=emulator.input_type,
            latent=model.vae.latent,
            threads=2,
            kernel="hls",
        )
        same_threaded = bool(np.array_equal(threaded.predict(x), ours))
        t_bridge2 = best_of(lambda: threaded.predict(x), args.repeats)
        t_keras = best_of(lambda: encoder.predict(x, verbose=0, batch_size=1024), args.repeats)
        t_decision = best_of(lambda: r_z(*emulator.encode(x)), args.repeats)

    latent = model.vae.latent
    rz_emu = r_z(ours[:, :latent], ours[:, latent:])
    rz_keras = r_z(keras[:, :latent], keras[:, latent:])
    threshold = model.threshold if model.threshold is not None else float(np.quantile(rz_emu, 0.99))
    rz_fast = r_z(fast[:, :latent], fast[:, latent:])
    decisions_agree = float(((rz_emu > threshold) == (rz_keras > threshold)).mean())
    integer_decisions_agree = float(((rz_fast > threshold) == (rz_emu > threshold)).mean())
    figures = {
        "events": n,
        "hls4ml_predict_events_per_s": rate(t_hls, n),
        "bridge_events_per_s": rate(t_bridge, n),
        "integer_events_per_s": rate(t_integer, n),
        "keras_predict_events_per_s": rate(t_keras, n),
        "integer_plus_rz_events_per_s": rate(t_integer_rz, n),
        "bridge_plus_rz_events_per_s": rate(t_decision, n),
        "bridge_2_threads_events_per_s": rate(t_bridge2, n),
        "bridge_2_threads_identical": same_threaded,
        "bridge_over_hls4ml": t_hls / t_bridge,
        "integer_over_hls4ml": t_hls / t_integer,
        "integer_over_bridge": t_bridge / t_integer,
        "integer_over_keras": t_keras / t_integer,
        "integer_equals_bridge": bool(np.array_equal(fast, ours)),
        "integer_equals_hls4ml": bool(np.array_equal(fast, theirs)),
        "integer_equals_qkeras": bool(np.array_equal(fast, keras)),
        "integer_accept_decision_agreement": integer_decisions_agree,
        "bridge_equals_hls4ml": bool(np.array_equal(ours, theirs)),
        "bridge_equals_qkeras": bool(np.array_equal(ours, keras)),
        "mismatched_values_vs_qkeras": int((ours != keras).sum()),
        "max_abs_diff_vs_qkeras": float(np.abs(ours - keras).max()),
        "threshold": threshold,
        "accept_decision_agreement": decisions_agree,
        "emulator_build_s": build_s,
        "machine": f"{platform.machine()}, {platform.python_version()}",
    }
    print(f"{n} l1bkg events from {', '.join(args.data)}; model {model.path}")
    print(f"  hls4ml predict()   {figures['hls4ml_predict_events_per_s']:>12,.0f} events/s")
    print(
        f"  batched bridge     {figures['bridge_events_per_s']:>12,.0f} events/s "
        f"({figures['bridge_over_hls4ml']:.1f}x hls4ml)"
    )
    print(
        f"  integer kernel     {figures['integer_events_per_s']:>12,.0f} events/s "
        f"({figures['integer_over_hls4ml']:.1f}x hls4ml, "
        f"{figures['integer_over_bridge']:.1f}x bridge, {figures['integer_over_keras']:.1f}x Keras)"
    )
    print(f"  integer + R_z      {figures['integer_plus_rz_events_per_s']:>12,.0f} events/s")
    print(
        f"  bridge, 2 threads  {figures['bridge_2_threads_events_per_s']:>12,.0f} events/s "
        f"(identical: {same_threaded})"
    )
    print(f"  bridge + R_z       {figures['bridge_plus_rz_events_per_s']:>12,.0f} events/s")
    print(f"  QKeras predict()   {figures['keras_predict_events_per_s']:>12,.0f} events/s")
    print(
        f"  bridge == hls4ml predict: {figures['bridge_equals_hls4ml']}; "
        f"bridge == QKeras: {figures['bridge_equals_qkeras']} "
        f"({figures['mismatched_values_vs_qkeras']} values differ)"
    )
    print(
        f"  integer == bridge: {figures['integer_equals_bridge']}; "
        f"integer == hls4ml predict: {figures['integer_equals_hls4ml']}; "
        f"integer == QKeras: {figures['integer_equals_qkeras']}; accept decisions "
        f"integer vs bridge agree on {100 * integer_decisions_agree:.3f}%"
    )
    print(f"  accept decisions agree on {100 * decisions_agree:.3f}% (R_z > {threshold:.4g})")
    print(f"  emulator build (convert + g++) {build_s:.1f} s, cached afterwards")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
