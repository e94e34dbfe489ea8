"""Prompts of the multitask curriculum (Gruver et al., ICLR 2024).

Two tasks share one model:

* **generation**: a description of the material (optionally with condition
  sentences: formula, formation energy, band gap, energy above hull, space
  group) followed by an instruction; the answer is the crystal text.
* **infill**: a crystal whose atoms of one element are replaced by ``[MASK]``;
  the answer is that element's symbol.

Every prompt, for training and for generation alike, is built here, and the
exact wording travels with a trained model in its card
(:meth:`PromptTemplate.to_dict`), so generation uses what training used.
Units: energies in eV/atom, band gap in eV.
"""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from ase_crystal_llm.text.format import MASK, atoms_to_text, mask_element

if TYPE_CHECKING:
    from collections.abc import Mapping

    from ase import Atoms

__all__ = [
    "CONDITION_KEYS", "Example", "GENERATION", "INFILL", "INFO_TO_CONDITION", "PromptTemplate",
    "conditions_from_info", "example_rng", "format_number", "make_example", "spacegroup_names",
    "spacegroup_number",
]


# Condition keys in the order they are always written.
CONDITION_KEYS = ("formula", "formation_energy", "band_gap", "e_above_hull", "spacegroup")


# atoms.info property names (docs/architecture.md) -> condition keys.
INFO_TO_CONDITION = {
    "pretty_formula": "formula",
    "formation_energy_per_atom": "formation_energy",
    "band_gap": "band_gap",
    "e_above_hull": "e_above_hull",
    "spacegroup_number": "spacegroup",
}


GENERATION = "generation"


INFILL = "infill"


def _default_sentences():
    return {
        "formula": "The chemical formula is {}. ",
        "formation_energy": "The formation energy per atom is {}. ",
        "band_gap": "The band gap is {}. ",
        "e_above_hull": "The energy above the convex hull is {}. ",
        "spacegroup": "The spacegroup number is {}. ",
    }


def format_number(value: float, decimals: int = 4) -> str:
    """A condition value as written in prompts: rounded, shortest form, no ``-0.0``."""
    value = round(float(value), decimals) + 0.0
    text = repr(value)
    if "e" in text or "E" in text:  # tiny or huge: keep fixed-point notation
        text = f"{value:.{decimals}f}".rstrip("0").rstrip(".")
    return text


def _is_missing(value):
    if value is None:
        return True
    if isinstance(value, str):
        return not value.strip()
    try:
        return not math.isfinite(float(value))
    except (TypeError, ValueError):
        return True


def conditions_from_info(info: Mapping[str, Any]) -> dict[str, Any]:
    """Condition dict (keys of :data:`CONDITION_KEYS`) from ``atoms.info``.

    Missing, ``None`` and NaN values are left out, never written as zero.
    """
    conditions = {}
    for name, key in INFO_TO_CONDITION.items():
        value = info.get(name)
        if not _is_missing(value):
            conditions[key] = value
    return conditions


# Training prompts held at most this many conditions before max_conditions existed.
_LEGACY_MAX_CONDITIONS = 4


@functools.cache
def spacegroup_names(number: int) -> dict[str, str]:
    """``{"symbol": "P6_3/mmc", "system": "hexagonal"}`` for space group 194, as pymatgen names them."""
    from pymatgen.symmetry.groups import SpaceGroup

    group = SpaceGroup.from_int_number(int(number))
    return {"symbol": group.symbol, "system": group.crystal_system}


