"""The correction network's fast path (preallocated buffers, io binding, in-place moving
averages) gives what the plain path gives, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

from edge_bms.cell import load_cell
from edge_bms.correction import (
    EMA_TAUS_S,
    CorrectionOutput,
    VoltageCorrectionNet,
    ema_step,
    features,
    load_correction,
)
from edge_bms.estimator import CorrectionInputs, PackEstimator
from edge_bms.filters import EkfSettings, FilterNoise, FilterState, ekf_step, ukf_step


def _inputs(
    rng: np.random.Generator, n: int, dt: float | np.ndarray, cold: bool = False
) -> CorrectionInputs:
    z = np.zeros(n)
    temp = rng.uniform(0.0, 40.0, n)
    if cold:
        temp[0] = -20.0  # outside the training range
    return CorrectionInputs(
        ts=0.0,
        dt_s=dt,  # type: ignore[arg-type]  # per-cell dt too
        current_a=rng.uniform(-4.0, 5.0, n),
        cell_v=z,
        temp_c=temp,
        soc=rng.uniform(0.1, 0.95, n),
        soc_sigma=z,
        innovation=z,
        v_pred=z,
    )


def _plain(net: VoltageCorrectionNet, x: np.ndarray) -> CorrectionOutput:
    return net._predict_plain(x.copy())


def _same(a: CorrectionOutput, b: CorrectionOutput) -> bool:
    return all(
        np.array_equal(getattr(a, f), getattr(b, f), equal_nan=f != "used")
        for f in ("dv_v", "r_var_v2", "used")
    )


@pytest.mark.parametrize("n", [1, 5, 64])
def test_buffered_steps_equal_the_plain_functions(n: int) -> None:
    net = load_correction()
    rng = np.random.default_rng(n)
    ema: np.ndarray | None = None
    out_of_range = 0
    for k in range(300):
        dt: float | np.ndarray = [1.0, 0.5, 30.0][k % 3]
        if k % 7 == 0:
            dt = rng.uniform(0.5, 2.0, n)  # per cell
        elif k % 11 == 0:
            dt = np.asarray(2.0)  # 0-d
        inputs = _inputs(rng, n, dt, cold=k % 4 == 0)
        i = inputs.current_a
        ema = np.repeat(i[:, None], len(EMA_TAUS_S), axis=1) if ema is None else ema
        if k:
            ema = ema_step(ema, i, dt)
        x = net.features(inputs)
        np.testing.assert_array_equal(x, features(inputs.soc, inputs.temp_c, i, ema))
        out = net.predict(x)
        assert _same(out, _plain(net, x))
        out_of_range += int(not out.used.all())
        if k == 150:  # a checkpoint round trip keeps the averages
            state = net.state_dict()
            assert np.array_equal(np.asarray(state["ema"]), ema)
            net.load_state_dict(state)
    assert 0 < out_of_range < 300
    # any other float32 rows go through the same buffers
    x = rng.normal(size=(n, 6)).astype(np.float32)
    assert _same(net.predict(x), _plain(net, x))


def test_pack_size_change_and_reset_restart_the_averages() -> None:
    net = load_correction()
    rng = np.random.default_rng(0)
    for n in (3, 8, 3):
        inputs = _inputs(rng, n, 1.0)
        x = net.features(inputs)
        assert np.array_equal(
            x[:, 3:], np.repeat(inputs.current_a[:, None], 3, axis=1).astype(np.float32)
        )
    net.load_state_dict({"ema": None})
    inputs = _inputs(rng, 3, 1.0)
    x = net.features(inputs)
    assert np.array_equal(x[:, 5], inputs.current_a.astype(np.float32))


def test_estimator_with_network_is_deterministic_over_restarts() -> None:
    # two estimators fed the same samples, one resumed from a checkpoint midway
    cell = load_cell()
    n = 4
    rng = np.random.default_rng(1)
    soc = np.linspace(0.4, 0.8, n)
    samples = [
        (float(k), float(rng.uniform(-3, 8)), cell.ocv(soc, 25.0) - 0.01, 25.0) for k in range(80)
    ]
    net_a, net_b = load_correction(), load_correction()
    a = PackEstimator(cell, n, correction=net_a)
    b = PackEstimator(cell, n, correction=net_b)
    for k, s in enumerate(samples):
        ea, eb = a.step(*s), b.step(*s)
        np.testing.assert_array_equal(ea.soc, eb.soc)
        if k == 40:
            net_state = net_b.state_dict()
            b = PackEstimator.from_state_dict(cell, b.state_dict(), correction=load_correction())
            assert b.correction is not None
            b.correction.load_state_dict(net_state)  # type: ignore[attr-defined]
            net_b = b.correction  # type: ignore[assignment]


@pytest.mark.parametrize("step", [ekf_step, ukf_step])
def test_steps_leave_their_inputs_as_they_were(step: object) -> None:
    cell = load_cell()
    n = 6
    state = FilterState.initial(np.linspace(0.2, 0.9, n), 0.05, current_a=np.linspace(-2, 5, n))
    x, p, i = state.x.copy(), state.p.copy(), state.current_a.copy()
    v = cell.ocv(np.clip(state.soc + 0.3, 0, 1), 25.0)  # far off: the EKF iterates
    v[2] = np.nan
    kwargs = {"settings": EkfSettings()} if step is ekf_step else {}
    res = step(cell, state, 2.0, v, 25.0, 1.0, FilterNoise(), **kwargs)  # type: ignore[operator]
    assert np.array_equal(state.x, x) and np.array_equal(state.p, p)
    assert np.array_equal(state.current_a, i)
    assert not np.shares_memory(res.state.p, state.p) and not np.shares_memory(res.state.x, state.x)


def test_a_copy_taken_after_use_keeps_its_own_moving_averages() -> None:
    """The buffers hold the averages in place; a copy must not step the original's."""
    import copy

    from edge_bms.correction import load_correction
    from edge_bms.estimator import CorrectionInputs

    net = load_correction()
    n = 3

    def inputs(i: float) -> CorrectionInputs:
        z = np.zeros(n)
        return CorrectionInputs(
            ts=0.0,
            dt_s=1.0,
            current_a=np.full(n, i),
            cell_v=np.full(n, 3.7),
            temp_c=np.full(n, 25.0),
            soc=np.full(n, 0.5),
            soc_sigma=np.full(n, 0.01),
            innovation=z,
            v_pred=z,
        )

    for _ in range(5):
        net.predict(net.features(inputs(2.0)))
    twin = copy.copy(net)
    before = net.state_dict()["ema"]
    for _ in range(5):
        twin.predict(twin.features(inputs(-5.0)))
    assert net.state_dict()["ema"] == before
    assert twin.state_dict()["ema"] != before
    assert twin.session is net.session
