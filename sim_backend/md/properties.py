"""Trajectory properties with uncertainties (numpy; trajectories are small after sampling).

Units in: Å, fs, amu, K. Units out: g/cm³, m²/s, mS/cm (the project's user-facing units).

Uncertainties: with several independent replicas, the standard error of the mean over
replicas; with one trajectory, block averaging over ``n_blocks`` contiguous time blocks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from sim_backend.errors import SimInputError

AMU_G: float = 1.66053906660e-24
"""Atomic mass unit in grams."""
KB_J: float = 1.380649e-23
"""Boltzmann constant, J/K (exact SI)."""
E_C: float = 1.602176634e-19
"""Elementary charge, C (exact SI)."""
YEH_HUMMER_XI: float = 2.837297
"""Cubic-lattice constant of Yeh & Hummer, J. Phys. Chem. B 108, 15873 (2004)."""
A2_PER_FS_TO_M2_PER_S: float = 1e-5
"""1 Å²/fs = 1e-20 m² / 1e-15 s."""

FloatArray = NDArray[np.float64]


def _f64(x: ArrayLike) -> FloatArray:
    return np.asarray(x, dtype=np.float64)


def cell_volume(cell: ArrayLike) -> float:
    """|det(cell)| in Å³ for a [3,3] cell with lattice vectors as rows."""
    c = _f64(cell)
    if c.shape != (3, 3):
        raise SimInputError(f"cell must have shape (3, 3), got {c.shape}")
    v = abs(float(np.linalg.det(c)))
    if v <= 0:
        raise SimInputError(f"cell volume must be > 0, got {v}")
    return v


def density_g_cm3(masses_amu: ArrayLike, cell: ArrayLike) -> float:
    """Mass density in g/cm³ (1 Å³ = 1e-24 cm³)."""
    return float(_f64(masses_amu).sum()) * AMU_G / (cell_volume(cell) * 1e-24)


def block_sem(values: ArrayLike, n_blocks: int = 5) -> float:
    """Standard error of the mean of a time series from ``n_blocks`` contiguous block means.

    Blocks absorb the time correlation that would make the naive SEM too small.
    """
    x = _f64(values).ravel()
    if n_blocks < 2:
        raise SimInputError(f"n_blocks must be >= 2, got {n_blocks}")
    if x.size < n_blocks:
        raise SimInputError(f"values: need at least n_blocks={n_blocks} samples, got {x.size}")
    means = np.array([b.mean() for b in np.array_split(x, n_blocks)])
    return float(means.std(ddof=1) / math.sqrt(n_blocks))


@dataclass
class RDF:
    """g(r) for one species pair: bin centres ``r`` [B], ``g`` [B] (frame mean),
    ``g_frames`` [F,B], partner number density ``rho_b`` (1/Å³) and counts."""

    r: FloatArray
    g: FloatArray
    g_frames: FloatArray
    edges: FloatArray
    rho_b: float
    n_a: int
    n_b: int


def rdf(
    positions: ArrayLike,
    cell: ArrayLike,
    numbers: ArrayLike,
    species_a: int,
    species_b: int,
    *,
    r_max: float,
    n_bins: int = 200,
) -> RDF:
    """Partial radial distribution function g_ab(r) in a periodic cell.

    ``positions`` [F,N,3] or [N,3]; ``cell`` [3,3] or [F,3,3]. All periodic images within
    ``r_max`` are counted (vesin), so r_max may exceed half the box. Normalisation per frame:
    g(r) = V / (N_a (N_b - δ_ab)) · n_pairs(r) / (4/3 π (r_hi³ - r_lo³)), i.e. 1 for an ideal gas.
    """
    import vesin  # type: ignore[import-untyped]

    pos = _f64(positions)
    if pos.ndim == 2:
        pos = pos[None]
    if pos.ndim != 3 or pos.shape[2] != 3:
        raise SimInputError(f"positions must have shape (F, N, 3), got {pos.shape}")
    cells = _f64(cell)
    if cells.ndim == 2:
        cells = np.broadcast_to(cells, (pos.shape[0], 3, 3))
    if cells.shape != (pos.shape[0], 3, 3):
        raise SimInputError(f"cell must have shape (3, 3) or (F, 3, 3), got {cells.shape}")
    z = np.asarray(numbers, dtype=np.int64)
    if z.shape != (pos.shape[1],):
        raise SimInputError(f"numbers must have shape ({pos.shape[1]},), got {z.shape}")
    if not (r_max > 0):
        raise SimInputError(f"r_max must be > 0, got {r_max}")
    if n_bins < 1:
        raise SimInputError(f"n_bins must be >= 1, got {n_bins}")
    is_a, is_b = z == species_a, z == species_b
    n_a, n_b = int(is_a.sum()), int(is_b.sum())
    same = species_a == species_b
    if n_a == 0 or n_b - int(same) <= 0:
        raise SimInputError(
            f"species: need atoms of both {species_a} ({n_a}) and {species_b} ({n_b})"
        )
    edges = np.linspace(0.0, r_max, n_bins + 1)
    shell = 4.0 / 3.0 * np.pi * (edges[1:] ** 3 - edges[:-1] ** 3)
    nl = vesin.NeighborList(cutoff=r_max, full_list=True)
    g_frames = np.empty((pos.shape[0], n_bins))
    vol_sum = 0.0
    for f in range(pos.shape[0]):
        vol = cell_volume(cells[f])
        vol_sum += vol
        i, j, d = nl.compute(pos[f], cells[f], True, quantities="ijd")
        sel = is_a[i] & is_b[j]
        hist, _ = np.histogram(d[sel], bins=edges)
        g_frames[f] = hist * vol / (n_a * (n_b - int(same)) * shell)
    rho_b = (n_b - int(same)) / (vol_sum / pos.shape[0])
    return RDF(
        r=0.5 * (edges[1:] + edges[:-1]),
        g=g_frames.mean(0),
        g_frames=g_frames,
        edges=edges,
        rho_b=rho_b,
        n_a=n_a,
        n_b=n_b,
    )


def first_minimum(r: ArrayLike, g: ArrayLike, *, smooth_bins: int = 3) -> float:
    """r of the first minimum of g after its first (highest) peak, on a running mean.

    Returns the right edge of the plateau when g is flat (e.g. zero between lattice shells),
    so the first shell is fully counted.
    """
    rr, gg = _f64(r), _f64(g)
    if smooth_bins > 1:
        gg = np.convolve(gg, np.ones(smooth_bins) / smooth_bins, mode="same")
    k = int(np.argmax(gg))
    while k + 1 < gg.size and gg[k + 1] <= gg[k]:
        k += 1
    return float(rr[k])


@dataclass
class Coordination:
    """Mean coordination number, its uncertainty and the cut-off radius used (Å)."""

    value: float
    error: float
    r_cut: float


def coordination_number(res: RDF, *, r_cut: float | None = None, n_blocks: int = 5) -> Coordination:
    """Number of b atoms around an a atom: 4π ρ_b ∫_0^r_cut g(r) r² dr.

    ``r_cut`` defaults to the first minimum of g. The error is the block SEM over frames
    (0 for fewer frames than blocks, e.g. a single crystal snapshot).
    """
    rc = first_minimum(res.r, res.g) if r_cut is None else float(r_cut)
    upto = res.edges[1:] <= rc + 1e-12
    shell = 4.0 / 3.0 * np.pi * (res.edges[1:] ** 3 - res.edges[:-1] ** 3)
    per_frame = res.rho_b * (res.g_frames[:, upto] * shell[upto]).sum(axis=1)
    err = block_sem(per_frame, n_blocks) if per_frame.size >= n_blocks else 0.0
    return Coordination(value=float(per_frame.mean()), error=err, r_cut=rc)


def msd_fft(positions: ArrayLike) -> FloatArray:
    """MSD(lag) [F] averaged over all time origins and atoms, O(F log F) per atom.

    ``positions`` [F,N,3], unwrapped. Uses MSD(m) = S1(m) - 2 S2(m) with S2 the
    position autocorrelation by FFT (Calandrini et al. 2011, as in MDAnalysis' EinsteinMSD).
    """
    x = _f64(positions)
    if x.ndim != 3 or x.shape[2] != 3:
        raise SimInputError(f"positions must have shape (F, N, 3), got {x.shape}")
    n_f = x.shape[0]
    flat = x.reshape(n_f, -1)
    spec = np.fft.rfft(flat, n=2 * n_f, axis=0)
    acf = np.fft.irfft(spec * spec.conj(), axis=0)[:n_f]
    counts = (n_f - np.arange(n_f))[:, None]
    s2 = (acf / counts).reshape(n_f, x.shape[1], 3).sum(-1)
    d = (x**2).sum(-1)
    prefix = np.vstack([np.zeros((1, d.shape[1])), np.cumsum(d, axis=0)])
    total = prefix[-1]
    m = np.arange(n_f)
    s1 = (total[None] - prefix[m] + prefix[n_f - m]) / counts
    return np.asarray((s1 - 2.0 * s2).mean(axis=1), dtype=np.float64)


def _fit_slope(lag: FloatArray, msd: FloatArray, window: tuple[float, float]) -> float:
    lo, hi = round(window[0] * (lag.size - 1)), round(window[1] * (lag.size - 1))
    if hi - lo < 2:
        raise SimInputError(f"fit_window {window}: fewer than 3 frames in the window")
    slope, _ = np.polyfit(lag[lo : hi + 1], msd[lo : hi + 1], 1)
    return float(slope)


#: |beta - 1| within which an MSD counts as diffusive (beta: its log-log slope)
DIFFUSIVE_BETA_TOL = 0.15


@dataclass
class Diffusion:
    """Self-diffusion coefficient (m²/s) with its standard error and how it was obtained."""

    value: float
    error: float
    method: str
    lag_fs: FloatArray
    msd_a2: FloatArray
    fit_window: tuple[float, float]

    @property
    def beta(self) -> float:
        """Log-log slope of the MSD over the fit window: 1 in the diffusive regime, 2 when
        ballistic, below 1 while molecules rattle in their cage. A D fitted where beta is
        far from 1 is not a diffusion coefficient (the run is too short)."""
        lo = max(round(self.fit_window[0] * (self.lag_fs.size - 1)), 1)
        hi = round(self.fit_window[1] * (self.lag_fs.size - 1))
        lag, msd = self.lag_fs[lo : hi + 1], self.msd_a2[lo : hi + 1]
        ok = (lag > 0) & (msd > 0)
        if ok.sum() < 3:
            return float("nan")
        slope, _ = np.polyfit(np.log(lag[ok]), np.log(msd[ok]), 1)
        return float(slope)

    @property
    def diffusive(self) -> bool:
        """Whether the fit window is in the diffusive regime (|beta - 1| <= 0.15)."""
        return bool(abs(self.beta - 1.0) <= DIFFUSIVE_BETA_TOL)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form without the MSD curve."""
        return {
            "value_m2_s": self.value,
            "error_m2_s": self.error,
            "method": self.method,
            "fit_window_fraction": list(self.fit_window),
            "fit_window_fs": [
                float(self.lag_fs[round(f * (self.lag_fs.size - 1))]) for f in self.fit_window
            ],
            "msd_loglog_slope": self.beta,
            "diffusive": self.diffusive,
        }


def self_diffusion(
    positions: ArrayLike,
    frame_dt_fs: float,
    *,
    atoms: ArrayLike | None = None,
    fit_window: tuple[float, float] = (0.1, 0.5),
    n_blocks: int = 5,
) -> Diffusion:
    """D = slope(MSD)/6 from the linear regime, with an uncertainty.

    ``positions``: unwrapped, [F,N,3] for one trajectory or [R,F,N,3] for R independent
    replicas; ``atoms`` selects atom indices (or a bool mask). Fit window, as fractions of
    the trajectory length: from 10 % (past the ballistic and caging regime at short lags)
    to 50 % (beyond it fewer than half the time origins contribute and the MSD gets noisy),
    following common practice (Maginn et al., LiveCoMS 1, 6324 (2019)).
    Error: SEM over replicas when R >= 2, else block averaging over ``n_blocks`` time blocks.
    """
    x = _f64(positions)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[3] != 3:
        raise SimInputError(f"positions must have shape (F, N, 3) or (R, F, N, 3), got {x.shape}")
    if not (frame_dt_fs > 0):
        raise SimInputError(f"frame_dt_fs must be > 0, got {frame_dt_fs}")
    lo, hi = fit_window
    if not (0.0 <= lo < hi <= 1.0):
        raise SimInputError(f"fit_window must satisfy 0 <= lo < hi <= 1, got {fit_window}")
    if atoms is not None:
        sel = np.asarray(atoms)
        x = x[:, :, sel]
    if x.shape[2] == 0:
        raise SimInputError("atoms: the selection is empty")
    n_rep, n_f = x.shape[0], x.shape[1]
    if n_f < 10:
        raise SimInputError(f"positions: need at least 10 frames, got {n_f}")
    lag = np.arange(n_f, dtype=np.float64) * frame_dt_fs
    msds = np.stack([msd_fft(x[r]) for r in range(n_rep)])
    per_rep = np.array([_fit_slope(lag, m, fit_window) / 6.0 for m in msds])
    scale = A2_PER_FS_TO_M2_PER_S
    if n_rep >= 2:
        value = float(per_rep.mean())
        error = float(per_rep.std(ddof=1) / math.sqrt(n_rep))
        method = f"mean over {n_rep} replicas, SEM"
    else:
        value = float(per_rep[0])
        blocks = np.array_split(np.arange(n_f), n_blocks)
        if min(len(b) for b in blocks) < 10:
            raise SimInputError(
                f"n_blocks={n_blocks}: blocks of a {n_f}-frame trajectory are under 10 frames"
            )
        bd = []
        for b in blocks:
            m = msd_fft(x[0, b])
            blag = np.arange(len(b), dtype=np.float64) * frame_dt_fs
            bd.append(_fit_slope(blag, m, fit_window) / 6.0)
        error = float(np.std(bd, ddof=1) / math.sqrt(n_blocks))
        method = f"block averaging, {n_blocks} blocks"
    return Diffusion(
        value=value * scale,
        error=error * scale,
        method=method,
        lag_fs=lag,
        msd_a2=msds.mean(0),
        fit_window=fit_window,
    )


def yeh_hummer_correction(
    temperature_k: float, viscosity_pa_s: float, box_length_a: float
) -> float:
    """Finite-size correction ξ k_B T / (6 π η L) in m²/s (add it to D_pbc)."""
    if not (temperature_k > 0):
        raise SimInputError(f"temperature_k must be > 0, got {temperature_k}")
    if not (viscosity_pa_s > 0):
        raise SimInputError(f"viscosity_pa_s must be > 0, got {viscosity_pa_s}")
    if not (box_length_a > 0):
        raise SimInputError(f"box_length_a must be > 0, got {box_length_a}")
    eta_l = viscosity_pa_s * box_length_a * 1e-10
    return YEH_HUMMER_XI * KB_J * temperature_k / (6 * math.pi * eta_l)


def yeh_hummer(
    d_pbc: float, temperature_k: float, viscosity_pa_s: float, box_length_a: float
) -> float:
    """D_inf = D_pbc + ξ k_B T / (6 π η L) (cubic box of edge L), m²/s."""
    return d_pbc + yeh_hummer_correction(temperature_k, viscosity_pa_s, box_length_a)


@dataclass
class Conductivity:
    """Nernst-Einstein ionic conductivity and its propagated standard error, mS/cm."""

    value_ms_cm: float
    error_ms_cm: float


def nernst_einstein(
    volume_a3: float,
    temperature_k: float,
    counts: Sequence[int],
    charges: Sequence[float],
    diffusion_m2_s: Sequence[float],
    diffusion_err_m2_s: Sequence[float],
) -> Conductivity:
    """σ = e² / (V k_B T) Σ_i N_i z_i² D_i (ions uncorrelated), errors added in quadrature.

    1 S/m = 10 mS/cm.
    """
    n = len(counts)
    if not (len(charges) == len(diffusion_m2_s) == len(diffusion_err_m2_s) == n):
        raise SimInputError(
            "counts, charges, diffusion_m2_s, diffusion_err_m2_s must have equal lengths, got "
            f"{n}, {len(charges)}, {len(diffusion_m2_s)}, {len(diffusion_err_m2_s)}"
        )
    if not (volume_a3 > 0):
        raise SimInputError(f"volume_a3 must be > 0, got {volume_a3}")
    if not (temperature_k > 0):
        raise SimInputError(f"temperature_k must be > 0, got {temperature_k}")
    pref = E_C**2 / (volume_a3 * 1e-30 * KB_J * temperature_k)
    terms = [c * q * q * d for c, q, d in zip(counts, charges, diffusion_m2_s, strict=True)]
    errs = [c * q * q * e for c, q, e in zip(counts, charges, diffusion_err_m2_s, strict=True)]
    return Conductivity(
        value_ms_cm=10.0 * pref * sum(terms),
        error_ms_cm=10.0 * pref * math.sqrt(sum(e * e for e in errs)),
    )
