"""Random packing of molecules and ions into clusters and small periodic boxes.

This is Packmol's idea in its simplest form: insert rigid, randomly rotated copies one by one
and reject any pose that brings an atom closer than `min_distance` to an atom of another
molecule (minimum image in a box). It is enough for the small systems xTB can label; the xTB MD
that follows relaxes the contacts. For liquid-density boxes that go straight into MD
(dry tests), `pack_box` inserts with element-pair distances, many poses at a time, and
then pushes molecules apart to 1.9 Å.

Every builder takes a composition such as ``{"EC": 10, "Li+": 1, "PF6-": 1}`` and returns ASE
`Atoms` with ``info["total_charge"]`` (the sum of the ionic charges, e), ``info["system"]`` (a
name made from the composition) and a per-atom ``arrays["mol_id"]`` (which molecule an atom
belongs to, for bond checks downstream).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from sim_backend.chem.species import get_species, species_atoms
from sim_backend.errors import SimInputError

if TYPE_CHECKING:
    from ase import Atoms

#: 1 amu/Å^3 in g/cm^3.
AMU_PER_A3_TO_G_PER_CM3 = 1.66053906660

FloatArray = NDArray[np.float64]


def parse_composition(composition: Mapping[str, int], field: str = "composition") -> dict[str, int]:
    """Check a composition: known species names, integer counts >= 0, at least one molecule.

    Errors name the field and value, e.g. ``composition['XY']: unknown species``. Zero counts
    are dropped. Ions come first in the result so builders place them before the solvent.
    """
    if not isinstance(composition, Mapping):
        raise SimInputError(f"{field}: expected a mapping name -> count, got {composition!r}")
    out: dict[str, int] = {}
    for name, count in composition.items():
        key = f"{field}[{name!r}]"
        if not isinstance(name, str):
            raise SimInputError(f"{key}: species name must be a string")
        try:
            get_species(name)
        except SimInputError as exc:
            raise SimInputError(f"{key}: {exc}") from None
        if isinstance(count, bool) or not isinstance(count, int | np.integer):
            raise SimInputError(f"{key}: count must be an integer, got {count!r}")
        if count < 0:
            raise SimInputError(f"{key}: count must be >= 0, got {count}")
        if count:
            out[name] = int(count)
    if not out:
        raise SimInputError(f"{field}: no molecules (got {dict(composition)!r})")
    return dict(sorted(out.items(), key=lambda kv: get_species(kv[0]).kind == "solvent"))


def composition_name(composition: Mapping[str, int]) -> str:
    """A compact, file-safe system name: ``{"Li+": 1, "EC": 4}`` -> ``"Li+_EC4"``."""
    comp = parse_composition(composition)
    return "_".join(f"{n}{c if c > 1 else ''}" for n, c in comp.items())


def total_charge(composition: Mapping[str, int]) -> int:
    """Sum of the species charges (e)."""
    return sum(get_species(n).charge * c for n, c in parse_composition(composition).items())


def total_mass(composition: Mapping[str, int]) -> float:
    """Total mass (amu)."""
    comp = parse_composition(composition)
    return float(sum(species_atoms(n).get_masses().sum() * c for n, c in comp.items()))


def density_g_cm3(atoms: Atoms) -> float:
    """Mass density of a periodic `atoms` (g/cm^3)."""
    return float(atoms.get_masses().sum() / atoms.get_volume() * AMU_PER_A3_TO_G_PER_CM3)  # type: ignore[no-untyped-call]


def random_rotation(rng: np.random.Generator) -> FloatArray:
    """A rotation matrix drawn uniformly from SO(3) (random unit quaternion)."""
    q = rng.standard_normal(4)
    w, x, y, z = q / np.linalg.norm(q)
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


def _molecules(
    comp: dict[str, int],
    seed: int,
    conformers: Mapping[str, Sequence[Atoms]] | None = None,
) -> list[tuple[str, Atoms]]:
    """One structure per molecule, in placement order (ions, then solvents, big first).

    Each copy gets its own conformer: a random pick from `conformers[name]` when given (e.g.
    thermal xTB geometries), else an rdkit conformer with its own seed, so that a box is not
    made of clones.
    """
    rng = np.random.default_rng(seed + 7919)
    mols: list[tuple[str, Atoms]] = []
    for name, count in comp.items():
        pool = conformers.get(name) if conformers else None
        for k in range(count):
            if pool:
                mol = pool[int(rng.integers(len(pool)))].copy()  # type: ignore[no-untyped-call]
                mol.positions -= mol.get_center_of_mass()
            else:
                mol = species_atoms(name, seed=seed + k if count > 1 else seed)
            mols.append((name, mol))
    ions = [m for m in mols if get_species(m[0]).kind != "solvent"]
    solv = sorted(
        (m for m in mols if get_species(m[0]).kind == "solvent"), key=lambda m: -len(m[1])
    )
    return ions + solv


def _assemble(
    placed: list[tuple[str, FloatArray, Atoms]], comp: dict[str, int], seed: int
) -> Atoms:
    from ase import Atoms

    numbers = np.concatenate([mol.numbers for _, _, mol in placed])
    positions = np.concatenate([pos for _, pos, _ in placed])
    mol_id = np.concatenate([np.full(len(mol), i) for i, (_, _, mol) in enumerate(placed)])
    atoms = Atoms(numbers=numbers, positions=positions)
    atoms.arrays["mol_id"] = mol_id.astype(np.int64)
    atoms.info.update(
        system=composition_name(comp),
        composition=",".join(f"{n}:{c}" for n, c in comp.items()),
        total_charge=sum(get_species(n).charge * c for n, c in comp.items()),
        uhf=0,
        seed=seed,
    )
    return atoms


def build_cluster(
    composition: Mapping[str, int],
    *,
    seed: int,
    density: float = 0.9,
    min_distance: float = 2.0,
    max_tries: int = 5000,
    conformers: Mapping[str, Sequence[Atoms]] | None = None,
) -> Atoms:
    """Pack the composition at random into a sphere, without overlaps (non-periodic).

    The sphere holds the total mass at `density` (g/cm^3, below the liquid so that random
    insertion succeeds); it grows by 5% whenever a molecule finds no place in `max_tries` poses.
    The first molecule (an ion when there is one) sits at the centre, so Li+ ends up solvated.
    `conformers` optionally maps species names to geometries to draw molecules from.
    """
    comp = parse_composition(composition)
    if min_distance <= 0:
        raise SimInputError(f"min_distance: must be > 0, got {min_distance}")
    if density <= 0:
        raise SimInputError(f"density: must be > 0 g/cm3, got {density}")
    rng = np.random.default_rng(seed)
    mols = _molecules(comp, seed, conformers)
    mass = sum(float(m.get_masses().sum()) for _, m in mols)
    radius = float((3 * mass / (density / AMU_PER_A3_TO_G_PER_CM3) / (4 * np.pi)) ** (1 / 3))
    placed: list[tuple[str, FloatArray, Atoms]] = []
    others = np.zeros((0, 3))
    for i, (name, mol) in enumerate(mols):
        base = mol.positions
        while True:
            for _ in range(max_tries):
                rot = random_rotation(rng)
                if i == 0:
                    centre = np.zeros(3)
                else:
                    v = rng.standard_normal(3)
                    centre = v / np.linalg.norm(v) * radius * rng.random() ** (1 / 3)
                pos = base @ rot.T + centre
                if len(others) == 0 or _min_dist(pos, others) >= min_distance:
                    break
            else:
                radius *= 1.05
                continue
            break
        placed.append((name, pos, mol))
        others = np.concatenate([others, pos])
    atoms = _assemble(placed, comp, seed)
    atoms.positions -= atoms.get_center_of_mass()  # type: ignore[no-untyped-call]
    atoms.info["config"] = "cluster"
    return atoms


def build_box(
    composition: Mapping[str, int],
    *,
    density: float,
    seed: int,
    min_distance: float = 1.9,
    max_tries: int = 20000,
    restarts: int = 20,
    conformers: Mapping[str, Sequence[Atoms]] | None = None,
) -> Atoms:
    """Pack the composition into a cubic periodic box of mass density `density` (g/cm^3).

    Rigid molecules are inserted at random positions and orientations and rejected when any atom
    comes within `min_distance` of another molecule (minimum image). When one molecule finds no
    place, the packing restarts from scratch (`restarts` times) before giving up with an error
    that suggests a lower density or distance. Positions are wrapped into the cell.
    `conformers` optionally maps species names to geometries to draw molecules from.
    """
    comp = parse_composition(composition)
    if not density > 0:
        raise SimInputError(f"density: must be > 0 g/cm3, got {density}")
    if min_distance <= 0:
        raise SimInputError(f"min_distance: must be > 0, got {min_distance}")
    rng = np.random.default_rng(seed)
    mols = _molecules(comp, seed, conformers)
    mass = sum(float(m.get_masses().sum()) for _, m in mols)
    length = float((mass / (density / AMU_PER_A3_TO_G_PER_CM3)) ** (1 / 3))
    for name, mol in mols:
        extent = float(np.ptp(mol.positions, axis=0).max()) if len(mol) > 1 else 0.0
        if extent + min_distance > length:
            raise SimInputError(
                f"density: a {length:.2f} Å box at {density} g/cm3 is smaller than one "
                f"{name} molecule plus min_distance; add molecules or lower density"
            )
    for _attempt in range(restarts):
        placed = _pack_box(mols, length, min_distance, max_tries, rng)
        if placed is not None:
            break
    else:
        raise SimInputError(
            f"density: could not pack {dict(comp)} at {density} g/cm3 with min_distance "
            f"{min_distance} Å after {restarts} restarts; lower one of them"
        )
    atoms = _assemble(placed, comp, seed)
    atoms.cell = np.eye(3) * length
    atoms.pbc = True
    atoms.wrap()  # type: ignore[no-untyped-call]
    atoms.info["config"] = "box"
    return atoms


def _pack_box(
    mols: list[tuple[str, Atoms]],
    length: float,
    min_distance: float,
    max_tries: int,
    rng: np.random.Generator,
) -> list[tuple[str, FloatArray, Atoms]] | None:
    placed: list[tuple[str, FloatArray, Atoms]] = []
    others = np.zeros((0, 3))
    for name, mol in mols:
        base = mol.positions
        for _ in range(max_tries):
            pos = base @ random_rotation(rng).T + rng.random(3) * length
            if len(others) == 0 or _min_dist(pos, others, length) >= min_distance:
                break
        else:
            return None
        placed.append((name, pos, mol))
        others = np.concatenate([others, pos])
    return placed


def _min_dist(a: FloatArray, b: FloatArray, length: float | None = None) -> float:
    """Smallest distance between any atom of `a` and any of `b` (minimum image if `length`)."""
    d = a[:, None, :] - b[None, :, :]
    if length is not None:
        d -= length * np.round(d / length)
    return float(np.sqrt((d * d).sum(-1).min()))


def min_intermolecular_distance(atoms: Atoms) -> float:
    """Smallest distance between atoms of different molecules (uses `arrays["mol_id"]`).

    Minimum image when the structure is periodic; used by the tests and as a sanity check.
    """
    from ase.geometry import get_distances

    mol_id = atoms.arrays["mol_id"]
    if atoms.pbc.any():
        _, dist = get_distances(atoms.positions, cell=atoms.cell, pbc=atoms.pbc)  # type: ignore[no-untyped-call]
    else:
        _, dist = get_distances(atoms.positions)  # type: ignore[no-untyped-call]
    same = mol_id[:, None] == mol_id[None, :]
    return float(np.where(same, np.inf, dist).min())


#: :func:`pack_box`: two atoms of different molecules
#: stay at least ``PACK_CONTACT_SCALE`` x their covalent-bond cutoff apart (the stability
#: monitor's 1.2 x (r_i + r_j), which takes its reference bonds from the packed box: a
#: closer contact would become a false bond that breaks, and the replica would be
#: stopped as unstable), and never closer than ``PACK_MIN_DISTANCE`` Å.
PACK_CONTACT_SCALE = 1.15
#: After packing, molecules are pushed apart to this intermolecular distance (Å; Packmol
#: uses 2.0) and Li+ to RELAX_DISTANCE_LI from anything (its Li-O shell is ~1.9-2.0 Å).
RELAX_DISTANCE = 1.9
RELAX_DISTANCE_LI = 1.75
RELAX_MAX_STEP = 0.2  # Å per molecule per iteration
PACK_MIN_DISTANCE = 1.3
#: Each molecule gets this many random poses (tried 64 at a time) before the packing
#: restarts (``PACK_RESTARTS`` times, then the thresholds shrink by 5 %, down to 85 %).
PACK_TRIES = 2048
PACK_RESTARTS = 3


def pack_box(composition: Mapping[str, int], *, density: float, seed: int = 0) -> Any:
    """Pack ``composition`` into a cubic periodic box at ``density`` (g/cm^3), fast and
    without false bonds: like ``sim_backend.chem.build.build_box`` (same molecules, same
    order, same ``info`` and ``mol_id``), but with an element-pair distance (see
    :data:`PACK_CONTACT_SCALE`) instead of one ``min_distance``, and poses tried in
    vectorised batches. ``build_box`` with its 1.9 Å can take minutes at liquid density;
    a lower single distance lets carbon and oxygen atoms of two molecules touch closer
    than a C-O bond cutoff. ``info["pack_scale"]`` says how far the thresholds shrank."""
    from ase.data import covalent_radii
    from scipy.spatial import cKDTree  # type: ignore[import-untyped]

    comp = parse_composition(composition)
    rng = np.random.default_rng(seed)
    mols = _molecules(comp, seed)
    mass = sum(float(m.get_masses().sum()) for _, m in mols)
    length = float((mass / (density / AMU_PER_A3_TO_G_PER_CM3)) ** (1 / 3))
    zmax = 1 + max(int(m.numbers.max()) for _, m in mols)
    r = covalent_radii[:zmax]
    base = np.maximum(PACK_CONTACT_SCALE * 1.2 * (r[:, None] + r[None, :]), PACK_MIN_DISTANCE)
    batch, k_near = 64, 24
    for scale in (1.0, 0.95, 0.9, 0.85):
        thr2 = (scale * base) ** 2
        for _ in range(PACK_RESTARTS):
            placed: list[tuple[str, Any, Any]] = []
            others = np.zeros((0, 3))
            oz = np.zeros(0, dtype=int)
            for name, mol in mols:
                local = mol.positions - mol.positions.mean(0)
                tree = cKDTree(others % length, boxsize=length) if len(others) else None
                reach = float(np.sqrt(thr2[mol.numbers].max()))
                pos = None
                for _ in range(PACK_TRIES // batch):
                    rot = np.stack([random_rotation(rng) for _ in range(batch)])
                    cand = np.einsum("ij,bkj->bik", local, rot) + rng.random((batch, 1, 3)) * length
                    if tree is None:
                        pos = cand[0]
                        break
                    ok = _poses_clear(tree, cand % length, mol.numbers, oz, thr2, reach, k_near)
                    if ok.any():
                        pos = cand[int(np.argmax(ok))]
                        break
                if pos is None:
                    break
                placed.append((name, pos, mol))
                others = np.concatenate([others, pos])
                oz = np.concatenate([oz, mol.numbers])
            if len(placed) == len(mols):
                atoms = _assemble(placed, comp, seed)
                atoms.cell = np.eye(3) * length
                atoms.pbc = True
                atoms.wrap()  # type: ignore[no-untyped-call]
                gap = _push_apart(atoms)
                atoms.info.update(config="box", pack_scale=scale, min_distance_A=gap)
                return atoms
    raise SimInputError(
        f"density: could not pack {dict(comp)} at {density:.3f} g/cm3 ({length:.1f} Å box) "
        "even with the contact distances at 85 %; lower the density"
    )


def _push_apart(atoms: Any, iterations: int = 300) -> float:
    """Move whole molecules (rigid translations) until atoms of different molecules are
    at least :data:`RELAX_DISTANCE` apart (:data:`RELAX_DISTANCE_LI` for Li+), like
    Packmol's tolerance; returns the smallest intermolecular distance left. The box is
    the cubic one :func:`pack_box` makes.

    Random insertion at liquid density only finds room down to ~1.3 Å contacts; MD
    from there puts the potential far outside its training data (H...H at 1.3 Å) and
    blows bonds within tens of femtoseconds, while insertion at 1.9 Å takes minutes."""
    from scipy.spatial import cKDTree

    length = float(atoms.cell[0, 0])
    mol = np.asarray(atoms.arrays["mol_id"])
    is_li = atoms.numbers == 3
    n_mol = int(mol.max()) + 1
    pos = atoms.positions % length
    d_min = float("inf")
    for _ in range(iterations):
        pairs = cKDTree(pos, boxsize=length).query_pairs(RELAX_DISTANCE, output_type="ndarray")
        i, j = pairs[:, 0], pairs[:, 1]
        inter = mol[i] != mol[j]
        i, j = i[inter], j[inter]
        vec = pos[j] - pos[i]
        vec -= length * np.round(vec / length)  # minimum image
        d = np.linalg.norm(vec, axis=1)
        d_min = float(d.min()) if d.size else RELAX_DISTANCE
        target = np.where(is_li[i] | is_li[j], RELAX_DISTANCE_LI, RELAX_DISTANCE)
        short = d < target
        if not short.any():
            break
        push = (0.5 * (target - d) / np.maximum(d, 1e-6))[short, None] * vec[short]
        move = np.zeros((n_mol, 3))
        np.add.at(move, mol[j[short]], push)
        np.add.at(move, mol[i[short]], -push)
        step = np.linalg.norm(move, axis=1, keepdims=True)
        move *= np.minimum(1.0, RELAX_MAX_STEP / np.maximum(step, 1e-12))
        pos = (pos + move[mol]) % length
    atoms.positions = pos
    return d_min


def _poses_clear(
    tree: Any, cand: Any, z: Any, oz: Any, thr2: Any, reach: float, k_near: int
) -> Any:
    """Which of the candidate poses ``cand`` [B, m, 3] (wrapped into the box) keep every
    atom at least its element-pair distance (``thr2``, squared) from the placed atoms of
    ``tree`` (elements ``oz``). The ``k_near`` nearest within ``reach`` are checked; a
    pose with more than that many atoms within reach is crowded: rejected."""
    b, m, _ = cand.shape
    d, idx = tree.query(cand.reshape(-1, 3), k=k_near, distance_upper_bound=reach)
    near = np.isfinite(d)
    zo = oz[np.where(near, idx, 0)]
    lim = thr2[np.repeat(z[None], b, 0).reshape(-1)[:, None], zo]
    bad = near & (d * d < lim)
    bad[:, -1] |= near[:, -1]  # all k within reach: too crowded to judge, reject
    out: Any = ~bad.reshape(b, m * k_near).any(axis=1)
    return out
