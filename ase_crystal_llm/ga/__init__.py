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

import importlib

_EXPORTS = {
    "LLMElementMutation": "operators", "TemplateElementMutation": "operators", "SearchOptions": "options",
    "GASearch": "search", "run_search": "search",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value  # resolve once
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
