"""Generation: decode crystals from a trained model as :class:`ase.Atoms`.

* :mod:`.generator`: :class:`~.generator.CrystalGenerator`;
* :mod:`.constraints`: the crystal grammar as a logits processor;
* :mod:`.spacing`: the minimum-distance guard used while decoding;
* :mod:`.decoding`: the sampling loops (a KV-buffered fast path and ``model.generate``);
* :mod:`.infill`: the model's distribution over the element behind ``[MASK]``;
* :mod:`.workflow`: ``crystal-llm generate``: files, resume, several processes.
"""


def __getattr__(name: str):
    # ase_crystal_llm.generation was one module in 0.1: its names still resolve
    from ase_crystal_llm._moved import moved_attribute

    return moved_attribute("generation", name)
