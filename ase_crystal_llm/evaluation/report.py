"""``report.md`` and its plots, from the result :func:`~.pipeline.evaluate` returns.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any

import numpy as np

from ase_crystal_llm import settings
from ase_crystal_llm.evaluation.metrics import METASTABLE
from ase_crystal_llm.io.files import atomic_write

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

__all__ = [
    "report_markdown",
]


# -- plots and report -------------------------------------------------------------
def _plots(out_dir, result, e_hull, fps, ref):
    settings.require("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = []

    def save(fig, name):
        fig.tight_layout()
        png = io.BytesIO()
        fig.savefig(png, dpi=120, format="png")
        atomic_write(out_dir / name, png.getvalue())
        plt.close(fig)
        figures.append(name)

    finite = np.array([e for e in e_hull if e is not None])
    fig, ax = plt.subplots(figsize=(5, 3.5))
    if finite.size:
        ax.hist(np.clip(finite, -0.5, 2.0), bins=50, color="tab:blue")
    ax.axvline(0.0, color="k", lw=1)
    ax.axvline(METASTABLE, color="tab:red", lw=1, ls="--", label=f"{METASTABLE} eV/atom")
    ax.set_xlabel("energy above MP-20 hull (eV/atom, clipped to [-0.5, 2])")
    ax.set_ylabel("samples")
    ax.legend()
    save(fig, "e_above_hull.png")

    rates = {
        "structural\nvalidity": result["validity"]["returned"]["structure"],
        "compositional\nvalidity": result["validity"]["returned"]["composition"],
        "valid": result["validity"]["returned"]["valid"],
        "metastable": result["stability"]["metastable"],
        "stable": result["stability"]["stable"],
        "S.U.N.": result["stability"].get("sun"),
    }
    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = list(rates)
    ax.bar(names, [rates[k] or 0.0 for k in names], color="tab:green")
    ax.set_ylim(0, 1)
    ax.set_ylabel("fraction of all samples")
    ax.tick_params(axis="x", labelsize=8)
    save(fig, "rates.png")

    fig, ax = plt.subplots(figsize=(5, 3.5))
    bins = np.linspace(0, max(15.0, float(np.max(ref.density, initial=0))), 60)
    ax.hist(ref.density, bins=bins, density=True, alpha=0.5, label=f"MP-20 test ({len(ref)})")
    if len(fps):
        ax.hist(fps.density, bins=bins, density=True, alpha=0.5, label=f"valid samples ({len(fps)})")
    ax.set_xlabel("density (g/cm$^3$)")
    ax.legend()
    save(fig, "density.png")

    fig, ax = plt.subplots(figsize=(5, 3.5))
    top = int(max(np.max(ref.n_elements, initial=1), np.max(fps.n_elements, initial=1)))
    counts = np.arange(1, top + 1)
    width = 0.4
    ax.bar(counts - width / 2, [np.mean(ref.n_elements == c) for c in counts], width, label="MP-20 test")
    if len(fps):
        ax.bar(counts + width / 2, [np.mean(fps.n_elements == c) for c in counts], width, label="valid samples")
    ax.set_xlabel("number of elements")
    ax.set_ylabel("fraction")
    ax.legend()
    save(fig, "n_elements.png")
    return figures


def _rattle_note(run_settings):
    """How the relaxations started, when not from the samples as written."""
    rattle = run_settings.get("rattle")
    return f", from copies rattled by {rattle} A" if rattle else ""


def _fmt(value, percent=False):
    if value is None:
        return "n/a"
    if percent:
        return f"{100 * value:.1f}%"
    return f"{value:.4g}"


def _subsampled(result):
    return bool(((result.get("coverage") or {}).get("reference") or {}).get("subsample"))


def _reference_note(result):
    ref = (result.get("coverage") or {}).get("reference")
    if not ref:  # a result written before the reference was recorded
        return f"vs {result['coverage']['reference_size']} test crystals"
    return f"{ref['size']:,}-crystal subsample" if ref["subsample"] else "full test split"


def _reference_sentence(result):
    """What coverage was measured against, plainly: the paper's protocol is the full test split."""
    ref = (result.get("coverage") or {}).get("reference")
    if not ref:
        return f"Coverage reference: {result['coverage']['reference_size']} MP-20 test crystals."
    if not ref["subsample"]:
        return f"Coverage reference: the full MP-20 test split ({ref['size']:,} crystals), as in the paper's protocol."
    return (f"Coverage reference: **a random subsample of {ref['size']:,} of the {ref['split_size']:,} MP-20 test "
            f"crystals** (seed {ref['seed']}), not the full test split of the paper's protocol; "
            f"`--coverage-size {ref['split_size']}` uses the full split.")


