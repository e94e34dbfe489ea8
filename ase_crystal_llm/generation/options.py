"""The options of generation: :class:`GenerationOptions` and the sampling defaults.

Each option of :meth:`~.generator.CrystalGenerator.generate`,
:func:`~.workflow.generate_to_file` and ``crystal-llm generate`` is a field
here with its help; the CLI options and the parameter docs are built from
them (:mod:`ase_crystal_llm.options`).  Each default has one home: this
module, except the card's recommended sampling
(:mod:`ase_crystal_llm.model.modelcard`) and the distance floors
(:mod:`ase_crystal_llm.chemistry.validity`).  No torch on import:
``crystal-llm --help`` reads it.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from ase_crystal_llm.chemistry.validity import COVALENT_RATIO, MIN_DISTANCE
from ase_crystal_llm.model.modelcard import DEFAULT_TEMPERATURE, DEFAULT_TOP_P
from ase_crystal_llm.options import non_negative_float, positive_float, positive_int

__all__ = [
    "BATCH_SIZE_CPU", "BATCH_SIZE_GPU", "DEFAULT_MAX_ATOMS", "DEFAULT_MAX_ATTEMPTS", "EXTRA_ATOMS",
    "GenerationOptions", "spacegroups",
]


DEFAULT_MAX_ATOMS = 30


DEFAULT_MAX_ATTEMPTS = 5


# Crystals decoded together by default: 64 is the best on CPU in benchmarks/generation_cpu.py.
BATCH_SIZE_CPU = 64


BATCH_SIZE_GPU = 256


# The charge guard lets the model write at most this many atoms past a charge-unbalanced end.
EXTRA_ATOMS = 8


def spacegroups(text: str) -> list[int]:
    """argparse type: comma-separated space groups, numbers 1-230 or Hermann-Mauguin symbols (Fm-3m)."""
    from ase_crystal_llm.text.prompts import spacegroup_number

    try:
        return [spacegroup_number(part.strip()) for part in text.split(",")]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{err}" + (f" (in {text!r})" if "," in text else "")) from None


_CYCLE = "In Python, several values are a list, which cycles over the crystals (several prompts share a batch)."


@dataclass
class GenerationOptions:
    """What to sample and how: conditions, decoding constraints and sampling settings."""

    formula: str | list | None = field(default=None, metadata={
        "help": "chemical formula condition (comma-separated for several); samples are decoded as whole "
                "multiples of it (Z formula units) unless --free-formula",
        "doc": f"{_CYCLE} Conditions are written into the prompt as in training.",
        "doc_type": "str or list of str, optional"})
    constrain_formula: bool = field(default=True, metadata={
        "help": "with a formula condition, decode only crystals whose composition is a whole number of formula "
                "units (``k`` times the formula, ``k >= 1``, at most ``max_atoms`` atoms); rows without a "
                "formula are free",
        "doc": "``False``: the formula is only written into the prompt.  Recorded per crystal as "
               "``info[\"formula_constrained\"]``.",
        "flag": "--free-formula",
        "cli_help": "write --formula into the prompt only and let the model choose the composition "
                    "(measures the model's own formula skill)"})
    spacegroup: int | str | list | None = field(default=None, metadata={
        "help": "space group condition: a number or Hermann-Mauguin symbol, e.g. 225 or Fm-3m "
                "(comma-separated for several)",
        "type": spacegroups, "doc": _CYCLE, "doc_type": "int, str or list, optional"})
    e_above_hull: float | list | None = field(default=None, metadata={
        "help": "energy above hull condition, eV/atom", "type": float, "doc": _CYCLE})
    band_gap: float | list | None = field(default=None, metadata={
        "help": "band gap condition, eV", "type": float, "doc": _CYCLE})
    formation_energy: float | list | None = field(default=None, metadata={
        "help": "formation energy condition, eV/atom", "type": float, "doc": _CYCLE})
    elements: str | list | None = field(default=None, metadata={
        "help": "comma-separated elements allowed in the samples, e.g. Li,Fe,P,O",
        "doc": "Or a sequence of symbols.  Constrained decoding: with a formula, they must include the "
               "formula's elements.",
        "doc_type": "str or sequence of str, optional"})
    temperature: float | None = field(default=None, metadata={
        "help": f"sampling temperature; 0 is greedy (default: the model card's, else {DEFAULT_TEMPERATURE})",
        "type": float,
        "doc": "When every prompt has a condition, the defaults of ``temperature`` and ``top_p`` are the card's "
               "``sampling[\"conditioned\"]`` values where it has them, and when every crystal is held to a "
               "formula, its ``sampling[\"formula_constrained\"]`` values."})
    coordinate_temperature: float | None = field(default=None, metadata={
        "help": "temperature of the fractional coordinates only, > 0 (default: --temperature when given, else "
                "the model card's, else the temperature); colder coordinates keep the exact relations between "
                "atomic positions that make a crystal symmetric",
        "type": positive_float, "metavar": "T",
        "doc": "Elements, cells and the end of the crystal are drawn at ``temperature``.  The card's value "
               "(its ``sampling`` and ``conditioned`` / ``formula_constrained`` entries, as for "
               "``temperature``) applies only when ``temperature`` is not given either.  No effect on greedy "
               "decoding (``temperature=0``).  Recorded per crystal as "
               "``info[\"coordinate_temperature\"]`` when it differs from ``temperature``."})
    top_p: float | None = field(default=None, metadata={
        "help": "nucleus sampling: keep the smallest set of tokens with this probability mass, in (0, 1] "
                f"(default: the model card's, else {DEFAULT_TOP_P})",
        "type": positive_float})
    guidance_scale: float | None = field(default=None, metadata={
        "help": "classifier-free guidance of the text conditions: each crystal is decoded beside a twin with the "
                "unconditioned prompt and their log-probabilities mixed as uncond + scale * (cond - uncond); 1 is "
                "none, > 1 follows the conditions harder (default: the model card's for the condition kind, else 1)",
        "type": non_negative_float, "metavar": "SCALE",
        "doc": "The card's ``sampling[\"guidance_scale\"]`` maps condition kinds to scales; a run takes the "
               "scale of its first condition kind the card names, in the order formula, formation_energy, "
               "band_gap, e_above_hull, spacegroup.  Unconditioned crystals are never guided.  Costs a "
               "second row per crystal while decoding."})
    batch_size: int | None = field(default=None, metadata={
        "help": f"crystals decoded together (default {BATCH_SIZE_CPU} on CPU, {BATCH_SIZE_GPU} on a GPU)",
        "type": positive_int})
    max_attempts: int = field(default=DEFAULT_MAX_ATTEMPTS, metadata={
        "help": "samples drawn at most per requested crystal (default %(default)s)", "type": positive_int,
        "doc": "A crystal with no usable sample by then is given up."})
    max_atoms: int = field(default=DEFAULT_MAX_ATOMS, metadata={
        "help": "most atoms per crystal (default %(default)s)", "type": positive_int,
        "doc": "It bounds ``max_new_tokens``."})
    min_distance: float | None = field(default=MIN_DISTANCE, metadata={
        "help": "re-sample crystals with atoms closer than this (default %(default)s, CDVAE's structural "
                "validity; 0 keeps all)",
        "type": non_negative_float, "metavar": "ANGSTROM", "doc_type": "float or None",
        "doc": "In angstrom; an atom and its own periodic image count, and so does a cell under 0.1 A^3.  "
               "Re-sampled crystals count as attempts, so validity over all attempts stays measurable.  "
               "``None`` keeps every parsed crystal too, whatever ``covalent_ratio``."})
    covalent_ratio: float | None = field(default=COVALENT_RATIO, metadata={
        "help": "also re-sample crystals with two atoms closer than this fraction of the sum of their covalent "
                "radii, as ase_ga's closest_distances_generator (default %(default)s: no MP-20 crystal is "
                "closer; 0 keeps only --min-distance)",
        "type": non_negative_float, "metavar": "RATIO", "doc_type": "float or None",
        "doc": "Each pair needs ``max(min_distance, covalent_ratio * (r_i + r_j))`` with ASE's covalent "
               "radii (:func:`~ase_crystal_llm.chemistry.validity.pair_floors`): 0.5 A is a benchmark "
               "convention, and 1.6 A between Na and Cl is closer than any real crystal.  The spacing "
               "guard applies the same floors while decoding.  Structural validity in the metrics stays "
               "CDVAE's 0.5 A.  ``None`` (or 0): the flat floor only."})
    spacing_guard: bool = field(default=True, metadata={
        "help": "while decoding, refuse coordinates that would put an atom closer than the floor "
                "(--min-distance, --covalent-ratio) to one already written (see :mod:`.spacing`), so that few "
                "samples are wasted",
        "doc": "``False``: the model places atoms alone (to measure its own validity).  Off when "
               "``min_distance`` is off, and in formula-constrained rows (held to a formula, the guard let the "
               "model pack extra formula units into far too small cells).",
        "flag": "--no-spacing-guard",
        "cli_help": "let the model place atoms alone (too-close crystals are then only re-sampled); by default "
                    "decoding refuses coordinates closer than the floor (--min-distance, --covalent-ratio) to an "
                    "atom already written"})
    charge_guard: bool = field(default=True, metadata={
        "help": "while decoding, refuse to end a crystal whose composition is not charge balanced (SMACT's "
                f"test, as compositional validity), for at most {EXTRA_ATOMS} more atoms: the model writes "
                "another atom instead",
        "doc": "``False``: the model ends crystals alone.  Rows held to a formula are not affected.",
        "flag": "--no-charge-guard",
        "cli_help": "let the model end crystals alone; by default decoding refuses to end a crystal whose "
                    f"composition is not charge balanced (SMACT), for at most {EXTRA_ATOMS} more atoms"})
    symmetrize: float | None = field(default=None, metadata={
        "help": "snap samples to their space group at this tolerance", "type": positive_float,
        "metavar": "SYMPREC", "doc": "The ``symprec`` of spglib."})
    seed: int | None = field(default=None, metadata={
        "help": "random seed; the same seed and settings give the same crystals (default: a fresh one, recorded "
                "in the run record)",
        "type": int,
        "doc": "The same crystals come on the same device; ``generate`` records the seed in ``stats.seed``."})
    fast: bool = field(default=True, metadata={
        "help": "decode with the lean, KV-buffered sampling loop (``False``: ``model.generate``)",
        "flag": "--plain", "cli_help": "decode with model.generate instead of the fast sampler"})
