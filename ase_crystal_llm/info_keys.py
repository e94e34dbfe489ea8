"""The ``atoms.info`` keys: the contract between reading, generation, relaxation and evaluation.

Every key is ase.db-safe (a plain name; values are str, int, float or bool),
so a structure keeps them through extxyz, traj, json and ``ase.db``.  Missing
values are absent, never NaN or zero.  Code that writes or reads one of these
keys uses the constant, never the string.

Properties read from a dataset (:mod:`ase_crystal_llm.data.datasets`)
    :data:`MATERIAL_ID`, :data:`PRETTY_FORMULA`, :data:`FORMATION_ENERGY`
    (eV/atom), :data:`BAND_GAP` (eV), :data:`E_ABOVE_HULL` (eV/atom),
    :data:`SPACEGROUP_NUMBER` (from the CSV column ``spacegroup.number``).

Generated crystals (:meth:`~ase_crystal_llm.generation.generator.CrystalGenerator.generate`)
    the conditions asked as ``condition_<key>`` (:data:`CONDITION_PREFIX`:
    ``condition_formula``, ``condition_spacegroup``, ...) and
    :data:`CONDITION_ELEMENTS` (comma-separated); :data:`FORMULA_CONSTRAINED`
    (bool: decoding was held to whole multiples of the formula);
    :data:`GENERATED_TEXT` (the model's text on one line, lines joined by
    ``" | "``); :data:`TEMPERATURE`, :data:`TOP_P`, :data:`SEED`;
    :data:`COORDINATE_TEMPERATURE` (where coordinates were drawn at another
    temperature than the rest);
    :data:`GUIDANCE_SCALE` (conditioned crystals: the classifier-free guidance
    scale, 1 = none);
    :data:`ATTEMPTS` (model outputs spent on this crystal: 1 + the failed ones
    before it); the identifiers :data:`RUN_ID`, :data:`RANK`,
    :data:`SAMPLE_INDEX` (``(run_id, sample_index)`` is unique).  Evaluation
    also reads a dict or JSON string under :data:`CONDITIONS`.

Relaxed crystals (:func:`~ase_crystal_llm.evaluation.relaxation.relax`)
    :data:`ENERGY` (total, eV), :data:`POTENTIAL`, :data:`ENERGY_SCALE`
    (``"mp_raw"``: needs the MP2020 correction; ``"mp2020"``: already
    corrected), :data:`RELAX_CONVERGED`, :data:`RELAX_STEPS`; a failed one
    :data:`RELAX_FAILED` = True and :data:`RELAX_ERROR`.

GA children (:mod:`ase_crystal_llm.ga.operators`)
    :data:`PARENT_INDEX`, :data:`MUTATION` (e.g. ``"Na->K"``), :data:`ORIGIN`
    (the operator's name).
"""

from __future__ import annotations

__all__ = [
    "ATTEMPTS", "BAND_GAP", "CONDITIONS", "CONDITION_ELEMENTS", "CONDITION_PREFIX", "COORDINATE_TEMPERATURE",
    "ENERGY", "ENERGY_SCALE",
    "E_ABOVE_HULL", "FORMATION_ENERGY", "FORMULA_CONSTRAINED", "GENERATED_TEXT", "GUIDANCE_SCALE",
    "MATERIAL_ID", "MUTATION",
    "ORIGIN", "PARENT_INDEX", "POTENTIAL", "PRETTY_FORMULA", "RANK", "RELAX_CONVERGED", "RELAX_ERROR",
    "RELAX_FAILED", "RELAX_STEPS", "RUN_ID", "SAMPLE_INDEX", "SEED", "SPACEGROUP_NUMBER", "TEMPERATURE", "TOP_P",
    "condition_key",
]

# dataset properties
MATERIAL_ID = "material_id"
PRETTY_FORMULA = "pretty_formula"
FORMATION_ENERGY = "formation_energy_per_atom"
BAND_GAP = "band_gap"
E_ABOVE_HULL = "e_above_hull"
SPACEGROUP_NUMBER = "spacegroup_number"

# generation
CONDITION_PREFIX = "condition_"
CONDITION_ELEMENTS = "condition_elements"
CONDITIONS = "conditions"
FORMULA_CONSTRAINED = "formula_constrained"
GENERATED_TEXT = "generated_text"
TEMPERATURE = "temperature"
TOP_P = "top_p"
COORDINATE_TEMPERATURE = "coordinate_temperature"
GUIDANCE_SCALE = "guidance_scale"
SEED = "seed"
ATTEMPTS = "attempts"
RUN_ID = "run_id"
RANK = "rank"
SAMPLE_INDEX = "sample_index"

# relaxation
ENERGY = "energy"
POTENTIAL = "potential"
ENERGY_SCALE = "energy_scale"
RELAX_CONVERGED = "relax_converged"
RELAX_STEPS = "relax_steps"
RELAX_FAILED = "relax_failed"
RELAX_ERROR = "relax_error"

# genetic algorithm
PARENT_INDEX = "parent_index"
MUTATION = "mutation"
ORIGIN = "origin"


def condition_key(condition: str) -> str:
    """The info key of a generation condition: ``"formula"`` -> ``"condition_formula"``."""
    return CONDITION_PREFIX + condition