_DISTANCES = (("element_count_jsd", "element-count mix, Jensen-Shannon distance"),
              ("atoms_per_cell_jsd", "atoms per cell, Jensen-Shannon distance"),
              ("spacegroup_jsd", "space groups (symprec 0.1), Jensen-Shannon distance"),
              ("element_jsd", "element frequencies, Jensen-Shannon distance"),
              ("density_wasserstein", "density, Wasserstein distance (g/cm^3)"),
              ("atoms_per_cell_wasserstein", "atoms per cell, Wasserstein distance"))


def _by_symprec(rates, name):
    """``"50.0% at symprec 0.1, 60.0% at symprec 0.2"`` from keys ``{name}_symprec_{value}``."""
    prefix = f"{name}_symprec_"
    return ", ".join(f"{_fmt(v, True)} at symprec {k[len(prefix):]}" for k, v in rates.items() if k.startswith(prefix))


def _distribution_lines(dist: Mapping[str, Any] | None) -> list[str]:
    """The distances of the samples beside those of real val crystals, and the mixes of all three sets."""
    if not dist or not dist["samples"].get("n"):
        return []
    sets = [dist["samples"], dist.get("real") or {}, dist["reference"]]
    lines = ["", "## Distribution: samples beside real crystals", "",
             f"Valid samples ({sets[0]['n']}) and as many real MP-20 val crystals ({sets[1].get('n', 0)}), each "
             f"against the same {sets[2]['n']} MP-20 test crystals: the real column is the distance real data "
             "itself has at this sample size.", "",
             "| distance to the test crystals | samples | real val crystals |", "|---|---|---|"]
    lines += [f"| {label} | {_fmt(sets[0].get(key))} | {_fmt(sets[1].get(key))} |" for key, label in _DISTANCES]
    lines += ["", "| mix | samples | real val crystals | test crystals |", "|---|---|---|---|"]
    for k, name in (("1", "unary"), ("2", "binary"), ("3", "ternary"), ("4", "quaternary"), ("5", "5 elements")):
        shares = (_fmt(x.get("element_count_mix", {}).get(k), True) for x in sets)
        lines.append(f"| {name} | " + " | ".join(shares) + " |")
    lines.append("| mean atoms per cell | " + " | ".join(_fmt(x.get("mean_atoms_per_cell")) for x in sets) + " |")
    lines.append("| mean density (g/cm^3) | " + " | ".join(_fmt(x.get("mean_density")) for x in sets) + " |")
    lines.append("| containing oxygen | " + " | ".join(_fmt(x.get("oxygen_fraction"), True) for x in sets) + " |")
    lines.append("| distinct space groups | " + " | ".join(str(x.get("distinct_spacegroups", "")) for x in sets) + " |")
    return lines


def _relaxed_coverage_row(result):
    cov = result.get("coverage_relaxed")
    if not cov:
        return []
    return [f"| coverage recall / precision of the relaxed samples ({cov['relaxed']} relaxed) | "
            f"{_fmt(cov['recall'], True)} / {_fmt(cov['precision'], True)} |"]


