"""Chemistry shared by decoding, the GA and the metrics.

* :mod:`.validity`: structural and compositional (SMACT) validity;
* :mod:`.substitution`: charge- and radius-aware element substitutes.
"""
