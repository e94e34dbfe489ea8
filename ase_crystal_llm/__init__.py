"""ase-crystal-llm: language-model crystal generation for ASE.

Crystals are written as short text (:mod:`ase_crystal_llm.text`), a causal
language model is fine-tuned on that text (:mod:`ase_crystal_llm.training`),
and samples come back as :class:`ase.Atoms` (:mod:`ase_crystal_llm.generation`).
Heavy modules (torch, transformers, matgl) load only when used.
"""

from .text import CrystalTextError, atoms_to_text, mask_element, text_to_atoms

__version__ = "0.1.0"

__all__ = [
    "CrystalGenerator",
    "CrystalTextError",
    "__version__",
    "atoms_to_text",
    "mask_element",
    "text_to_atoms",
]


def __getattr__(name):
    # Keep `import ase_crystal_llm` light: torch and transformers load on first use.
    if name == "CrystalGenerator":
        from .generation import CrystalGenerator

        return CrystalGenerator
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