def report_markdown(result: Mapping[str, Any], figures: Sequence[str] = ()) -> str:
    """A readable summary of :func:`evaluate`'s result."""
    v = result["validity"]["returned"]
    s = result["stability"]
    r = result["relaxation"]
    lines = [
        "# Evaluation report",
        "",
        f"Samples: `{result['samples']['source']}`, {result['samples']['n']} structures, "
        f"{result['samples']['n_valid']} valid.  Potential: {result['settings']['potential']} "
        f"(fmax {result['settings']['fmax']} eV/A, at most {result['settings']['steps']} steps"
        f"{_rattle_note(result['settings'])}).  "
        f"Hull: {result['settings'].get('hull') or 'none (nothing relaxed)'}; stable means E_hull <= 0, "
        f"metastable E_hull < {METASTABLE} eV/atom.",
        "",
        "| metric | value |",
        "|---|---|",
        f"| structural validity | {_fmt(v['structure'], True)} |",
        f"| compositional validity | {_fmt(v['composition'], True)} |",
        f"| validity (both) | {_fmt(v['valid'], True)} |",
        f"| coverage recall / precision ({_reference_note(result)}) | {_fmt(result['coverage']['recall'], True)} / "
        f"{_fmt(result['coverage']['precision'], True)} |",
        f"| precision by one cutoff alone: structure / composition | "
        f"{_fmt(result['coverage'].get('structure_precision'), True)} / "
        f"{_fmt(result['coverage'].get('composition_precision'), True)} |",
        *_relaxed_coverage_row(result),
        f"| Wasserstein density (g/cm^3) / #elements | {_fmt(result['wasserstein']['density'])} / "
        f"{_fmt(result['wasserstein']['n_elements'])} |",
        f"| diversity structure / composition | {_fmt(result['diversity']['structure'])} / "
        f"{_fmt(result['diversity']['composition'])} |",
        f"| uniqueness (of valid) | {_fmt(result['uniqueness'], True)} |",
        f"| novelty (of valid, vs MP-20 train) | {_fmt(result['novelty'], True)} |",
        f"| metastable (E_hull < {METASTABLE} eV/atom, of all) | {_fmt(s['metastable'], True)} |",
        f"| stable (E_hull <= 0, of all) | {_fmt(s['stable'], True)} |",
        f"| S.U.N.: stable, unique, novel (E_hull <= 0, of all) | {_fmt(s.get('sun'), True)} |",
        f"| metastable S.U.N. (E_hull < {METASTABLE} eV/atom, unique, novel, of all) | {_fmt(s.get('msun'), True)} |",
        f"| median E_hull (eV/atom) | {_fmt(s.get('e_hull_median'))} |",
        "",
        _reference_sentence(result),
        "",
        f"Relaxations: {r['attempted']} attempted, {r['failed']} failed, {r['not_converged']} not converged, "
        f"{r['from_cache']} from the cache.",
    ]
    if s.get("failures"):
        lines += ["", "Counted as failures in the stability rates: "
                  + ", ".join(f"{k} ({c})" for k, c in sorted(s["failures"].items())) + "."]
    emitted = result["validity"].get("emitted")
    if emitted:
        lines += ["", "## Validity over everything the model emitted", "",
                  "| decoding | emitted | returned | valid / emitted | valid / returned |", "|---|---|---|---|---|"]
        for name, e in emitted.items():
            lines.append(f"| {name} | {e['emitted']} | {e['returned']} | {_fmt(e['valid_over_emitted'], True)} | "
                         f"{_fmt(e['valid_over_returned'], True)} |")
        over = s.get("over_emitted")
        if over:
            lines += ["", f"Per model output ({over['emitted']} emitted): metastable {_fmt(over['metastable'], True)}, "
                      f"stable {_fmt(over['stable'], True)}, S.U.N. {_fmt(over['sun'], True)}, "
                      f"metastable S.U.N. {_fmt(over.get('msun'), True)}."]
    lines += _distribution_lines(result.get("distribution"))
    cond = result.get("conditional") or {}
    if cond:
        lines += ["", "## Conditional accuracy", ""]
        if "formula" in cond:
            lines.append(f"- formula match: {_fmt(cond['formula']['match'], True)} of {cond['formula']['n']}")
        if "spacegroup" in cond:
            sg = cond["spacegroup"]
            lines.append(f"- space group match: {_by_symprec(sg, 'match')} of {sg['n']}")
            if _by_symprec(sg, "crystal_system_match"):  # results written before 2026-12-05 have none
                lines.append(f"- crystal system match: {_by_symprec(sg, 'crystal_system_match')}")
    if result.get("ipt"):
        ipt = result["ipt"]
        lines += ["", "## Symmetry (IPT)", "",
                  f"IPT {_fmt(ipt['ipt'])} (normalised {_fmt(ipt['ipt_normalized'])}) over "
                  f"{ipt['n_structures']} test crystals x {ipt['n_translations']} translations, "
                  f"mean perplexity {_fmt(ipt['mean_perplexity'])}."]
    lines += ["", "## Caveats", "",
              "The hull is built from MP-20 (plus elemental references) only, not the full Materials Project: "
              "E_hull values and stability rates are not directly comparable with the paper's numbers."]
    if _subsampled(result):
        lines += ["", "Coverage and the Wasserstein distances were measured against a subsample of the test split, "
                  "not the full split of the paper's protocol: they are not directly comparable with its numbers."]
    if figures:
        lines += ["", "## Plots", ""] + [f"![{name}]({name})" for name in figures]
    return "\n".join(lines) + "\n"
