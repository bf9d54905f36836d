"""Inference time of the property model: torch vs onnxruntime, batch 1 and 1024, same run.

Trains the conductivity ensemble (default 5 members, 32 hidden units) on synthetic data
from the simulated lab's ground truth (hardware_mocks, a script may use it), exports it
to ONNX, then times, in this process and on the same inputs:

* torch: ``module(fractions, molality, temperature)`` under ``torch.inference_mode()``;
* onnxruntime: ``session.run`` on the exported graph (what PropertyPredictor runs,
  without its input checks), and ``PropertyPredictor.predict`` (with them).

Each timing is the median of ``--repeats`` calls after warm-up; the ratio is torch /
onnxruntime (above 1: onnxruntime faster). Threads: ``--threads`` for both.

    .venv/bin/python scripts/bench_onnx.py [--repeats 200] [--threads 1] [--members 5]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable

import numpy as np
import pandas as pd


def median_s(fn: Callable[[], object], repeats: int, warmup: int = 20) -> float:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--members", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=300)
    args = parser.parse_args()

    import onnxruntime as ort  # type: ignore[import-untyped]
    import torch

    from hardware_mocks.physics.electrolyte import landesfeind_blend
    from labctl.models.property import (
        SOLVENTS,
        PropertyConfig,
        PropertyPredictor,
        register_property_model,
        train_property_model,
    )
    from labctl.models.registry import Registry

    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    n = 300
    fr = rng.dirichlet(np.full(5, 0.7), n)
    m = rng.uniform(0.2, 2.0, n)
    t = rng.uniform(10.0, 50.0, n)
    df = pd.DataFrame(fr, columns=list(SOLVENTS))
    df["salt_molality"] = m
    df["temperature_c"] = t
    df["conductivity_mS_cm"] = [
        landesfeind_blend(dict(zip(SOLVENTS, f, strict=True)), float(a), float(b))
        for f, a, b in zip(fr, m, t, strict=True)
    ]
    cfg = PropertyConfig(members=args.members, hidden=args.hidden, epochs=args.epochs)
    trained = train_property_model(df, cfg)
    module = trained.module.eval()
    with tempfile.TemporaryDirectory() as root:
        record = register_property_model(Registry(root), trained, promote=True)
        predictor = PropertyPredictor.load(root, provider="cpu")
        data = Registry(root).path("conductivity", record.version).read_bytes()
    # The same graph in a session with torch's thread count, for a like-for-like timing
    # (PropertyPredictor's own session uses onnxruntime's default threads).
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(data, sess_options=options, providers=["CPUExecutionProvider"])

    print(
        f"property model: {args.members} members x 2 hidden layers of {args.hidden}; "
        f"torch {torch.__version__}, onnxruntime {ort.__version__} "
        f"({session.get_providers()[0]}), {args.threads} thread(s), "
        f"{platform.processor() or platform.machine()}, median of {args.repeats}"
    )
    print(f"{'batch':>6} {'torch ms':>10} {'ort ms':>10} {'ort+checks ms':>14} {'torch/ort':>10}")
    for batch in (1, 1024):
        idx = rng.integers(0, n, batch)
        xf, xm, xt = fr[idx], m[idx], t[idx]
        tf = torch.tensor(xf, dtype=torch.float32)
        tm = torch.tensor(xm, dtype=torch.float32)
        tt = torch.tensor(xt, dtype=torch.float32)
        feed = {
            "fractions": xf.astype(np.float32),
            "salt_molality": xm.astype(np.float32),
            "temperature_c": xt.astype(np.float32),
        }

        def run_torch(
            tf: torch.Tensor = tf, tm: torch.Tensor = tm, tt: torch.Tensor = tt
        ) -> object:
            with torch.inference_mode():
                return module(tf, tm, tt)

        def run_ort(feed: dict[str, np.ndarray] = feed) -> object:
            return session.run(None, feed)

        def run_predictor(xf: np.ndarray = xf, xm: np.ndarray = xm, xt: np.ndarray = xt) -> object:
            return predictor.predict(xf, xm, xt)

        with torch.inference_mode():
            ref = module(tf, tm, tt)[0].numpy()
        got = session.run(None, feed)[0]
        assert np.allclose(ref, got, rtol=1e-4, atol=1e-4), "ONNX and torch disagree"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t_torch = median_s(run_torch, args.repeats)
            t_ort = median_s(run_ort, args.repeats)
            t_pred = median_s(run_predictor, args.repeats)
        print(
            f"{batch:>6} {t_torch * 1e3:>10.4f} {t_ort * 1e3:>10.4f} {t_pred * 1e3:>14.4f} "
            f"{t_torch / t_ort:>10.2f}"
        )


if __name__ == "__main__":
    main()
