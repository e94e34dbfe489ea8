"""Files: structure writers, run records, CIF archives, and the ASE I/O plugin.

* :mod:`.files`: :func:`~.files.atomic_write` (every whole-file write of the
  package), :func:`~.files.fsync`, numpy scalars to JSON (:func:`~.files.plain`);
* :mod:`.outputs`: :class:`~.outputs.StructureWriter` (extxyz, traj, db, CIF,
  crystal text; PostgreSQL), run records;
* :mod:`.ase_plugin`: ``ase.io`` format ``crystal-text`` (``*.crystxt``).
"""
