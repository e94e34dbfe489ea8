"""The spacing guard refuses exactly the sites that structural validity would reject."""

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.geometry import cellpar_to_cell

from ase_crystal_llm.chemistry.validity import structure_valid
from ase_crystal_llm.generation.constraints import CrystalGrammar
from ase_crystal_llm.generation.spacing import (
    GRID,
    CovalentSites,
    FreeSites,
    RowSpacing,
    blocked_steps,
    coordinate_sites,
)
from ase_crystal_llm.text.prompts import PromptTemplate
from ase_crystal_llm.text.tokenizer import tokenizer_for_template

LATTICE = "5.0 5.0 5.0\n90 90 90\n"  # 0.01 of a coordinate is 0.05 A


def _valid_with(cell, sites, site):
    frac = np.array([*sites, site], dtype=float) / GRID
    return structure_valid(Atoms("H" * len(frac), scaled_positions=frac, cell=cell, pbc=True))


@pytest.mark.slow
@pytest.mark.parametrize("cellpar", [(4.0, 4.0, 4.0, 90, 90, 90), (5.1, 6.3, 7.2, 80, 95, 110),
                                     (2.5, 2.5, 6.0, 90, 90, 120), (3.0, 9.0, 3.2, 60, 70, 65)])
def test_free_sites_agree_with_structure_valid(cellpar):
    cell = cellpar_to_cell(cellpar)
    steps, self_image = blocked_steps(cell, 0.5)
    assert not self_image
    sites = FreeSites(steps)
    rng = np.random.default_rng(0)
    placed = []
    for _ in range(4):  # each new atom on a site the guard calls free
        free = np.argwhere(sites.free)
        site = tuple(int(v) for v in free[rng.integers(len(free))])
        placed.append(site)
        sites.place(site)
    for site in rng.integers(0, GRID, size=(300, 3)):
        assert sites.free[tuple(site)] == _valid_with(cell, placed, site), site
    assert (sites.free_x == sites.free.any(axis=(1, 2))).all()
    assert (sites.free_xy == sites.free.any(axis=2)).all()


def test_a_too_short_lattice_vector_leaves_no_site():
    steps, self_image = blocked_steps(cellpar_to_cell([0.4, 5, 5, 90, 90, 90]), 0.5)
    assert self_image
    assert not FreeSites(steps, full=self_image).free.any()


def test_degenerate_or_flat_cells_leave_the_guard_off():
    assert blocked_steps(np.zeros((3, 3)), 0.5) == (None, False)
    assert blocked_steps(cellpar_to_cell([9, 9, 9, 1, 1, 1]), 0.5) == (None, False)
    row = RowSpacing(0.5)
    row.feed("9.0 9.0 9.0\n1 1 1\nNa\n0.00 0.00 0.00\nCl\n0.00 0.00 0.0")
    assert not row.active and row.fits("0")


@pytest.mark.parametrize("line, complete, sites", [
    ("", False, [None, None, None]),
    ("0", False, [None, None, None]),
    ("0.", False, [None, None, None]),
    ("0.2", False, [slice(20, 30), None, None]),
    ("0.2", True, [20, None, None]),
    ("0.25 0.5", False, [25, slice(50, 60), None]),
    ("0.25 0.5", True, [25, 50, None]),
    ("1 0.07 0.3", True, [0, 7, 30]),  # 1.00 wraps to 0.00
    ("0.253 0.1 ", False, [25, 10, None]),  # a third decimal is ignored
])
def test_coordinate_sites(line, complete, sites):
    assert coordinate_sites(line, complete) == tuple(sites)


def test_row_refuses_digits_that_lead_onto_a_taken_site():
    row = RowSpacing(0.5)
    row.feed(LATTICE + "Na\n0.00 0.00 0.00\nCl\n0.00 0.00 0.")
    assert row.active
    assert not row.fits("0")  # 0.00-0.09: at most 0.45 A from Na
    assert row.fits("1") and row.fits("5")
    assert not row.fits("9")  # 0.90-0.99: at most 0.50 A from Na's image (exactly 0.5 is refused too)
    assert row.fits("8")
    row.feed("1")
    assert not row.fits("0") and row.fits("1")  # 0.10 is 0.50 A from Na, 0.11 is 0.55 A
    assert not row.fits("0\n") and row.fits("1\n")
    assert not row.fits("\n")  # "0.1" is 0.10
    assert row.fits("")  # end-of-sequence


@pytest.mark.slow
def test_a_full_cell_refuses_a_new_atom():
    row = RowSpacing(0.5)
    row.feed("2.0 2.0 2.0\n90 90 90\n")
    text = ""
    while row.sites.free.any():  # fill the cell, each atom on the first free site
        x, y, z = np.argwhere(row.sites.free)[0]
        line = f"H\n0.{x:02d} 0.{y:02d} 0.{z:02d}\n"
        assert row.fits(line[:1])
        row.feed(line)
        text += line
    assert not row.fits("H")
    assert row.fits("")  # end-of-sequence
    frac = np.array([[float(v) for v in ln.split()] for ln in text.splitlines()[1::2]])
    assert structure_valid(Atoms("H" * len(frac), scaled_positions=frac, cell=[2, 2, 2], pbc=True))


