"""ASE I/O plugin for the crystal text format (``format="crystal-text"``, ``*.crystxt``).

Registered through the ``ase.ioformats`` entry point, so after installing the
package ``ase.io.read("x.crystxt", index=":")`` works without importing
ase_crystal_llm.  Several crystals per file are separated by one blank line.
"""

from __future__ import annotations

from typing import IO, TYPE_CHECKING

from ase.utils.plugins import ExternalIOFormat

from ase_crystal_llm.text.format import atoms_to_text, split_crystals, text_to_atoms

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

    from ase import Atoms

__all__ = [
    "EXTENSION", "crystal_text_format", "read_crystal_text", "write_crystal_text",
]


EXTENSION = "crystxt"


crystal_text_format = ExternalIOFormat(
    desc="Crystal text (Gruver et al. 2024 LLM format)",
    code="+F",
    module="ase_crystal_llm.io.ase_plugin",
    ext=EXTENSION,
)


def read_crystal_text(fd: IO[str], index: int | slice = -1) -> Iterator[Atoms]:
    """Read crystals from a blank-line separated crystal-text file."""
    blocks = split_crystals(fd.read())
    if isinstance(index, int):
        blocks = [blocks[index]]
    else:
        blocks = blocks[index]
    for block in blocks:
        yield text_to_atoms(block)


def write_crystal_text(fd: IO[str], images: Atoms | Iterable[Atoms]) -> None:
    """Write one or several crystals, separated by one blank line."""
    if hasattr(images, "get_positions"):
        images = [images]
    fd.write("\n\n".join(atoms_to_text(atoms) for atoms in images) + "\n")
