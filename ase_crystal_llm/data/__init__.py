"""Crystal data: reading structure files and getting the reference data.

* :mod:`.datasets`: :func:`~.datasets.read_structures` reads MP-20 CSV files,
  CIF folders and anything :mod:`ase.io` reads, as :class:`ase.Atoms` with
  their properties in ``info``;
* :mod:`.download`: ``crystal-llm data fetch/check/link``: MP-20, the
  elemental references and the M3GNet weights, checked by sha256.
"""


def __getattr__(name: str):
    # ase_crystal_llm.data was the download module in 0.1
    from ase_crystal_llm._moved import moved_attribute

    return moved_attribute("data", name)
