"""Operators for ASE's genetic algorithm (:mod:`ase_ga`).

* :mod:`.operators`: :class:`~.operators.LLMElementMutation` (the model's
  infill answer) and :class:`~.operators.TemplateElementMutation` (the
  paper's baseline), ``OffspringCreator`` subclasses.
"""

from ase_crystal_llm.ga.operators import LLMElementMutation, TemplateElementMutation

__all__ = ["LLMElementMutation", "TemplateElementMutation"]