def test_processor_applies_the_guard_per_row():
    tok = tokenizer_for_template(PromptTemplate())
    grammar = CrystalGrammar(tok, max_atoms=4)
    text = LATTICE + "Na\n0.00 0.00 0.00\nCl\n0.00 0.00 0."
    ids = tok.encode(text, add_special_tokens=False)
    zero, one = tok.convert_tokens_to_ids("0"), tok.convert_tokens_to_ids("1")
    for min_distance, refused in ((0.5, True), (None, False)):
        proc = grammar.processor(min_distance=min_distance)
        proc.reset(2)
        for token in ids:
            proc.advance([token, token])
        proc.select([1])  # rows keep their own spacing through compaction
        masked = proc.mask(torch.zeros(1, len(tok)))
        assert bool(torch.isinf(masked[0, zero])) is refused
        assert torch.isfinite(masked[0, one])


def test_formula_rows_are_not_guarded():
    """Held to a formula, a row cannot end at will: guarded, it would pack extra units into a tiny cell."""
    tok = tokenizer_for_template(PromptTemplate())
    proc = CrystalGrammar(tok, max_atoms=4).processor(["NaCl", None], min_distance=0.5)
    proc.reset(2)
    assert proc.spacing[0] is None and proc.spacing[1] is not None
    text = LATTICE + "Na\n0.00 0.00 0.00\nCl\n0.00 0.00 0."
    for token in tok.encode(text, add_special_tokens=False):
        proc.advance([token, token])
    masked = proc.mask(torch.zeros(2, len(tok)))
    zero = tok.convert_tokens_to_ids("0")
    assert torch.isfinite(masked[0, zero]) and torch.isinf(masked[1, zero])


# -- element-aware floors (covalent radii) ----------------------------------------
def _valid_covalent(cell, symbols, sites, ratio=0.6):
    frac = np.array(sites, dtype=float) / GRID
    return structure_valid(Atoms(symbols, scaled_positions=frac, cell=cell, pbc=True), covalent_ratio=ratio)


@pytest.mark.parametrize("cellpar", [(4.0, 4.0, 4.0, 90, 90, 90), (5.1, 6.3, 7.2, 80, 95, 110),
                                     (2.5, 2.5, 6.0, 90, 90, 120), (3.0, 9.0, 3.2, 60, 70, 65)])
