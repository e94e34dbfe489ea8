"""The options of a genetic-algorithm search: :class:`SearchOptions` and the operator mix.

Each option of :class:`~.search.GASearch` and ``crystal-llm search`` is a
field here with its help; the CLI options and the parameter docs are built
from them (:mod:`ase_crystal_llm.options`).  No numpy on import:
``crystal-llm --help`` reads it.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from ase_crystal_llm.options import non_negative_float, positive_float, positive_int

__all__ = [
    "OPERATORS", "SearchOptions", "operator_weights", "parse_elements",
]


# The operators a search can mix, by the name used in --operators.
OPERATORS = {
    "llm": "the language model's element infill (LLMElementMutation)",
    "template": "the paper's template element swap between ionic look-alikes (TemplateElementMutation)",
    "random": "ase_ga's RandomElementMutation: one atom becomes another element of the search's elements",
    "strain": "ase_ga's StrainMutation: a random strain of the cell",
    "permutation": "ase_ga's PermutationMutation: atoms of different elements swap places",
}


def operator_weights(text: str) -> dict[str, float]:
    """``"llm:3,strain:1"`` (or ``"llm,template"``: weight 1 each) as ``{name: weight}``.

    Raises ``ValueError`` (an ``argparse`` error on the command line) for an
    unknown name, a repeated one or a weight that is not a positive number.
    """
    weights: dict[str, float] = {}
    for part in (p.strip() for p in str(text).split(",")):
        if not part:
            continue
        name, _, weight = part.partition(":")
        name = name.strip().lower()
        if name not in OPERATORS:
            raise argparse.ArgumentTypeError(f"unknown operator {name!r}: use {', '.join(OPERATORS)}")
        if name in weights:
            raise argparse.ArgumentTypeError(f"operator {name!r} is given twice")
        try:
            value = float(weight) if weight.strip() else 1.0
        except ValueError:
            value = float("nan")
        if not value > 0 or value == float("inf"):
            raise argparse.ArgumentTypeError(f"operator {name!r}: the weight must be a positive number, got {weight!r}")
        weights[name] = value
    if not weights:
        raise argparse.ArgumentTypeError("no operator given: use e.g. llm or llm:3,strain:1")
    return weights


def parse_elements(text: str) -> list[str]:
    """``"Ca,Sr,Ti,O"`` (or ``"Ca-Sr-Ti-O"``) as a list of element symbols, each checked."""
    from ase.data import atomic_numbers

    symbols = [s.strip() for s in str(text).replace("-", ",").split(",") if s.strip()]
    bad = [s for s in symbols if s not in atomic_numbers or s == "X"]
    if bad or not symbols:
        raise argparse.ArgumentTypeError(f"not element symbols: {', '.join(bad) or repr(text)}")
    return list(dict.fromkeys(symbols))


@dataclass
class SearchOptions:
    """How a search proposes, relaxes and scores candidates."""

    operators: str = field(default="llm", metadata={
        "help": "operators and their weights, e.g. llm:3,strain:1 (" + ", ".join(OPERATORS) + "; "
                "default %(default)s)",
        "doc": "Comma-separated ``name[:weight]`` (:data:`OPERATORS`); a child comes from one operator, drawn "
               "by weight."})
    elements: str | None = field(default=None, metadata={
        "help": "keep the search in this chemical space, e.g. Ca,Sr,Ti,O (default: element swaps may bring "
                "in any chemically alike element)",
        "doc": "Comma- or dash-separated symbols; every starting structure must lie inside it.  The element "
               "operators only swap within it; ``random`` draws from it (default there: the starting "
               "structures' elements).", "doc_type": "str, optional"})
    population: int = field(default=20, metadata={
        "help": "population size: the best distinct candidates that parents are drawn from (default %(default)s)",
        "type": positive_int})
    batch_size: int = field(default=8, metadata={
        "help": "children proposed and relaxed together (default %(default)s)", "type": positive_int})
    potential: str = field(default="m3gnet", metadata={
        "help": "m3gnet, chgnet, sevennet, sevennet-l3i5 or a matgl model directory (default %(default)s)",
        "doc": "Or an ASE calculator (Python only).", "doc_type": "str, path or Calculator"})
    fmax: float = field(default=0.1, metadata={
        "help": "relaxation force criterion, eV/A (default %(default)s)", "type": positive_float})
    steps: int = field(default=300, metadata={
        "help": "most FIRE steps per relaxation (default %(default)s)", "type": positive_int})
    model: str | None = field(default=None, metadata={
        "help": "model for the llm operator: a directory or a shipped model, default or smollm2 (default: default)",
        "doc": "Or a loaded :class:`~ase_crystal_llm.generation.generator.CrystalGenerator` (Python only).",
        "doc_type": "str, path or CrystalGenerator, optional"})
    temperature: float = field(default=1.0, metadata={
        "help": "softmax temperature of the llm operator's proposal; 0 is greedy (default %(default)s)",
        "type": non_negative_float})
    tolerance: float = field(default=0.1, metadata={
        "help": "ionic radius tolerance of the alike substitutes that llm and template choose from, A "
                "(default %(default)s)", "type": non_negative_float})
    seed: int = field(default=0, metadata={
        "help": "random seed of parent choice and operators (default %(default)s)", "type": int})
    data_dir: str | None = field(default=None, metadata={
        "help": "folder holding mp_20/ and hull/ for the hull and novelty (default: $CRYSTAL_LLM_DATA)",
        "doc": "See :func:`settings.data_dir`.", "doc_type": "path, optional"})
    lease: float = field(default=3600.0, metadata={
        "help": "seconds after which another machine's unfinished claim is taken over (default %(default)s)",
        "type": positive_float,
        "doc": "A claim by a process of this machine that no longer runs is taken over at once."})
    progress: bool = field(default=True, metadata={
        "help": "show a progress bar", "flag": "--no-progress", "cli_help": "no progress bar"})
