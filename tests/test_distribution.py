"""Distribution distances of samples to a reference, beside those of real crystals."""

import math

import numpy as np
import pytest
from ase.build import bulk

from ase_crystal_llm.evaluation.distribution import CrystalStatistics, distances, distribution_summary


def _set():
    return [bulk("NaCl", "rocksalt", a=5.64), bulk("Si", "diamond", a=5.43),
            bulk("MgO", "rocksalt", a=4.21) * (2, 1, 1), bulk("Cu", "fcc", a=3.6)]


def test_statistics_of_hand_made_crystals():
    stats = CrystalStatistics.from_structures(_set())
    assert stats.n_elements.tolist() == [2, 1, 2, 1]
    assert stats.n_atoms.tolist() == [2, 2, 4, 1]
    assert stats.spacegroups.tolist()[:2] == [225, 227] and stats.spacegroups[3] == 225
    assert stats.element_count_mix().tolist() == [0.5, 0.5, 0, 0, 0, 0]
    assert stats.density[3] == pytest.approx(4 * 63.546 / (0.60221 * 3.6**3), rel=1e-3)  # fcc Cu, g/cm^3
    freq = dict(zip(("Na", "Cu", "O"), (stats.element_frequencies()[i] for i in (10, 28, 7))))
    assert freq == {"Na": 0.25, "Cu": 0.25, "O": 0.25}


def test_a_set_is_at_distance_zero_from_itself_and_far_from_another():
    reference = CrystalStatistics.from_structures(_set())
    same = distances(CrystalStatistics.from_structures(_set()), reference)
    assert all(value == pytest.approx(0.0, abs=1e-12) for value in same.values())
    other = CrystalStatistics.from_structures([bulk("Fe", "bcc", a=2.87), bulk("W", "bcc", a=3.16)])
    far = distances(other, reference)
    assert far["element_jsd"] == pytest.approx(1.0)  # no element in common
    assert far["spacegroup_jsd"] == pytest.approx(1.0)  # Im-3m against Fm-3m / Fd-3m
    # element counts: all unary against half unary -> JSD of (1, 0) and (1/2, 1/2), base 2 (mixture 3/4, 1/4)
    expected = math.sqrt(0.5 * math.log2(1 / 0.75) + 0.5 * (0.5 * math.log2(0.5 / 0.75) + 0.5 * math.log2(0.5 / 0.25)))
    assert far["element_count_jsd"] == pytest.approx(expected)
    assert far["atoms_per_cell_wasserstein"] == pytest.approx(abs(1 - np.mean([2, 2, 4, 1])), abs=0.3)


def test_summary_reports_the_real_data_row_beside_the_samples():
    reference = CrystalStatistics.from_structures(_set())
    samples = CrystalStatistics.from_structures([bulk("NaCl", "rocksalt", a=5.64)] * 2)
    real = CrystalStatistics.from_structures(_set()[:3])
    out = distribution_summary(samples, reference, real)
    assert set(out) == {"samples", "reference", "real"}
    assert out["samples"]["n"] == 2 and out["reference"]["n"] == 4 and out["real"]["n"] == 3
    assert out["samples"]["element_count_mix"]["2"] == 1.0 and out["reference"]["oxygen_fraction"] == 0.25
    assert out["real"]["element_jsd"] < out["samples"]["element_jsd"]
    assert distribution_summary(CrystalStatistics.from_structures([]), reference)["samples"] == {"n": 0}
