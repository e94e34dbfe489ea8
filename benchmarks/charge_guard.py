"""What the charge guard (``generate(charge_guard=...)``) costs and saves, guard on against off.

    nice python benchmarks/charge_guard.py                 # the shipped model
    nice python benchmarks/charge_guard.py --model DIR --relax 0

For each setting of the guard (the spacing guard on in both) the script

* samples ``-n`` unconditional crystals with one draw each (``max_attempts=1``,
  seed 11) and counts those returned (structurally valid), the compositionally
  valid (SMACT) ones and both, and times the sampling;
* with ``--relax K`` (default 150): relaxes the first ``K`` valid crystals with
  M3GNet and gives their metastable rate against the MP-20 hull, as
  ``tune_sampling.py --relax``, and that rate per draw.

Results: ``benchmarks/results/charge_guard.json`` (or ``--output``).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from spacing_guard import compare  # noqa: E402


def main(argv=None):
    compare("charge_guard", {"on": {}, "off": {"charge_guard": False}}, argv, __doc__.splitlines()[0])


if __name__ == "__main__":
    main()