def test_covalent_sites_agree_with_structure_valid(cellpar):
    """Exact once x and y are fixed; the coarse field never refuses a box that holds a free site."""
    cell = cellpar_to_cell(cellpar)
    sites = CovalentSites(cell, 0.5, 0.6)
    rng = np.random.default_rng(1)
    symbols, placed = [], []
    for symbol in ("Na", "Cl", "O"):
        sites.select(symbol)
        x = next(x for x in rng.permutation(GRID) if sites.any_free(int(x), None, None)
                 and sites._plane(int(x)).any())
        y, z = np.argwhere(sites._plane(int(x)))[0]
        assert _valid_covalent(cell, [*symbols, symbol], [*placed, (x, y, z)])
        symbols.append(symbol)
        placed.append((int(x), int(y), int(z)))
        sites.place(placed[-1])
    sites.select("H")
    for site in rng.integers(0, GRID, size=(200, 3)):
        valid = _valid_covalent(cell, [*symbols, "H"], [*placed, site])
        assert sites.any_free(int(site[0]), int(site[1]), int(site[2])) == valid, site
        if valid:
            tenth = slice(site[0] // 10 * 10, site[0] // 10 * 10 + 10)
            assert sites.any_free(tenth, None, None) and sites.any_free(int(site[0]), None, None)


def test_row_keeps_na_and_cl_a_covalent_floor_apart():
    """Na-Cl needs 0.6 x (1.66 + 1.02) = 1.61 A: 1.5 A passes the flat 0.5 A floor, not this one."""
    flat, covalent = RowSpacing(0.5), RowSpacing(0.5, covalent_ratio=0.6)
    for row in (flat, covalent):
        row.feed(LATTICE + "Na\n0.00 0.00 0.00\nCl\n0.30 0.00 0.")
    assert flat.fits("0") and flat.fits("9")
    assert not covalent.fits("0") and not covalent.fits("9")  # z 0.00-0.09, 0.90-0.99: under 1.58 A from Na
    assert covalent.fits("1") and covalent.fits("5")
    covalent.feed("1")
    assert not covalent.fits("1\n") and covalent.fits("2\n")  # z 0.11: 1.598 A, 0.12: 1.616 A


def test_an_element_with_no_room_is_refused():
    """In a 2.8 A cell Cs touches its own image (2 x 0.6 x 2.44 = 2.93 A); C and H still fit."""
    row = RowSpacing(0.5, covalent_ratio=0.6)
    row.feed("2.8 2.8 2.8\n90 90 90\n")
    assert row.active
    assert row.fits("H") and row.fits("C")  # C could still become Cl, Co, ...
    assert not row.fits("Cs") and not row.fits("Cs\n")
    row.feed("C")
    assert not row.fits("s") and row.fits("\n") and row.fits("l")


def test_covalent_floors_guard_formula_rows_too():
    """Covalent floors bound how densely a formula row can pack its units, so every row is guarded."""
    tok = tokenizer_for_template(PromptTemplate())
    proc = CrystalGrammar(tok, max_atoms=4).processor(["NaCl", None], min_distance=0.5, covalent_ratio=0.6)
    proc.reset(2)
    assert [row.covalent_ratio for row in proc.spacing] == [0.6, 0.6]
    text = LATTICE + "Na\n0.00 0.00 0.00\nCl\n0.30 0.00 0."
    for token in tok.encode(text, add_special_tokens=False):
        proc.advance([token, token])
    masked = proc.mask(torch.zeros(2, len(tok)))
    zero, two = tok.convert_tokens_to_ids("0"), tok.convert_tokens_to_ids("2")
    assert torch.isinf(masked[:, zero]).all() and torch.isfinite(masked[:, two]).all()


def test_formula_rows_hold_to_the_units_their_cell_has_room_for():
    """A 3.6 A cube (46.7 A^3) holds 2 NaCl units at 0.9 x 23.6 A^3 of covalent spheres each, not 3."""
    tok = tokenizer_for_template(PromptTemplate())
    grammar = CrystalGrammar(tok, max_atoms=12)
    assert grammar.target("NaCl").k_max == 6 and grammar.target("NaCl").unit_volume == pytest.approx(23.61, abs=0.01)
    assert grammar.target("NaCl", max_units=2).k_max == 2
    assert grammar.target("NaCl", max_units=0).k_max == 1  # one unit is always allowed
    assert grammar.target("NaCl", max_units=99) is grammar.target("NaCl")
    text = "3.6 3.6 3.6\n90 90 90\n" + "".join(f"{e}\n0.{i}0 0.{j}0 0.50\n" for e, i, j in
                                                 [("Na", 0, 0), ("Na", 5, 5), ("Cl", 0, 5), ("Cl", 5, 0)])
    na = tok.convert_tokens_to_ids("N")
    for ratio, na_allowed in [(0.9, False), (None, True)]:
        proc = grammar.processor(["NaCl"], min_distance=0.5, covalent_ratio=0.6, volume_ratio=ratio)
        proc.reset(1)
        for token in tok.encode(text, add_special_tokens=False):
            proc.advance([token])
        masked = proc.mask(torch.zeros(1, len(tok)))
        assert bool(torch.isfinite(masked[0, na])) is na_allowed
        assert torch.isfinite(masked[0, sorted(grammar.eos_ids)]).any()  # two whole units: it may end


def test_too_dense_compares_the_cell_with_covalent_volume():
    from ase.build import bulk

    from ase_crystal_llm.chemistry.validity import covalent_volume, too_dense

    rocksalt = bulk("NaCl", "rocksalt", a=5.64)  # 44.9 A^3 per NaCl, covalent spheres 23.6 A^3
    assert covalent_volume({"Na": 1, "Cl": 1}) == pytest.approx(23.61, abs=0.01)
    assert not too_dense(rocksalt)
    squeezed = rocksalt.copy()
    squeezed.set_cell(rocksalt.cell * 0.75, scale_atoms=True)  # 18.9 A^3: below 0.9 x 23.6
    assert too_dense(squeezed) and not too_dense(squeezed, volume_ratio=0.7)


def test_pair_floors_and_structure_valid():
    from ase.build import bulk

    from ase_crystal_llm.chemistry.validity import pair_floors

    floors = pair_floors([11, 17, 1], 0.5, 0.6)
    assert floors[0, 1] == pytest.approx(0.6 * (1.66 + 1.02)) and floors[2, 2] == 0.5  # H-H: 0.37 < 0.5
    assert (pair_floors([11, 17], 0.5) == 0.5).all()
    rocksalt = bulk("NaCl", "rocksalt", a=5.64)  # Na-Cl 2.82 A
    squeezed = bulk("NaCl", "rocksalt", a=3.0)  # Na-Cl 1.50 A
    assert structure_valid(rocksalt, covalent_ratio=0.6) and structure_valid(squeezed)
    assert not structure_valid(squeezed, covalent_ratio=0.6)
