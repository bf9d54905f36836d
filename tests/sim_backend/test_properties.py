"""Property estimators against analytic cases: ideal gas, fcc, random walks, hand numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest
from ase.lattice.cubic import FaceCenteredCubic

from sim_backend.errors import SimInputError
from sim_backend.md import properties as props


def test_density_of_one_amu_per_cubic_angstrom() -> None:
    assert props.density_g_cm3([1.0], np.eye(3)) == pytest.approx(1.66053906660, rel=1e-10)
    # 216 waters (18.015 amu) in an 18.62 Å box: 3891.24 amu * 1.66054 / 6455.64 Å3
    assert props.density_g_cm3(np.full(216, 18.015), 18.62 * np.eye(3)) == pytest.approx(
        1.00092, abs=2e-5
    )


def test_ideal_gas_rdf_is_one() -> None:
    rng = np.random.default_rng(0)
    box = 20.0
    pos = rng.uniform(0, box, size=(20, 800, 3))
    z = np.where(np.arange(800) < 400, 3, 8)
    for a, b in [(3, 8), (8, 8)]:
        res = props.rdf(pos, box * np.eye(3), z, a, b, r_max=9.0, n_bins=45)
        far = res.r > 2.0
        assert np.mean(res.g[far]) == pytest.approx(1.0, abs=0.02)
        assert np.all(np.abs(res.g[far] - 1.0) < 0.15)


def test_rdf_counts_images_beyond_half_box() -> None:
    # one pair in a small box: r_max past half the box still gives g ~ 1 on average
    rng = np.random.default_rng(1)
    pos = rng.uniform(0, 6.0, size=(200, 20, 3))
    res = props.rdf(pos, 6.0 * np.eye(3), np.ones(20, dtype=int), 1, 1, r_max=5.0, n_bins=10)
    assert np.mean(res.g[2:]) == pytest.approx(1.0, abs=0.03)


def test_fcc_coordination_is_twelve() -> None:
    a = 5.26
    atoms = FaceCenteredCubic("Ar", size=(4, 4, 4), latticeconstant=a)
    res = props.rdf(atoms.positions, atoms.cell.array, atoms.numbers, 18, 18, r_max=6.0, n_bins=120)
    cn = props.coordination_number(res)
    assert cn.value == pytest.approx(12.0, abs=1e-9)
    assert a / math.sqrt(2) < cn.r_cut < a
    # first two shells: 12 + 6
    assert props.coordination_number(res, r_cut=5.5).value == pytest.approx(18.0, abs=1e-9)


def test_msd_fft_matches_direct_average() -> None:
    rng = np.random.default_rng(2)
    x = np.cumsum(rng.normal(size=(60, 7, 3)), axis=0)
    direct = np.array(
        [np.mean(np.sum((x[m:] - x[: len(x) - m]) ** 2, axis=-1)) for m in range(len(x))]
    )
    assert np.allclose(props.msd_fft(x), direct, rtol=1e-10, atol=1e-10)


def _random_walk(d_m2_s: float, dt_fs: float, shape: tuple[int, ...], seed: int) -> np.ndarray:
    d_a2_fs = d_m2_s / props.A2_PER_FS_TO_M2_PER_S
    rng = np.random.default_rng(seed)
    steps = rng.normal(scale=math.sqrt(2 * d_a2_fs * dt_fs), size=shape)
    return np.cumsum(steps, axis=-3)


def test_random_walk_diffusion_single_trajectory_block_error() -> None:
    d_true = 1.0e-9
    x = _random_walk(d_true, 10.0, (2000, 200, 3), seed=3)
    res = props.self_diffusion(x, 10.0)
    assert "block" in res.method
    assert 0 < res.error < 0.1 * d_true
    assert abs(res.value - d_true) < max(4 * res.error, 0.03 * d_true)
    # MSD is 6 D t in the fit window
    k = len(res.lag_fs) // 4
    assert res.msd_a2[k] == pytest.approx(6 * d_true / 1e-5 * res.lag_fs[k], rel=0.1)


def test_random_walk_diffusion_replicas_and_selection() -> None:
    d_true = 2.0e-9
    x = _random_walk(d_true, 5.0, (4, 400, 50, 3), seed=4)
    x[:, :, 25:] *= 0.0  # immobile atoms outside the selection
    res = props.self_diffusion(x, 5.0, atoms=np.arange(25))
    assert "4 replicas" in res.method
    assert res.error > 0
    assert abs(res.value - d_true) < max(4 * res.error, 0.1 * d_true)
    assert props.self_diffusion(x, 5.0, atoms=np.arange(25, 50)).value == pytest.approx(0.0)


def test_yeh_hummer_hand_number() -> None:
    # water at 298.15 K, 0.8904 mPa s, 30 A box:
    # 2.837297 * 1.380649e-23 * 298.15 / (6 pi 0.8904e-3 * 3.0e-9) = 2.3196e-10 m2/s
    corr = props.yeh_hummer_correction(298.15, 0.8904e-3, 30.0)
    assert corr == pytest.approx(2.3196e-10, rel=1e-4)
    assert props.yeh_hummer(1.0e-9, 298.15, 0.8904e-3, 30.0) == pytest.approx(1.23196e-9, rel=1e-4)
    # the correction shrinks as 1/L
    assert props.yeh_hummer_correction(298.15, 0.8904e-3, 60.0) == pytest.approx(corr / 2)


def test_nernst_einstein_hand_number() -> None:
    # e^2/(V kB T) = (1.602e-19)^2 / (1e-26 m3 * 1.380649e-23 * 300) = 6.1975e8 S s/m^3;
    # times (10 * 1e-10 + 10 * 1e-10) m2/s = 1.2395 S/m = 12.395 mS/cm
    s = props.nernst_einstein(1.0e4, 300.0, [10, 10], [1.0, -1.0], [1e-10, 1e-10], [1e-11, 1e-11])
    assert s.value_ms_cm == pytest.approx(12.395, rel=1e-4)
    assert s.error_ms_cm == pytest.approx(12.395 / 20 * math.sqrt(2), rel=1e-4)
    # divalent ions count z^2
    s2 = props.nernst_einstein(1.0e4, 300.0, [10], [2.0], [1e-10], [0.0])
    assert s2.value_ms_cm == pytest.approx(2 * 12.395, rel=1e-4)


def test_block_sem_of_white_noise() -> None:
    x = np.random.default_rng(5).normal(size=10_000)
    assert props.block_sem(x, 10) == pytest.approx(0.01, rel=0.5)


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda: props.rdf(np.zeros((2, 3)), np.eye(3), [1, 1], 1, 8, r_max=1.0), "species"),
        (lambda: props.rdf(np.zeros((2, 3)), np.eye(3), [1, 1], 1, 1, r_max=-1.0), "r_max"),
        (lambda: props.self_diffusion(np.zeros((50, 2, 3)), 0.0), "frame_dt_fs"),
        (
            lambda: props.self_diffusion(np.zeros((50, 2, 3)), 1.0, fit_window=(0.5, 0.2)),
            "fit_window",
        ),
        (lambda: props.yeh_hummer_correction(300.0, -1.0, 30.0), "viscosity_pa_s"),
        (lambda: props.nernst_einstein(1.0, 300.0, [1], [1.0, 1.0], [1e-9], [0.0]), "counts"),
        (lambda: props.density_g_cm3([1.0], np.zeros((3, 3))), "cell volume"),
    ],
)
def test_bad_input_names_the_field(call: object, field: str) -> None:
    with pytest.raises(SimInputError, match=field):
        call()  # type: ignore[operator]


def test_diffusion_flags_a_fit_that_is_not_yet_diffusive() -> None:
    """A random walk is diffusive (log-log slope 1); ballistic flight (x = v t) has slope 2
    and must be flagged, whatever D its straight-line fit gives."""
    from sim_backend.md.properties import self_diffusion

    rng = np.random.default_rng(4)
    walk = np.cumsum(rng.normal(0.0, 0.1, (3, 400, 50, 3)), axis=1)
    d = self_diffusion(walk, 10.0)
    assert d.diffusive and abs(d.beta - 1.0) < 0.1
    t = np.arange(400.0)[None, :, None, None]
    ballistic = rng.normal(0.0, 0.01, (3, 1, 50, 3)) * t
    b = self_diffusion(ballistic, 10.0)
    assert not b.diffusive and b.beta == pytest.approx(2.0, abs=0.05)
    assert b.to_dict()["diffusive"] is False
    assert b.to_dict()["fit_window_fs"] == [400.0, 2000.0]  # 10 % and 50 % of 3990 fs
