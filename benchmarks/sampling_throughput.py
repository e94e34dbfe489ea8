"""GPU sampling throughput of the LLaMA-2-7B architecture: plain ``generate`` against our path.

    python benchmarks/sampling_throughput.py            # on a GPU (H200 target)
    python benchmarks/sampling_throughput.py --tiny     # CPU smoke test of the same code

The model is built from the LLaMA-2-7B config with random bf16 weights (no
download).  The prompt is the real generation prompt of the package's
:class:`PromptTemplate`, tokenised by the project tokenizer (``--tokenizer``
takes a local LLaMA tokenizer directory instead); ids index the 32,000-token
vocabulary.  Every row is forced to write exactly ``--new-tokens`` tokens (170,
the MP-20 average; random weights never stop by themselves).

In the same run, for batch sizes from 64 up to what fits:

* ``plain``: ``model.generate(do_sample=True, temperature, top_p)``, as a user
  of the reference code calls it (no grammar);
* ``ours``: :func:`ase_crystal_llm.generation.fast_sample` with the crystal
  grammar on (shared prompt prefix, preallocated KV buffers, dense batch).

Reported per batch size: seconds per batch, crystals per hour, tokens per
second, peak memory, and the fraction of the memory-bandwidth limit: the
bytes a decoding step must read (all weights plus the KV cache so far),
summed over steps, divided by the time, against the HBM bandwidth measured
here with a device-to-device copy.  Results:
``benchmarks/results/sampling_throughput[_tiny].json``.
"""

import argparse
import datetime
import json
import time
import warnings
from pathlib import Path

import torch
from common import cpu_name  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM

from ase_crystal_llm.generation.constraints import CrystalGrammar
from ase_crystal_llm.generation.decoding import fast_sample, plain_sample
from ase_crystal_llm.text.prompts import PromptTemplate

RESULTS = Path(__file__).parent / "results"

LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5)
TINY = dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5)



def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def hbm_bandwidth(device, gib=2.0, repeats=10):
    """Measured copy bandwidth in bytes/s (a copy reads and writes every byte)."""
    if device.type != "cuda":
        return None
    n = int(gib * 2**30) // 2
    a = torch.empty(n, dtype=torch.bfloat16, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    sync(device)
    t = time.perf_counter()
    for _ in range(repeats):
        b.copy_(a)
    sync(device)
    seconds = time.perf_counter() - t
    del a, b
    torch.cuda.empty_cache()
    return 2 * n * 2 * repeats / seconds


def build_model(config, device, dtype, seed=0):
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(LlamaConfig(**config, attn_implementation="sdpa"))
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def load_tokenizer(path):
    if path:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path)
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        return tok
    from ase_crystal_llm.text.tokenizer import tokenizer_for_template

    return tokenizer_for_template(PromptTemplate())


def bytes_read(model, batch, prompt_len, new_tokens):
    """Bytes one batch must read over all decoding steps: weights + KV cache so far."""
    cfg = model.config
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    itemsize = next(model.parameters()).element_size()
    kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * itemsize
    kv = sum(batch * (prompt_len + t) * kv_per_token for t in range(new_tokens))
    return weights * new_tokens + kv


def run(name, model, tok, prompt, batch, new_tokens, grammar, device, temperature, top_p):
    sampler = fast_sample if name == "ours" else plain_sample
    processor = grammar.processor() if name == "ours" else None
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    g = torch.Generator(device=device).manual_seed(0)
    sync(device)
    t = time.perf_counter()
    ids, _ = sampler(model, tok, [prompt] * batch, processor, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                     temperature=temperature, top_p=top_p, generator=g)
    sync(device)
    seconds = time.perf_counter() - t
    lengths = {len(row) for row in ids}
    if lengths != {new_tokens}:
        raise RuntimeError(f"{name}: expected {new_tokens} tokens per row, got lengths {sorted(lengths)}")
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {"seconds_per_batch": seconds, "crystals_per_hour": batch * 3600 / seconds,
            "tokens_per_s": batch * new_tokens / seconds, "peak_memory_gib": peak / 2**30 if peak else None}


def _parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny model on CPU: a smoke test of the benchmark code")
    ap.add_argument("--batch-sizes", default=None, help="comma-separated (default 64,128,...,2048; tiny: 4,8)")
    ap.add_argument("--new-tokens", type=int, default=None, help="forced tokens per crystal (default 170; tiny 20)")
    ap.add_argument("--tokenizer", help="local tokenizer directory (default: the project tokenizer)")
    ap.add_argument("--paths", default="plain,ours")
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--out", default=None)
    return ap.parse_args()


