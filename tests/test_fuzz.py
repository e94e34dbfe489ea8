"""Property-based fuzzing of the crystal text parser.

Whatever text comes in -- random characters, real crystals cut short or
mutated, absurd numbers, unicode, blank lines -- ``text_to_atoms`` either
raises ``CrystalTextError`` or returns a usable periodic structure.  The long
run (100,000+ inputs from MP-20) is ``benchmarks/fuzz_parser.py``.
"""

import re

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk
from ase.spacegroup import crystal
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ase_crystal_llm.text.format import ELEMENTS, MAX_ATOMS, MIN_VOLUME, CrystalTextError, atoms_to_text, text_to_atoms

# ~10-20 s in all on a shared 2-core machine.
FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def check_valid(atoms, max_atoms=MAX_ATOMS):
    """Assert that a parsed structure is something every later step can use."""
    assert isinstance(atoms, Atoms)
    assert atoms.pbc.all()
    cell = atoms.cell.array
    assert np.isfinite(cell).all()
    assert atoms.cell.rank == 3
    # The parser promises at least MIN_VOLUME for the cell it actually builds.
    assert atoms.cell.volume >= MIN_VOLUME
    assert 1 <= len(atoms) <= max_atoms
    assert np.isfinite(atoms.positions).all()
    assert set(atoms.get_chemical_symbols()) <= set(ELEMENTS)
    assert ((atoms.numbers >= 1) & (atoms.numbers <= len(ELEMENTS))).all()
    scaled = atoms.get_scaled_positions(wrap=False)
    assert np.isfinite(scaled).all()


def parse_or_reject(text, **kwargs):
    """The property: a CrystalTextError or a valid structure, nothing else."""
    try:
        atoms = text_to_atoms(text, **kwargs)
    except CrystalTextError as err:
        assert str(err).strip(), "a rejection must say why"
        return None
    check_valid(atoms, kwargs.get("max_atoms", MAX_ATOMS))
    return atoms


def _seeds():
    """A few real crystal strings (no data folder needed)."""
    structures = [
        bulk("NaCl", "rocksalt", a=5.64),
        bulk("Si", "diamond", a=5.43),
        bulk("Cu", "fcc", a=3.6, cubic=True),
        bulk("Mg", "hcp", a=3.21, c=5.21),
        crystal(["Ti", "O"], basis=[(0, 0, 0), (0.3, 0.3, 0)], spacegroup=136, cellpar=[4.6, 4.6, 2.96, 90, 90, 90]),
        crystal(["Ca", "Ti", "O"], basis=[(0, 0, 0), (0.5, 0.5, 0.5), (0.5, 0.5, 0)], spacegroup=221,
                cellpar=[3.9, 3.9, 3.9, 90, 90, 90]),
    ]
    return [atoms_to_text(a) for a in structures]


SEEDS = _seeds()

# Pieces that look like the format: numbers of every kind, symbols real and not.
NUMBER_TOKENS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(-(10**400), 10**400).map(str),
    st.sampled_from(["0", "-0", "0.00", "1.00", "1e308", "1e309", "-1e309", "1e-320", "nan", "inf", "-inf",
                     "1_0", "0x10", "1e", ".", "-", "+.5", "5.", "１", "٣", "²", "1,5", "90.0000001"]),
)
SYMBOL_TOKENS = st.one_of(st.sampled_from(ELEMENTS), st.sampled_from(["X", "na", "NA", "[MASK]", "D", "T", "Uuo", ""]),
                          st.text(max_size=3))
LINE_ENDS = st.sampled_from(["\n", "\r\n", "\r", "\n\n", "\n \n", "\u2028", "\x85", "\x0b", "\x1c"])


@st.composite
def crystal_like(draw):
    """Text with the shape of a crystal whose fields are drawn from anywhere."""
    def triple():
        return " ".join(draw(st.lists(NUMBER_TOKENS, min_size=2, max_size=4)))

    lines = [triple(), triple()]
    for _ in range(draw(st.integers(0, 6))):
        lines += [draw(SYMBOL_TOKENS), triple()]
    if draw(st.booleans()):
        lines = lines[: draw(st.integers(0, len(lines)))]
    out = ""
    for line in lines:
        out += line + draw(LINE_ENDS)
    return out


