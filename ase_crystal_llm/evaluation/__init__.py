"""Evaluation: potentials, relaxation, the convex hull, sample metrics and the report.

* :mod:`.potentials`: M3GNet (matgl), CHGNet and SevenNet as ASE calculators;
* :mod:`.relaxation`: :func:`~.relaxation.relax` / :func:`~.relaxation.relax_many`
  (``FrechetCellFilter`` + FIRE; cached, in worker processes);
* :mod:`.batched`: the lockstep batched FIRE engine ``relax_many`` uses;
* :mod:`.hull`: :class:`~.hull.ReferenceHull`, energy above the MP-20 hull;
* :mod:`.metrics`: coverage, novelty, uniqueness, stability, conditions;
* :mod:`.references`: cached reference fingerprints for coverage;
* :mod:`.pipeline`: :func:`~.pipeline.evaluate`, ``crystal-llm evaluate``;
* :mod:`.report`: ``report.md`` and its plots.
"""


def __getattr__(name: str):
    # ase_crystal_llm.evaluation was one module in 0.1: its names still resolve
    from ase_crystal_llm._moved import moved_attribute

    return moved_attribute("evaluation", name)
