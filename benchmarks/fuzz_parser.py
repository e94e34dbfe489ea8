"""Fuzz ``text_to_atoms`` with at least 100,000 inputs.

Inputs come from real MP-20 crystals (test split) written as text, then cut
short, mutated character- and line-wise, given absurd numbers, unicode and
blank lines, plus purely random text.  Every input must either raise
``CrystalTextError`` or give a valid periodic ``Atoms``; anything else (another
exception, or an invalid structure) is a failure and the exit status is 1.

Usage::

    python benchmarks/fuzz_parser.py [-n 100000] [--seed 0] [--seeds 500]

Writes ``benchmarks/results/fuzz_parser.json`` (hardware, date, counts by
input kind, outcome and rejection reason, failing inputs if any).
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
from ase import Atoms
from common import report_header  # noqa: E402

from ase_crystal_llm import settings
from ase_crystal_llm.data.datasets import iter_structures
from ase_crystal_llm.text import format as text_module
from ase_crystal_llm.text.format import ELEMENTS, MAX_ATOMS, MIN_VOLUME, CrystalTextError, atoms_to_text, text_to_atoms

RESULTS = Path(__file__).resolve().parent / "results" / "fuzz_parser.json"

ASCII = [chr(c) for c in range(32, 127)] + ["\n", "\t", "\r"]
UNICODE = [
    "\u00a0", "\u2009", "\u200b", "\u200e", "\u202e", "\u3000", "\ufeff",  # odd spaces, marks, BOM
    "\u2028", "\u2029", "\x85", "\x0b", "\x0c", "\x1c", "\x1e",  # line breaks str.splitlines() honours
    "\u0663", "\u0665", "\uff11", "\uff0e", "\u00b2", "\u2155", "\u216b",  # other-script digits, superscripts
    "\u2212", "\u00b7", "\u00e9", "\u0301", "\u00c5", "\u212b", "\U0001f600", "\ud800", "\x00", "\x7f",
]
HUGE = ["1e308", "1e309", "-1e309", "1e-320", "1e-400", "9" * 400, "0." + "0" * 400 + "1", "nan", "NaN",
        "inf", "-inf", "Infinity", "1e99999", "-0", "+0.0", "1_000", "0x1p3", "1e", ".", "+-1", "1..2"]
TOKENS = list(ELEMENTS) + ["X", "na", "NA", "Xx", "[MASK]", "D", "Uuo", "", "0", "1.00", "0.50"]


def check_valid(atoms):
    """The reason a parsed structure is unusable, or None when it is valid."""
    if not isinstance(atoms, Atoms):
        return f"not an Atoms: {type(atoms).__name__}"
    checks = [
        (atoms.pbc.all(), "not periodic in all directions"),
        (np.isfinite(atoms.cell.array).all(), "non-finite cell"),
        (atoms.cell.rank == 3, "cell rank below 3"),
        (atoms.cell.volume >= MIN_VOLUME, "cell volume below MIN_VOLUME"),
        (1 <= len(atoms) <= MAX_ATOMS, "atom count out of range"),
        (np.isfinite(atoms.positions).all(), "non-finite positions"),
        (set(atoms.get_chemical_symbols()) <= set(ELEMENTS), "not a real element"),
    ]
    for ok, reason in checks:
        if not ok:
            return reason
    return None


def reason_of(err):
    """Group rejection messages: drop line numbers, quoted input and numbers."""
    msg = re.sub(r"^line \d+: ", "", str(err))
    msg = re.sub(r"'.*'|\".*\"|\[.*\]", "", msg)
    msg = re.sub(r"element \S+ has", "element E has", msg)
    msg = msg.split(":")[0]
    msg = re.sub(r"[-+]?\d[\d.e+-]*", "N", msg)
    return " ".join(msg.split())


class Fuzzer:
    """Makes inputs of named kinds from seed crystal texts and a random generator."""

    def __init__(self, seeds, rng):
        self.seeds = seeds
        self.rng = rng
        self.kinds = {
            "real": self.real,
            "random_text": self.random_text,
            "truncated": self.truncated,
            "char_mutation": self.char_mutation,
            "line_mutation": self.line_mutation,
            "huge_numbers": self.huge_numbers,
            "unicode": self.unicode,
            "empty_lines": self.empty_lines,
            "token_swap": self.token_swap,
            "crystal_shaped": self.crystal_shaped,
        }

    def pick(self, items):
        return items[self.rng.integers(len(items))]

    def seed(self):
        return self.pick(self.seeds)

    def real(self):
        return self.seed()

    def random_text(self):
        alphabet = ASCII if self.rng.random() < 0.7 else ASCII + UNICODE
        return "".join(self.pick(alphabet) for _ in range(self.rng.integers(0, 200)))

    def truncated(self):
        text = self.seed()
        return text[: self.rng.integers(0, len(text) + 1)]

    def char_mutation(self):
        text = self.seed()
        for _ in range(self.rng.integers(1, 6)):
            i = int(self.rng.integers(0, len(text) + 1))
            c = self.pick(ASCII + UNICODE)
            op = self.rng.integers(3)
            text = (text[:i] + c + text[i:], text[:i] + text[i + 1:], text[:i] + c + text[i + 1:])[op]
        return text

    def line_mutation(self):
        lines = self.seed().split("\n")
        for _ in range(self.rng.integers(1, 4)):
            i, j = self.rng.integers(0, len(lines), size=2)
            op = self.rng.integers(3)
            if op == 0:
                lines.insert(i, lines[j])
            elif op == 1 and len(lines) > 1:
                del lines[i]
            else:
                lines[i], lines[j] = lines[j], lines[i]
        return "\n".join(lines)

    def _fields(self):
        return [line.split() for line in self.seed().split("\n")]

    def huge_numbers(self):
        rows = self._fields()
        numeric = [i for i, r in enumerate(rows) if len(r) == 3]
        for _ in range(self.rng.integers(1, 3)):
            i = self.pick(numeric)
            rows[i][self.rng.integers(3)] = self.pick(HUGE)
        return "\n".join(" ".join(r) for r in rows)

    def unicode(self):
        text = self.seed()
        for _ in range(self.rng.integers(1, 4)):
            i = int(self.rng.integers(0, len(text) + 1))
            text = text[:i] + self.pick(UNICODE) + text[i:]
        return text

    def empty_lines(self):
        lines = self.seed().split("\n")
        for _ in range(self.rng.integers(1, 3)):
            lines.insert(int(self.rng.integers(0, len(lines) + 1)), self.pick(["", " ", "\t", "  \t ", "\r"]))
        return "\n".join(lines)

    def token_swap(self):
        rows = self.seed().split("\n")
        i = 2 + 2 * int(self.rng.integers(0, (len(rows) - 2) // 2))
        rows[i] = self.pick(TOKENS)
        return "\n".join(rows)

    def crystal_shaped(self):
        """Random cells: mostly plausible, some near-degenerate, some absurd."""
        def number(low, high):
            r = self.rng.random()
            if r < 0.05:
                return self.pick(HUGE)
            if r < 0.15:
                return repr(float(self.rng.uniform(0, 1) * 10 ** self.rng.uniform(-12, 4)))
            return f"{self.rng.uniform(low, high):.{self.rng.integers(0, 4)}f}"

        def angles():
            if self.rng.random() < 0.3:  # near the edge of the possible: flat or collapsed cells
                a, b = self.rng.uniform(0, 180, size=2)
                if self.rng.random() < 0.5:  # equal angles: a third one near 0 flattens the cell
                    b = a
                g = self.pick([a + b, abs(a - b), 360 - a - b, 0.0, 180.0])
                g += self.rng.normal() * 10.0 ** self.rng.integers(-14, -4)
                return " ".join(repr(float(x)) for x in self.rng.permutation([a, b, g]))
            return " ".join(number(30, 150) for _ in range(3))

        def triple(low, high):
            return " ".join(number(low, high) for _ in range(self.rng.choice([2, 3, 3, 3, 3, 3, 3, 4])))

        lines = [triple(0.5, self.pick([30.0, 1000.0])), angles()]
        for _ in range(self.rng.integers(0, 8)):
            lines += [self.pick(TOKENS), triple(-0.5, 1.5)]
        return "\n".join(lines)

    def __iter__(self):
        names = list(self.kinds)
        while True:
            kind = self.pick(names)
            yield kind, self.kinds[kind]()


def seed_texts(count, rng):
    """Real MP-20 test crystals written as text (random translation, like training)."""
    structures = iter_structures(settings.mp20_path("test"), limit=count)
    return [atoms_to_text(a, translate=True, rng=rng) for a in structures]



def run(n, seed, n_seeds, argv=None):
    rng = np.random.default_rng(seed)
    seeds = seed_texts(n_seeds, rng)
    counts = collections.Counter()
    by_kind = collections.defaultdict(collections.Counter)
    reasons = collections.Counter()
    failures = []
    start = time.perf_counter()
    for count, (kind, text) in enumerate(Fuzzer(seeds, rng)):
        if count == n:
            break
        try:
            problem = check_valid(text_to_atoms(text))
            outcome = "parsed" if problem is None else "invalid_atoms"
        except CrystalTextError as err:
            outcome, problem = "rejected", None
            reasons[reason_of(err)] += 1
        except Exception as err:  # the thing being hunted
            outcome, problem = "unexpected_exception", f"{type(err).__name__}: {err}"
        counts[outcome] += 1
        by_kind[kind][outcome] += 1
        if problem is not None and len(failures) < 50:
            failures.append({"kind": kind, "outcome": outcome, "problem": problem, "input": text})
    seconds = time.perf_counter() - start
    return {
        **report_header("fuzz_parser", argv),
        "inputs": n,
        "rng_seed": seed,
        "seed_crystals": len(seeds),
        "seed_source": "MP-20 test split (canonical cells, random translation)",
        "text_py_sha256": hashlib.sha256(Path(text_module.__file__).read_bytes()).hexdigest(),
        "seconds": round(seconds, 1),
        "inputs_per_second": round(n / seconds),
        "outcomes": dict(counts),
        "by_kind": {k: dict(v) for k, v in sorted(by_kind.items())},
        "rejection_reasons": dict(reasons.most_common()),
        "failures": failures,
        "passed": counts["invalid_atoms"] == 0 and counts["unexpected_exception"] == 0,
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-n", type=int, default=100_000, help="number of inputs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", type=int, default=500, help="number of MP-20 crystals to mutate")
    p.add_argument("-o", "--output", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    result = run(args.n, args.seed, args.seeds, argv)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1, ensure_ascii=True) + "\n")
    print(json.dumps({k: result[k] for k in ("inputs", "seconds", "outcomes", "passed")}))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
