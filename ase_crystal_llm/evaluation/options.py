"""The options of evaluation: :class:`EvaluationOptions` and its defaults.

Each option of :func:`~.pipeline.evaluate` and ``crystal-llm evaluate`` is a
field here with its help; the CLI options and the parameter docs are built
from them (:mod:`ase_crystal_llm.options`).  The samples, the report folder
and ``--threads`` (shared by every command) stay hand-written in the CLI.  No
numpy on import: ``crystal-llm --help`` reads it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ase_crystal_llm.options import non_negative_int, positive_float, positive_int

__all__ = [
    "COVERAGE_SIZE", "IPT_SIZE", "EvaluationOptions", "coverage_size",
]


COVERAGE_SIZE = 1000  # evaluate's default reference subsample; the paper's protocol is the full split ("all")


IPT_SIZE = 100


def coverage_size(text: str) -> int | str:
    """argparse type: ``all`` or a whole number >= 0 (0 also means all)."""
    return "all" if text.strip().lower() == "all" else non_negative_int(text)


@dataclass
class EvaluationOptions:
    """How to evaluate samples: references, relaxation, metrics and outputs."""

    reference: str = field(default="mp20", metadata={
        "help": "reference data for hull, coverage and novelty (default: %(default)s)",
        "doc": "``\"mp20\"``: coverage and distributions against the test split, novelty against the training "
               "and validation splits, hull from all of MP-20."})
    data_dir: str | None = field(default=None, metadata={
        "help": "folder holding mp_20/ and hull/ (default: $CRYSTAL_LLM_DATA)",
        "doc": "See :func:`settings.data_dir`.", "doc_type": "path, optional"})
    potential: str = field(default="m3gnet", metadata={
        "help": "m3gnet, chgnet, sevennet, sevennet-l3i5 or a matgl model directory (default %(default)s)",
        "doc": "Or an ASE calculator.  The relaxation settings (``potential``, ``fmax``, ``steps``, ``workers``, "
               "``threads``) are passed to :func:`~.relaxation.relax_many`.",
        "doc_type": "str, path or Calculator"})
    fmax: float = field(default=0.1, metadata={
        "help": "relaxation force criterion, eV/A (default %(default)s)", "type": positive_float})
    steps: int = field(default=500, metadata={
        "help": "most FIRE steps per relaxation (default %(default)s)", "type": positive_int})
    rattle: float | None = field(default=None, metadata={
        "help": "relax each valid sample from a copy whose atoms are moved by a Gaussian of this standard "
                "deviation, angstrom (seeded per sample): a relaxation keeps a structure's symmetry, so without "
                "it a symmetric sample cannot leave high-symmetry sites for a lower energy nearby (default: "
                "relax as written, as every recorded evaluation does)",
        "type": positive_float, "metavar": "ANGSTROM",
        "doc": "Recorded as ``settings[\"rattle\"]`` in ``metrics.json`` and named in the report.  Real MP-20 "
               "crystals stay as metastable from perturbed starts (``docs/stability.md``)."})
    workers: int | None = field(default=None, metadata={
        "help": "parallel processes for relaxations and reference fingerprints", "type": positive_int})
    model: str | None = field(default=None, metadata={
        "help": "model directory or shipped model name (default, smollm2), for IPT (symmetry) evaluation",
        "doc": "IPT is then computed on ``ipt_size`` test crystals.", "doc_type": "path, optional"})
    limit: int | None = field(default=None, metadata={
        "help": "evaluate only the first N samples", "type": positive_int})
    coverage_size: int | str | None = field(default=None, metadata={
        "help": f"test crystals for coverage: a seeded subsample of N (default {COVERAGE_SIZE}), or all (or 0) for "
                "the whole split, the paper's protocol; fingerprints are cached as they are computed",
        "type": coverage_size, "metavar": "N", "doc_type": "int or \"all\", optional",
        "doc": "The subsample also sets the Wasserstein distances; the full MP-20 test split is 9,046 crystals.  "
               "``metrics.json`` and the report say which was used."})
    coverage_relaxed: bool = field(default=False, metadata={
        "help": "also score coverage on the relaxed samples (one more fingerprint per valid sample): how much of "
                "the gap to real crystals is geometry that a relaxation repairs (default: as written only, the "
                "paper's protocol)",
        "doc": "Written as ``coverage_relaxed`` in ``metrics.json`` (precision over all samples; failed "
               "relaxations count as not covered) and a report row.  ``docs/distribution.md``, cause 8."})
    ipt_size: int = field(default=IPT_SIZE, metadata={
        "help": "test crystals for IPT (with --model)", "type": positive_int, "metavar": "N"})
    seed: int = field(default=0, metadata={
        "help": "seed of the reference subsample and IPT translations", "type": int})
    cache: str | None = field(default=None, metadata={
        "help": "folder for cached reference fingerprints (default: $CRYSTAL_LLM_CACHE or ~/.cache/ase-crystal-llm)",
        "flag": "--cache-dir", "metavar": "CACHE_DIR", "doc_type": "path, optional",
        "doc": "See :func:`settings.cache_dir`."})
    progress: bool = field(default=True, metadata={
        "help": "show progress bars", "flag": "--no-progress", "cli_help": "no progress bars"})
    plots: bool = field(default=True, metadata={
        "help": "draw the report's plots (``*.png``)", "cli": False})
    threads: int | None = field(default=None, metadata={
        "help": "torch CPU threads while relaxing (default: one per idle core, :func:`settings.default_threads`)",
        "cli": False})
    table_db: bool = field(default=False, metadata={
        "help": "also write ``samples.db``: the per-structure table as an ase.db, one row per sample (the relaxed "
                "structure with its energy where there is one, else the sample), the columns of ``samples.csv`` "
                "as key-value pairs",
        "flag": "--db",
        "cli_help": "also write OUTPUT/samples.db: the per-structure table as an ase.db (relaxed structures, "
                    "energies)"})