@st.composite
def mutated_seed(draw):
    """A real crystal string cut short, edited character-wise or line-wise."""
    text = draw(st.sampled_from(SEEDS))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["truncate", "delete", "insert", "replace", "dup_line", "drop_line",
                                     "swap_lines", "huge", "blank"]))
        lines = text.split("\n")
        if kind == "truncate":
            text = text[: draw(st.integers(0, len(text)))]
        elif kind in ("delete", "insert", "replace") and text:
            i = draw(st.integers(0, len(text) - 1))
            piece = draw(st.text(min_size=1, max_size=4))
            text = {"delete": text[:i] + text[i + 1:], "insert": text[:i] + piece + text[i:],
                    "replace": text[:i] + piece + text[i + 1:]}[kind]
        elif kind == "dup_line":
            i = draw(st.integers(0, len(lines) - 1))
            text = "\n".join(lines[: i + 1] + lines[i:])
        elif kind == "drop_line":
            i = draw(st.integers(0, len(lines) - 1))
            text = "\n".join(lines[:i] + lines[i + 1:])
        elif kind == "swap_lines" and len(lines) > 1:
            i, j = draw(st.integers(0, len(lines) - 1)), draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
            text = "\n".join(lines)
        elif kind == "huge":
            i = draw(st.integers(0, len(lines) - 1))
            number = draw(st.sampled_from(["1e308", "1e400", "9" * 400, "-1e308", "1e-400", "nan", "inf"]))
            fields = lines[i].split() or [""]
            fields[draw(st.integers(0, len(fields) - 1))] = number
            lines[i] = " ".join(fields)
            text = "\n".join(lines)
        elif kind == "blank":
            i = draw(st.integers(0, len(lines)))
            text = "\n".join(lines[:i] + [draw(st.sampled_from(["", " ", "\t", "\u3000"]))] + lines[i:])
    return text


@FUZZ
@given(st.text())
@example("")
@example("\n\n\n")
@example("\x00")
def test_random_text(text):
    parse_or_reject(text)


@pytest.mark.slow
@FUZZ
@given(crystal_like())
def test_crystal_shaped_text(text):
    parse_or_reject(text)


@FUZZ
@given(mutated_seed())
def test_mutated_real_crystals(text):
    parse_or_reject(text)


@st.composite
def flat_angles(draw):
    """Angles on or next to the edge of the possible (a flat or collapsed cell)."""
    a = draw(st.floats(0, 180))
    b = a if draw(st.booleans()) else draw(st.floats(0, 180))
    g = draw(st.sampled_from([a + b, abs(a - b), 360 - a - b, 0.0, 180.0]))
    g += draw(st.floats(-1, 1)) * 10.0 ** draw(st.integers(-16, -4))
    return tuple(draw(st.permutations([a, b, g])))


@FUZZ
@given(st.tuples(*[st.floats(0, 1100)] * 3), st.one_of(st.tuples(*[st.floats(-10, 190)] * 3), flat_angles()))
@example((184.0, 189.0, 193.0), (19.0, 19.0, 1.974640500263758e-07))  # closed-form volume ok, real cell flat
@example((92.0, 96.0, 760.0), (55.5, 7.705884426405052e-08, 55.5))  # real cell volume exactly 0
@example((162.06647626963525, 886.0282238313188, 173.48172970985846),
         (9.774206806660734e-16, 6.765569885656619, 6.765569885656619))  # ase's cellpar_to_cell asserted
def test_any_cell_parameters(lengths, angles):
    """Near-degenerate cells: what the parser accepts must have a real 3D cell."""
    text = f"{' '.join(map(repr, lengths))}\n{' '.join(map(repr, angles))}\nNa\n0.5 0.5 0.5"
    parse_or_reject(text)


@FUZZ
@given(st.sampled_from(SEEDS), st.data())
def test_numbers_are_ascii(text, data):
    """A digit from another script (Arabic-Indic, full-width) is rejected, not read as a number."""
    digit = data.draw(st.characters(categories=["Nd"]).filter(lambda c: not c.isascii()))
    lines = text.split("\n")
    i = data.draw(st.sampled_from([0, 1, 3]))
    lines[i] = re.sub(r"[0-9]", digit, lines[i], count=1)
    with pytest.raises(CrystalTextError, match="not a number"):
        text_to_atoms("\n".join(lines))


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 40), st.integers(0, 5))
def test_atom_count_limit(max_atoms, extra):
    """Up to max_atoms atoms parse; more are rejected, never truncated."""
    n = max_atoms + extra
    text = "5.0 5.0 5.0\n90 90 90\n" + "\n".join(f"Na\n0.{i % 10}0 0.50 0.50" for i in range(n))
    atoms = parse_or_reject(text, max_atoms=max_atoms)
    assert (atoms is not None) == (n <= max_atoms)
    if atoms is not None:
        assert len(atoms) == n


def test_seeds_parse():
    """The unmutated seeds are valid crystals (else the mutations prove little)."""
    for text in SEEDS:
        assert parse_or_reject(text) is not None
