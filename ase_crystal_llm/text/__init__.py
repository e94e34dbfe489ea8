"""The text side: crystals as text, the prompts around them, and a tokenizer for them.

* :mod:`.format`: :func:`atoms_to_text` / :func:`text_to_atoms`, the paper's
  format (lengths, angles, then one element and its fractional coordinates
  per atom) and the ``[MASK]`` of infilling;
* :mod:`.prompts`: generation and infill prompts with their conditions;
* :mod:`.tokenizer`: the character-level tokenizer of from-scratch models.
"""

from ase_crystal_llm.text.format import (
    ELEMENTS,
    LINE_SEPARATOR,
    MASK,
    MAX_ATOMS,
    MAX_LENGTH,
    MIN_VOLUME,
    CrystalTextError,
    atoms_to_text,
    cell_volume,
    is_element,
    is_periodic,
    mask_element,
    one_line,
    split_crystals,
    text_to_atoms,
    wrap_fractional,
)

__all__ = [
    "ELEMENTS", "LINE_SEPARATOR", "MASK", "MAX_ATOMS", "MAX_LENGTH", "MIN_VOLUME", "CrystalTextError",
    "atoms_to_text", "cell_volume", "is_element", "is_periodic", "mask_element", "one_line", "split_crystals",
    "text_to_atoms", "wrap_fractional",
]


def __getattr__(name: str):
    from ase_crystal_llm._moved import moved_attribute

    return moved_attribute("text", name)
