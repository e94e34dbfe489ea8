#!/usr/bin/env bash
# Prepare, on a machine with the package installed, what benchmarks/gpu_run.sh needs on a GPU machine
# that has torch and transformers but no ase, pymatgen or SmolLM2 base, and no network:
#   .whl/  wheels for Python 3.12 of ase and gguf, and of pymatgen and smact for the charge guard
#          (only what their imports need; the rest is on such machines);
#   .gpu/  MP-20 train and the first 1,000 val crystals in canonical cells (extxyz.gz: no pymatgen needed
#          there), the recorded evaluation's val conditions (50 rows), and the SmolLM2 GGUF cut into
#          parts of at most PART_MB (default 48) MB with its sha256, for transfer tools with a size cap.
# Both folders are git-ignored (.git/info/exclude).  Usage: bash benchmarks/gpu_prepare.sh
set -euo pipefail
cd "$(dirname "$0")/.."
for d in /.gpu/ /.whl/; do grep -qxF "$d" .git/info/exclude 2>/dev/null || echo "$d" >> .git/info/exclude; done
mkdir -p .gpu .whl
pinned() { for name in "$@"; do echo "$name==$(python -c "import sys; from importlib.metadata import version; \
print(version(sys.argv[1]))" "$name")"; done; }
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    $(pinned ase gguf pymatgen pymatgen-core smact monty ruamel.yaml orjson)

python - <<'EOF'
import gzip

import ase.io

from ase_crystal_llm import settings
from ase_crystal_llm.data.datasets import read_structures

for split, limit, name in (("train", None, "train"), ("val", 1000, "val1000")):
    crystals = read_structures(settings.mp20_path(split), limit=limit)
    with gzip.open(f".gpu/{name}.extxyz.gz", "wt") as f:
        ase.io.write(f, crystals, format="extxyz")
    print(f".gpu/{name}.extxyz.gz: {len(crystals)} crystals")
EOF

PHASE=conditions bash benchmarks/evaluate_default_model.sh .gpu/eval smollm2 1000 50

gguf=$(python -c "from ase_crystal_llm import settings; print(settings.named_base_file('smollm2-135m'))")
rm -f .gpu/smollm2.gguf.part*
split -b "${PART_MB:-48}M" -d "$gguf" .gpu/smollm2.gguf.part
(cd "$(dirname "$gguf")" && sha256sum "$(basename "$gguf")") > .gpu/smollm2.gguf.sha256
ls -la .gpu .whl
