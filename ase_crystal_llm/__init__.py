"""ase-crystal-llm: language-model crystal generation for ASE.

The package follows the data: crystals are written as text (:mod:`.text`),
read from files (:mod:`.data`), a causal language model is trained on the text
(:mod:`.model`), samples are decoded back into :class:`ase.Atoms`
(:mod:`.generation`), relaxed, placed on a convex hull and scored
(:mod:`.evaluation`), and the model's infill answers drive ASE's genetic
algorithm and the searches built on it (:mod:`.ga`).  Files are written by :mod:`.io`, chemistry shared by
decoding and metrics lives in :mod:`.chemistry`, every default in
:mod:`.settings`.

The names below are the entry points; heavy libraries (torch, transformers,
matgl) load only when one of them is first used.
"""

from __future__ import annotations

from . import _moved
from ._lazy import lazy_exports

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "CrystalGenerator": "generation.generator",
    "LLMElementMutation": "ga.operators",
    "TemplateElementMutation": "ga.operators",
    "GASearch": "ga.search",
    "run_search": "ga.search",
    "propose_elements": "generation.infill",
    "get_calculator": "evaluation.potentials",
    "relax": "evaluation.relaxation",
    "relax_many": "evaluation.relaxation",
    "ReferenceHull": "evaluation.hull",
    "evaluate": "evaluation.pipeline",
    "train": "model.training",
    "CrystalTextError": "text.format",
    "atoms_to_text": "text.format",
    "text_to_atoms": "text.format",
    "mask_element": "text.format",
}

__all__ = ["__version__", *_EXPORTS]

_moved.install()


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
