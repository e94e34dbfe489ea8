"""Genetic-algorithm searches with ASE's :mod:`ase_ga`.

* :mod:`.operators`: :class:`~.operators.LLMElementMutation` (the model's
  infill answer) and :class:`~.operators.TemplateElementMutation` (the
  paper's baseline), ``OffspringCreator`` subclasses.
* :mod:`.options`: :class:`~.options.SearchOptions`, the settings of a search.
* :mod:`.database`: the search's ``ase_ga`` database, shareable by workers.
* :mod:`.search`: :class:`~.search.GASearch` and :func:`~.search.run_search`.

Names resolve on first use, so ``crystal-llm --help`` reads the options
without importing numpy or ase_ga.
"""

from ase_crystal_llm._lazy import lazy_exports

_EXPORTS = {
    "LLMElementMutation": "operators", "TemplateElementMutation": "operators", "SearchOptions": "options",
    "GASearch": "search", "run_search": "search",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