def _best_rows(rows):
    """The row of each path with the most crystals per hour."""
    best = {}
    for r in rows:
        if not r.get("oom") and r["crystals_per_hour"] > best.get(r["path"], {}).get("crystals_per_hour", 0):
            best[r["path"]] = r
    return best


def write_results(out, header, rows):
    """The results file, rewritten after every row: a run cut short keeps what it measured."""
    best = _best_rows(rows)
    result = {**header, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "rows": rows, "best": best}
    if "plain" in best and "ours" in best:
        result["speedup_best_vs_best"] = best["ours"]["crystals_per_hour"] / best["plain"]["crystals_per_hour"]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    return result


def main():
    args = _parse_args()
    warnings.simplefilter("ignore")

    if args.tiny:
        device, dtype, config = torch.device("cpu"), torch.float32, TINY
        batches = [4, 8]
        new_tokens = args.new_tokens or 20
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no GPU: run with --tiny for the CPU smoke test")
        device, dtype, config = torch.device("cuda"), torch.bfloat16, LLAMA2_7B
        batches = [64 * 2**k for k in range(6)]
        new_tokens = args.new_tokens or 170
    if args.batch_sizes:
        batches = [int(b) for b in args.batch_sizes.split(",")]
    tok = load_tokenizer(args.tokenizer)
    prompt = PromptTemplate().generation_prompt({})
    prompt_len = len(tok(prompt)["input_ids"])
    model = build_model(config, device, dtype)
    # A huge atom budget: the forced length must never meet the grammar's end.
    grammar = CrystalGrammar(tok, max_atoms=10_000, vocab_size=config["vocab_size"])
    bandwidth = hbm_bandwidth(device)
    hardware = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
                "torch": torch.__version__, "cpu_threads": torch.get_num_threads()}
    if device.type == "cuda":
        hardware["memory_gib"] = torch.cuda.get_device_properties(device).total_memory / 2**30
    print(f"{hardware}; prompt {prompt_len} tokens; HBM {bandwidth / 1e12 if bandwidth else 0:.2f} TB/s", flush=True)
    benchmark = "sampling_throughput" + ("_tiny" if args.tiny else "")
    out = Path(args.out or RESULTS / f"{benchmark}.json")
    header = {"benchmark": benchmark, "hardware": hardware, "hbm_bandwidth_bytes_per_s": bandwidth,
              "model": ("tiny LLaMA (smoke test)" if args.tiny else "LLaMA-2-7B architecture")
              + f", random {dtype} weights",
              "prompt_tokens": prompt_len, "new_tokens": new_tokens}

    # Warm-up (kernels, grammar masks) outside the timings.
    for name in args.paths.split(","):
        run(name, model, tok, prompt, 2, 4, grammar, device, args.temperature, args.top_p)

    rows = []
    stopped = set()
    for batch in batches:
        for name in args.paths.split(","):
            if name in stopped:
                continue
            try:
                r = run(name, model, tok, prompt, batch, new_tokens, grammar, device, args.temperature, args.top_p)
            except torch.cuda.OutOfMemoryError:
                stopped.add(name)
                rows.append({"path": name, "batch": batch, "oom": True})
                print(f"{name:5s} batch {batch}: out of memory", flush=True)
                torch.cuda.empty_cache()
                continue
            need = bytes_read(model, batch, prompt_len, new_tokens)
            r.update(path=name, batch=batch,
                     bandwidth_fraction=need / r["seconds_per_batch"] / bandwidth if bandwidth else None)
            rows.append(r)
            print(f"{name:5s} batch {batch:5d}: {r['seconds_per_batch']:.2f} s/batch, "
                  f"{r['crystals_per_hour']:,.0f} crystals/h, {r['tokens_per_s']:,.0f} tokens/s"
                  + (f", peak {r['peak_memory_gib']:.1f} GiB, {r['bandwidth_fraction']:.0%} of bandwidth limit"
                     if r["peak_memory_gib"] else ""), flush=True)
            write_results(out, header, rows)
        if len(stopped) == len(args.paths.split(",")):
            break
    result = write_results(out, header, rows)
    if "speedup_best_vs_best" in result:
        print(f"speed-up (best batch each): {result['speedup_best_vs_best']:.2f}x")
    print(f"written {out}")


if __name__ == "__main__":
    main()