def spacegroup_number(value: int | str) -> int:
    """A space group as its number: ``225``, ``"225"`` or a Hermann-Mauguin symbol (``"Fm-3m"``, ``"P6_3/mmc"``).

    Raises
    ------
    ValueError
        Saying what was given and what is accepted.
    """
    if isinstance(value, str) and not value.strip().lstrip("+-").isdigit():
        from pymatgen.symmetry.groups import SpaceGroup

        try:
            return SpaceGroup(value.strip()).int_number
        except ValueError:
            raise ValueError(
                f"unknown space group {value!r}: give a number from 1 to 230 or a Hermann-Mauguin "
                f"symbol as pymatgen writes it, e.g. 'Fm-3m', 'P6_3/mmc', 'P2_1/c'"
            ) from None
    try:
        number = int(value)
        integral = number == float(value)
    except (TypeError, ValueError):
        integral = False
    if not integral or not 1 <= number <= 230:
        raise ValueError(f"space group must be a number from 1 to 230 or a symbol such as 'Fm-3m', got {value!r}")
    return number


@dataclass
class PromptTemplate:
    """The prompt strings of the paper, stored with every trained model.

    Attributes
    ----------
    preamble, instruction : str
        Start and end of the generation prompt; condition sentences go between.
    sentences : dict
        One format string per condition key, with ``{}`` for the value.
    infill_preamble, infill_instruction : str
        Before and after the masked crystal text in the infill prompt.
    mask : str
        The string replacing the masked element's symbol lines.
    decimals : int
        Float conditions are rounded to this many decimals.
    max_conditions : int
        The most condition sentences a training prompt holds (formula
        included): their number is drawn uniformly from 0 to this.  4, the
        default, never writes all five; the paper's code writes the formula
        plus 0-4 others, so 5 comes closer to its mix (the space group in
        42% of generation prompts instead of 30%).

    The space-group sentence may name, besides ``{}`` (the number),
    ``{symbol}`` (Hermann-Mauguin, as pymatgen writes it) and ``{system}``
    (the crystal system): ``"The space group is {symbol} (number {},
    {system}). "``.
    """

    preamble: str = "Below is a description of a bulk material. "
    instruction: str = (
        "Generate a description of the lengths and angles of the lattice vectors "
        "and then the element type and coordinates for each atom within the lattice:\n"
    )
    sentences: dict = field(default_factory=_default_sentences)
    infill_preamble: str = (
        'Below is a partial description of a bulk material where one element has been '
        'replaced with the string "[MASK]":\n'
    )
    infill_instruction: str = "\nGenerate an element that could replace [MASK] in the bulk material:\n"
    mask: str = MASK
    decimals: int = 4
    max_conditions: int = _LEGACY_MAX_CONDITIONS

    def __post_init__(self):
        if not 1 <= self.max_conditions <= len(CONDITION_KEYS):
            raise ValueError(f"max_conditions must be from 1 to {len(CONDITION_KEYS)}, got {self.max_conditions!r}")
        unknown = set(self.sentences) - set(CONDITION_KEYS)
        if unknown:
            raise ValueError(f"sentences for unknown condition(s) {', '.join(sorted(unknown))}: "
                             f"use {', '.join(CONDITION_KEYS)}")
        self.sentences = {**_default_sentences(), **self.sentences}  # a file may reword only some
        for key, sentence in self.sentences.items():
            try:
                sentence.format("x", symbol="x", system="x")
            except (KeyError, IndexError, ValueError) as err:
                raise ValueError(f"{key} sentence {sentence!r} has a placeholder other than {{}}, {{symbol}} "
                                 f"or {{system}}: {err}") from None

    # -- serialisation (the model card stores the wording) ------------------
    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if data["max_conditions"] == _LEGACY_MAX_CONDITIONS:
            del data["max_conditions"]  # as cards (and resume fingerprints) written before the field had it
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PromptTemplate:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown prompt template fields: {', '.join(sorted(unknown))}")
        return cls(**data)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> PromptTemplate:
        """A template from a JSON object of its fields; fields left out keep the paper's values."""
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object of prompt template fields")
        return cls.from_dict(data)

    # -- prompts ------------------------------------------------------------
    def condition_text(self, conditions: Mapping[str, Any] | None) -> str:
        """The condition sentences, in the fixed order, for the given values."""
        conditions = dict(conditions or {})
        unknown = set(conditions) - set(CONDITION_KEYS)
        if unknown:
            raise ValueError(
                f"unknown condition(s) {', '.join(sorted(unknown))}: use {', '.join(CONDITION_KEYS)}"
            )
        parts = []
        for key in CONDITION_KEYS:
            value = conditions.get(key)
            if _is_missing(value):
                continue
            text = self._value(key, value)
            names = spacegroup_names(int(text)) if key == "spacegroup" else {}  # {symbol}, {system}
            parts.append(self.sentences[key].format(text, **names))
        return "".join(parts)

    def _value(self, key, value):
        if key == "formula":
            return str(value).strip()
        if key == "spacegroup":
            return str(spacegroup_number(value))
        return format_number(value, self.decimals)

    def generation_prompt(self, conditions: Mapping[str, Any] | None = None) -> str:
        """Prompt for generating a crystal; ends with the instruction line and ``\\n``."""
        return self.preamble + self.condition_text(conditions) + self.instruction

    def infill_prompt(self, masked_text: str) -> str:
        """Prompt asking for the element hidden behind ``[MASK]`` in ``masked_text``."""
        if self.mask not in masked_text:
            raise ValueError(f"infill text has no {self.mask} line")
        return self.infill_preamble + masked_text + self.infill_instruction

    def sample_conditions(self, info: Mapping[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        """Training-time choice of conditions for one crystal.

        ``k`` is drawn uniformly from 0..``max_conditions``; for ``k > 0`` the formula comes
        first, then ``k - 1`` others drawn without replacement from those
        present (fewer when fewer are present).  ``info`` may hold either
        ``atoms.info`` property names or condition keys.
        """
        present = {**conditions_from_info(info), **{k: v for k, v in info.items() if k in CONDITION_KEYS}}
        present = {k: v for k, v in present.items() if not _is_missing(v)}
        k = int(rng.integers(0, self.max_conditions + 1))
        if k == 0 or not present:
            return {}
        chosen = []
        if "formula" in present:
            chosen.append("formula")
            k -= 1
        others = [key for key in CONDITION_KEYS if key in present and key != "formula"]
        if k > 0 and others:
            picks = rng.choice(len(others), size=min(k, len(others)), replace=False)
            chosen += [others[i] for i in picks]
        return {key: present[key] for key in CONDITION_KEYS if key in chosen}


class Example(NamedTuple):
    """One training example: the loss sees only ``answer`` (plus end-of-sequence)."""

    task: str
    prompt: str
    answer: str


def example_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The random stream of one example: a pure function of (seed, epoch, index)."""
    return np.random.default_rng([int(seed), int(epoch), int(index)])


def make_example(atoms: Atoms, template: PromptTemplate | None = None, *, seed: int = 0, epoch: int = 0,
                 index: int = 0, infill_fraction: float = 1 / 3) -> Example:
    """Build the training example for structure ``index`` in ``epoch``.

    The task (infill with probability ``infill_fraction``, else generation),
    the random translation of the crystal, the conditions and the masked
    element all come from :func:`example_rng`, so an interrupted run that
    resumes rebuilds exactly the same examples.

    Returns
    -------
    Example
        ``answer`` is the crystal text (generation) or the element symbol
        (infill), without the end-of-sequence token.
    """
    template = template or PromptTemplate()
    rng = example_rng(seed, epoch, index)
    infill = rng.random() < infill_fraction
    text = atoms_to_text(atoms, translate=True, rng=rng)
    if infill:
        elements = sorted(set(atoms.get_chemical_symbols()))
        symbol = elements[int(rng.integers(len(elements)))]
        masked = mask_element(text, symbol, mask=template.mask)
        return Example(INFILL, template.infill_prompt(masked), symbol)
    conditions = template.sample_conditions(atoms.info, rng)
    return Example(GENERATION, template.generation_prompt(conditions), text)
