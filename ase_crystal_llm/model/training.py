"""Training: LoRA / QLoRA fine-tuning of any causal LM, or small LLaMA models from scratch.

:func:`train` is the Python side of ``crystal-llm train``.  It reads crystals
(:func:`~ase_crystal_llm.model.encoding.load_training_structures`), turns each
into an example of the multitask curriculum (:func:`~ase_crystal_llm.text.prompts.make_example`)
and optimises the answer tokens only.

Design points
-------------
* **Loss averaging**: ``per_token`` (default: every answer token weighs the
  same) or ``per_example`` (every example weighs the same, so a 2-token infill
  answer counts as much as a 170-token crystal).  The card records the choice.
* **Batches** are bucketed by length (sorted inside shuffled chunks), so a
  batch pads to similar lengths.  A step's loss sum is therefore divided by the
  epoch's mean count per step, not by its own (``loss_normaliser``): a batch
  of short crystals must not weigh as much as one of long crystals.
* **Exact resume**: each example's task, translation, conditions and mask come
  from ``(seed, epoch, index)``, the batch order from ``(seed, epoch)``, and a
  checkpoint stores weights (safetensors), optimiser, scheduler and RNG
  states (plain tensors: ``torch.load(weights_only=True)``), so a killed run
  resumes onto the same loss curve; a larger ``max_steps`` extends the run.
* **Data parallel** through Hugging Face Accelerate: ``accelerate launch -m
  ase_crystal_llm.cli train ...`` splits every optimiser step's micro-batches
  over the processes with no code change.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
import warnings
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ase_crystal_llm import settings
from ase_crystal_llm.io.files import atomic_write
from ase_crystal_llm.model.config import MAX_POSITIONS, SIZES, TrainConfig, TrainRunOptions, scratch_config
from ase_crystal_llm.model.encoding import IGNORE_INDEX, EpochData, _conditions, collate, load_training_structures
from ase_crystal_llm.model.loading import (
    CHECKPOINTS,
    STATE_NAME,
    _lora_config,
    base_record,
    check_base,
    checkpoints,
    load_base_model,
    load_base_tokenizer,
    resolve_base,
)
from ase_crystal_llm.model.modelcard import CARD_NAME, ModelCard, hash_weights, verify_hashes
from ase_crystal_llm.options import document_options
from ase_crystal_llm.text.format import TRANSLATION
from ase_crystal_llm.text.prompts import PromptTemplate

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence

    from ase import Atoms

__all__ = [
    "LOG_NAME", "train",
]


LOG_NAME = "training_log.json"


# Every this many steps a CPU run hands the heap's free pages back to the OS (0: never).  Batches change
# shape every step and glibc's malloc raises its mmap threshold after large frees, so freed activations
# stay in the heap, fragmented: a default-model run grew past 6 GB in 150 steps, a SmolLM2 run was killed
# at 15 GB.  Trimming every step halves the peak and makes the default model's steps ~1.2x slower (pages
# are faulted in again); every 10 steps still peaked at 4.2 GB (benchmarks/training_memory.py).  Set 0 to
# trade memory back for speed.
TRIM_EVERY = 1
# Validation examples (task, conditions, translation) are drawn with this seed, not the run's, so
# val losses of runs with different seeds score the same examples and can be compared.
VAL_SEED = 0


def _heap_trimmer() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim(0)``, or None where the C library has none (musl, macOS, Windows)."""
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


class _Checkpoints:
    """``<out>/checkpoints/step-NNNNNNN``: written to a temporary folder, then renamed."""

    def __init__(self, out, keep=2):
        self.root = Path(out) / CHECKPOINTS
        self.keep = keep

    def latest(self):
        found = checkpoints(self.root.parent)
        return found[-1] if found else None

    def staging(self, step):
        return self.root / f".tmp-step-{step:07d}"

    def commit(self, step):
        final = self.root / f"step-{step:07d}"
        if final.exists():
            shutil.rmtree(final)
        os.replace(self.staging(step), final)
        for old in sorted(self.root.glob("step-*"))[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final


def _fingerprint(cfg, data_record, val_record, world_size, template):
    keys = (
        "base", "from_scratch", "quantize", "full", "adapter", "batch_size", "grad_accum", "lr", "warmup_steps",
        "weight_decay", "max_grad_norm", "lora_rank", "lora_alpha", "lora_dropout",
        "target_modules", "loss_averaging", "loss_normaliser", "infill_fraction", "max_length", "seed", "canonical",
    )  # fmt: skip
    fp = {k: getattr(cfg, k) for k in keys}
    fp.update(
        total_steps=cfg.extra.get("total_steps"),
        data_sha256=data_record.get("sha256"),
        val_sha256=(val_record or {}).get("sha256"),
        world_size=world_size,
        translation=TRANSLATION,
        prompts=template.to_dict(),
    )
    return json.loads(json.dumps(fp))


class _Trainer:
    """One training run; :func:`train` is the public entry point."""

    def __init__(self, cfg, out, structures, data_record, val_structures, val_record, template, *,
                 resume, progress, callbacks, keep_checkpoints, precision, compile=False):  # fmt: skip
        import torch
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState

        self.cfg, self.out, self.template = cfg, Path(out), template
        self.structures, self.data_record = structures, data_record
        self.val_structures, self.val_record = val_structures, val_record
        self.callbacks = list(callbacks or ())
        self.progress = progress
        self.compile = compile
        # accelerate keeps one state per process and refuses another precision in a later run of the
        # same process (a script or test training twice): start each run from a fresh state, keeping
        # the distributed setup (PartialState).
        AcceleratorState._reset_state(reset_partial_state=False)
        # cpu=True on a CPU-only host makes torchrun / ``accelerate launch --multi_gpu``
        # start gloo data parallelism (accelerate picks MULTI_CPU only when asked).
        self.acc = Accelerator(mixed_precision=precision or "no", cpu=not torch.cuda.is_available())
        self.checkpoints = _Checkpoints(self.out, keep_checkpoints)
        self.resume_dir = self._find_resume() if resume else None
        self._epoch_cache = {}
        self.log = {"steps": [], "eval": []}

    # -- setup ----------------------------------------------------------------
    def _find_resume(self):
        latest = self.checkpoints.latest()
        if latest is None:
            raise FileNotFoundError(f"--resume: no checkpoint in {self.checkpoints.root}")
        return latest

    def setup(self):
        import torch
        from transformers import get_cosine_schedule_with_warmup

        from ase_crystal_llm.model.loss import answer_loss_for

        cfg, acc = self.cfg, self.acc
        torch.manual_seed(cfg.seed)
        self.tokenizer = self._tokenizer()
        self.pad_id = self.tokenizer.pad_token_id
        if cfg.max_length is None:
            limit = getattr(self.tokenizer, "model_max_length", MAX_POSITIONS)
            cfg.max_length = int(limit) if limit and limit < 1_000_000 else MAX_POSITIONS
        self.world = acc.num_processes
        self.micro_per_step = self.world * cfg.grad_accum
        self.n_batches = math.ceil(len(self.structures) / cfg.batch_size)
        if cfg.max_steps is None:
            epochs = cfg.epochs if cfg.epochs is not None else 1.0
            cfg.max_steps = max(1, math.ceil(epochs * self.n_batches / self.micro_per_step))
        total = cfg.max_steps
        resumed = self._resume_state()
        if cfg.warmup_steps is None:
            # An extended run keeps the warmup it started with (it was derived from the old total).
            cfg.warmup_steps = resumed.get("fingerprint", {}).get("warmup_steps") or min(100, max(1, total // 10))
        cfg.eval_every = cfg.eval_every or min(500, max(1, total // 10))
        cfg.save_every = cfg.save_every or min(500, total)
        cfg.extra["total_steps"] = total
        self.fingerprint = _fingerprint(cfg, self.data_record, self.val_record, self.world, self.template)
        self.start_step = 0
        if self.resume_dir is not None:
            self._check_resume(resumed)
        self.model = self._model()
        answer = answer_loss_for(self.model, acc.device)
        if self.compile:
            _compile_layers(self.model)
        params = [p for p in self.model.parameters() if p.requires_grad]
        # Fused on a GPU: fewer kernel launches, which bound the step there.
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                           fused=acc.device.type == "cuda")  # fmt: skip
        self.scheduler = get_cosine_schedule_with_warmup(self.optimizer, cfg.warmup_steps, total)
        if self.resume_dir is not None:
            self._load_states()
        # A quantised base is already on its device and refuses .to(); the rest is placed by accelerate.
        self.loss_net, self.optimizer = acc.prepare(answer, self.optimizer, device_placement=[not cfg.quantize, None])
        self.val_batches = self._val_batches()

    def _tokenizer(self):
        if self.resume_dir is not None and (self.resume_dir / "tokenizer.json").is_file():
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(self.resume_dir)
            if tok.pad_token_id is None:
                tok.pad_token = tok.eos_token
            return tok
        if self.cfg.from_scratch:
            from ase_crystal_llm.text.tokenizer import tokenizer_for_template

            sample = [self.template.generation_prompt(_conditions(a)) for a in self.structures[:2000]]
            return tokenizer_for_template(self.template, sample)
        return load_base_tokenizer(self.cfg.base)

    def _model(self):
        import torch

        cfg, device = self.cfg, self.acc.device
        if cfg.from_scratch:
            from transformers import LlamaForCausalLM

            if self.resume_dir is not None:
                return LlamaForCausalLM.from_pretrained(self.resume_dir, dtype=torch.float32)
            return LlamaForCausalLM(scratch_config(cfg.from_scratch, self.tokenizer))
        if cfg.full:
            # fp32 master weights; accelerate's mixed precision casts for compute.
            return load_base_model(self.resume_dir or cfg.base, device=device, dtype=torch.float32)
        from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training

        model = load_base_model(cfg.base, quantize=cfg.quantize, device=device)
        if cfg.quantize:
            # Non-reentrant checkpointing: the reentrant kind breaks under DDP.
            model = prepare_model_for_kbit_training(
                model,
                use_gradient_checkpointing=device.type == "cuda",
                gradient_checkpointing_kwargs={"use_reentrant": False},
            )
        if self.resume_dir is not None or cfg.adapter is not None:
            start = self.resume_dir or settings.model_folder(cfg.adapter)
            model = PeftModel.from_pretrained(model, start, is_trainable=True)
        else:
            model = get_peft_model(model, _lora_config(cfg))
        # The adapter's config names the base as given (e.g. smollm2-135m), not this machine's path to it.
        model.peft_config["default"].base_model_name_or_path = cfg.base
        return model

    def _resume_state(self):
        if self.resume_dir is None:
            return {}
        return json.loads((self.resume_dir / STATE_NAME).read_text())

    def _check_resume(self, state):
        """Same configuration as the checkpoint's; only the total length may grow.

        A larger ``max_steps`` extends the run as Hugging Face's Trainer does: the
        cosine schedule is rebuilt for the new total and continues from the
        checkpoint's step (the warmup stays as it was).
        """
        # Checkpoints from before the choice existed normalised by the batch's own count.
        old = {"loss_normaliser": "batch", **state.get("fingerprint", {})}
        differ = sorted(
            k for k in set(old) | set(self.fingerprint) if k != "total_steps" and old.get(k) != self.fingerprint.get(k)
        )
        if differ:
            raise ValueError(
                f"checkpoint {self.resume_dir} comes from another configuration (differs in: "
                f"{', '.join(differ)}): resume with the same settings or choose a new --out"
            )
        step, total = int(state["step"]), self.fingerprint["total_steps"]
        if total < step:
            raise ValueError(
                f"--max-steps {total} is below the checkpoint's step {step}: pass at least {step} to resume"
            )
        # A torn or corrupted checkpoint must say so, not fail deep inside safetensors.
        verify_hashes(self.resume_dir, state.get("weights", {}))
        self.start_step = step
        self.log = state.get("log", self.log)
        if old.get("total_steps") not in (None, total):
            self.log.setdefault("extensions", []).append(
                {"at_step": step, "from_total_steps": old["total_steps"], "to_total_steps": total}
            )

    def _load_states(self):
        import torch

        d = self.resume_dir
        self.optimizer.load_state_dict(torch.load(d / "optimizer.pt", weights_only=True))
        self.scheduler.load_state_dict(torch.load(d / "scheduler.pt", weights_only=True))
        # The saved rates belong to the old total; an extended run takes them from the new schedule.
        sched = self.scheduler
        lrs = [base * fn(sched.last_epoch) for base, fn in zip(sched.base_lrs, sched.lr_lambdas)]
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        sched._last_lr = lrs
        rng_file = d / f"rng-{self.acc.process_index}.pt"
        if rng_file.is_file():
            rng = torch.load(rng_file, weights_only=True)
            torch.set_rng_state(rng["cpu"])
            if torch.cuda.is_available() and "cuda" in rng:
                torch.cuda.set_rng_state_all(list(rng["cuda"]))

    # -- data -----------------------------------------------------------------
    def _epoch(self, epoch):
        if epoch not in self._epoch_cache:
            self._epoch_cache.clear()  # one epoch in memory at a time
            data = EpochData(
                self.structures, self.tokenizer, self.template, seed=self.cfg.seed, epoch=epoch,
                batch_size=self.cfg.batch_size, infill_fraction=self.cfg.infill_fraction,
                max_length=self.cfg.max_length,
            )  # fmt: skip
            if data.too_long and self.acc.is_main_process:
                warnings.warn(
                    f"epoch {epoch}: {data.too_long} example(s) longer than {self.cfg.max_length} tokens skipped",
                    stacklevel=2,
                )
            self._epoch_cache[epoch] = data
        return self._epoch_cache[epoch]

    def _micro_batches(self, step):
        """This process's micro-batches of one optimiser step, and their epochs' mean label counts."""
        first = step * self.micro_per_step + self.acc.process_index * self.cfg.grad_accum
        batches, expected = [], 0.0
        for p in range(first, first + self.cfg.grad_accum):
            epoch, j = divmod(p, self.n_batches)
            data = self._epoch(epoch)
            expected += data.mean_labels(self.cfg.loss_averaging)
            batch = data.batch(j)
            if batch:
                batches.append(collate(batch, self.pad_id))
        return batches, expected

    def _val_batches(self):
        if not self.val_structures:
            return []
        structures = self.val_structures[: self.cfg.val_limit] if self.cfg.val_limit else self.val_structures
        data = EpochData(
            structures, self.tokenizer, self.template, seed=VAL_SEED, epoch=0,
            batch_size=self.cfg.batch_size, infill_fraction=self.cfg.infill_fraction,
            max_length=self.cfg.max_length,
        )  # fmt: skip
        order = np.argsort(data.lengths, kind="stable")
        order = order[data.lengths[order] <= self.cfg.max_length]
        size = self.cfg.batch_size
        mine = range(self.acc.process_index * size, len(order), self.world * size)
        return [collate([(data.ids[i], int(data.n_prompt[i])) for i in order[s : s + size]], self.pad_id) for s in mine]

    # -- loss -----------------------------------------------------------------
    def _normaliser(self, labels):
        mask = labels[:, 1:] != IGNORE_INDEX
        if self.cfg.loss_averaging == "per_token":
            return float(mask.sum())
        return float(mask.any(dim=1).sum())

    def _loss_sum(self, batch):
        from ase_crystal_llm.model.loss import answer_positions, token_weights

        # Built on the host: nothing in the step waits for the device until its loss is read.
        labels = batch["labels"]
        batch = dict(batch, weights=token_weights(labels, self.cfg.loss_averaging), positions=answer_positions(labels))
        batch = {k: v.to(self.acc.device, non_blocking=True) for k, v in batch.items()}
        return self.loss_net(batch["input_ids"], batch["labels"], batch["weights"], batch["positions"])

    def _global_sum(self, value):
        import torch

        tensor = torch.tensor([float(value)], dtype=torch.float64, device=self.acc.device)
        return float(self.acc.reduce(tensor, reduction="sum")) if self.world > 1 else float(tensor)

    # -- loop -----------------------------------------------------------------
    def run(self):
        from tqdm.auto import tqdm

        cfg, acc = self.cfg, self.acc
        total = cfg.max_steps
        bar = tqdm(total=total, initial=self.start_step, disable=not (self.progress and acc.is_main_process),
                   desc="train", dynamic_ncols=True)  # fmt: skip
        self.loss_net.train()
        t_start = time.perf_counter()
        self.trim_heap = _heap_trimmer() if TRIM_EVERY and acc.device.type == "cpu" else None
        for step in range(self.start_step, total):
            t0 = time.perf_counter()
            batches, expected = self._micro_batches(step)
            count = self._global_sum(sum(self._normaliser(b["labels"]) for b in batches))
            # Batches are length-bucketed: dividing by a step's own count would weigh the tokens of
            # short crystals up and teach the model to end crystals early (docs/distribution.md).
            norm = count if cfg.loss_normaliser == "batch" else expected * self.world
            seq_tokens = sum(int(b["attention_mask"].sum()) for b in batches)
            loss_sum = 0.0
            for i, batch in enumerate(batches):
                sync = i == len(batches) - 1
                ctx = contextlib.nullcontext() if sync else acc.no_sync(self.loss_net)
                with ctx:
                    loss = self._loss_sum(batch)
                    # DDP averages gradients over processes; scale so the sum is global.
                    acc.backward(loss * self.world / max(norm, 1.0))
                loss_sum += float(loss.detach())
            if not batches:  # keep collective calls matched across processes
                acc.backward(sum(p.sum() * 0.0 for p in self.model.parameters() if p.requires_grad))
            # The norm before clipping, logged as Hugging Face's Trainer does: it shows how often
            # clipping acts, and on which (long or short) batches.
            grad_norm = acc.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm) if cfg.max_grad_norm else None
            lr = self.scheduler.get_last_lr()[0]
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.trim_heap and (step + 1) % TRIM_EVERY == 0:
                self.trim_heap(0)
            loss_value = self._global_sum(loss_sum) / max(count, 1.0)
            seq_tokens = self._global_sum(seq_tokens)
            dt = time.perf_counter() - t0
            entry = {
                "step": step + 1,
                "epoch": round((step + 1) * self.micro_per_step / self.n_batches, 4),
                "loss": loss_value,
                "lr": lr,
                "tokens": int(seq_tokens),
                "tokens_per_s": seq_tokens / dt if dt > 0 else None,
                "grad_norm": None if grad_norm is None else float(grad_norm),
                "time": round(time.perf_counter() - t_start, 3),
            }
            self.log["steps"].append(entry)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", tok_s=f"{entry['tokens_per_s']:.0f}")
            done = step + 1
            if self.val_batches and done % cfg.eval_every == 0 and done != total:  # the end: below
                self.log["eval"].append({"step": done, "val_loss": self.evaluate()})
                bar.set_postfix(loss=f"{loss_value:.4f}", val=f"{self.log['eval'][-1]['val_loss']:.4f}")
            if done % cfg.save_every == 0 or done == total:
                self.save_checkpoint(done)
            for callback in self.callbacks:
                callback(done, entry)
        bar.close()
        # The end is validated here, not in the loop: a resume whose --max-steps is the checkpoint's own
        # step runs no step.
        if self.val_batches and (not self.log["eval"] or self.log["eval"][-1]["step"] != total):
            self.log["eval"].append({"step": total, "val_loss": self.evaluate()})
        return self.finish()

    def evaluate(self):
        """Validation loss (same averaging as training) over the validation batches."""
        import torch

        self.loss_net.eval()
        total, norm = 0.0, 0.0
        with torch.no_grad():
            for batch in self.val_batches:
                total += float(self._loss_sum(batch))
                norm += self._normaliser(batch["labels"])
        self.loss_net.train()
        return self._global_sum(total) / max(self._global_sum(norm), 1.0)

    # -- saving ---------------------------------------------------------------
    def save_checkpoint(self, step):
        import torch

        acc = self.acc
        staging = self.checkpoints.staging(step)
        if acc.is_main_process:
            if staging.exists():
                shutil.rmtree(staging)
            staging.mkdir(parents=True)
        acc.wait_for_everyone()
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
        torch.save(rng, staging / f"rng-{acc.process_index}.pt")
        if acc.is_main_process:
            self.model.save_pretrained(staging, safe_serialization=True)
            self.tokenizer.save_pretrained(staging)
            torch.save(self.optimizer.state_dict(), staging / "optimizer.pt")
            torch.save(self.scheduler.state_dict(), staging / "scheduler.pt")
            state = {"step": step, "fingerprint": self.fingerprint, "log": self.log, "weights": hash_weights(staging)}
            atomic_write(staging / STATE_NAME, json.dumps(state))  # its presence marks a whole checkpoint
        acc.wait_for_everyone()
        if acc.is_main_process:
            self.checkpoints.commit(step)
        acc.wait_for_everyone()

    def finish(self):
        """Write weights, tokenizer, training log and model card into the output directory."""
        acc = self.acc
        card = None
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            model = self.model
            model.save_pretrained(self.out, safe_serialization=True)
            self.tokenizer.save_pretrained(self.out)
            atomic_write(self.out / LOG_NAME, json.dumps(self.log, indent=1))
            card = self._card(model)
            card.record_weights(self.out)
            card.save_pretrained(self.out)
        acc.wait_for_everyone()
        if card is None:
            card = ModelCard.from_pretrained(self.out)
        return card

    def _card(self, model):
        from ase_crystal_llm import __version__

        cfg = self.cfg
        steps = self.log["steps"]
        tail = steps[-min(len(steps), 20):]
        final = {"train_loss": steps[-1]["loss"] if steps else None,
                 "train_loss_last20": float(np.mean([s["loss"] for s in tail])) if tail else None,
                 "val_loss": self.log["eval"][-1]["val_loss"] if self.log["eval"] else None,
                 "steps": cfg.max_steps}  # fmt: skip
        hyper = {k: v for k, v in asdict(cfg).items() if k not in ("extra", "base", "from_scratch", "quantize", "full")}
        hyper.update(world_size=self.world, global_batch_size=cfg.batch_size * self.micro_per_step,
                     optimizer="AdamW", schedule="cosine with linear warmup",
                     mixed_precision=self.acc.mixed_precision, translation=TRANSLATION)  # fmt: skip
        if cfg.from_scratch:
            hyper["model_config"] = {k: v for k, v in SIZES[cfg.from_scratch].items()}
        if cfg.from_scratch or cfg.full:
            hyper["parameters"] = int(sum(p.numel() for p in model.parameters()))
        else:
            hyper["trainable_parameters"] = int(sum(p.numel() for p in model.parameters() if p.requires_grad))
            targets = model.peft_config["default"].target_modules
            if isinstance(targets, (set, list, tuple)):  # "all-linear" resolves to full module paths
                targets = sorted({name.split(".")[-1] for name in targets})
            hyper["target_modules"] = targets
        return ModelCard(
            kind="full" if cfg.from_scratch or cfg.full else "lora",
            base_model=f"from-scratch:{cfg.from_scratch}" if cfg.from_scratch else cfg.base,
            prompts=self.template.to_dict(),
            cell_convention="primitive-niggli" if cfg.canonical else "as-read",
            tasks={"generation": 1 - cfg.infill_fraction, "infill": cfg.infill_fraction},
            training_data=self.data_record,
            validation_data=self.val_record or {},
            hyperparameters=json.loads(json.dumps(hyper)),
            loss_averaging=cfg.loss_averaging,
            final_losses=final,
            quantization=cfg.quantize,
            library_version=__version__,
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            extra=self._provenance(),
            **({"sampling": cfg.extra["continued_from"]["sampling"]} if cfg.adapter else {}),
        )

    def _provenance(self):
        """The base's record and, for a continued adapter, what it started from."""
        cfg, extra = self.cfg, {}
        if cfg.base:
            extra["base"] = base_record(cfg.base)
        if cfg.adapter:
            extra["continued_from"] = cfg.extra["continued_from"]
        return extra


@document_options(TrainRunOptions, TrainConfig)
def train(
    data: str | os.PathLike | Sequence[Atoms],
    out: str | os.PathLike,
    *,
    val: str | os.PathLike | Sequence[Atoms] | None = None,
    base: str | None = None,
    from_scratch: str | None = None,
    adapter: str | None = None,
    max_steps: int | None = None,
    epochs: float | None = None,
    batch_size: int | None = None,
    grad_accum: int = 1,
    lr: float | None = None,
    warmup_steps: int | None = None,
    weight_decay: float = 0.0,
    max_grad_norm: float = 1.0,
    quantize: str | None = None,
    full: bool = False,
    lora_rank: int = 8,
    lora_alpha: int = 32,
    lora_dropout: float = 0.05,
    target_modules: str | Sequence[str] | None = None,
    loss_averaging: str = "per_token",
    loss_normaliser: str = "epoch",
    infill_fraction: float = 1 / 3,
    max_length: int | None = None,
    eval_every: int | None = None,
    save_every: int | None = None,
    val_limit: int | None = 512,
    seed: int = 0,
    resume: bool = False,
    limit: int | None = None,
    canonical: bool = True,
    skip_bad: bool = False,
    template: PromptTemplate | None = None,
    precision: str | None = None,
    compile: bool = False,
    cache: bool = True,
    cache_dir: str | os.PathLike | None = None,
    keep_checkpoints: int = 2,
    progress: bool = True,
    callbacks: Iterable[Callable[[int, dict[str, Any]], Any]] = (),
) -> ModelCard:
    """Train a crystal model and write it to ``out``; the Python side of ``crystal-llm train``.

    Exactly one of ``base`` and ``from_scratch`` is needed.  The parameters are
    the fields of :class:`~.config.TrainRunOptions` and :class:`~.config.TrainConfig`.

    Parameters
    ----------
    {options}

    Returns
    -------
    ModelCard
        The card written to ``out``.
    """
    cfg = TrainConfig(
        base=base, from_scratch=from_scratch, quantize=quantize, full=full, adapter=adapter,
        max_steps=max_steps, epochs=epochs, batch_size=batch_size, grad_accum=grad_accum, lr=lr,
        warmup_steps=warmup_steps, weight_decay=weight_decay, max_grad_norm=max_grad_norm, lora_rank=lora_rank,
        lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=target_modules,
        loss_averaging=loss_averaging, loss_normaliser=loss_normaliser, infill_fraction=infill_fraction,
        max_length=max_length,
        eval_every=eval_every, save_every=save_every, val_limit=val_limit, seed=seed,
        canonical=canonical, limit=limit,
    ).resolve()  # fmt: skip
    out = Path(out)
    _check_out(out, resume)
    if cfg.base is not None:
        resolved = resolve_base(cfg.base)  # fail fast, before reading data
        # A named base (smollm2-135m, or a shipped model such as default) stays a name: the card then loads
        # anywhere it is installed, and records the sha256 of the weights the name stood for.
        if settings.named_base_file(cfg.base) is None and not settings.is_shipped_name(cfg.base):
            cfg.base = resolved
        template = template or _base_template(resolved)
    if cfg.adapter is not None:
        adapter_prompts = _adapter_template(cfg)  # checks the adapter fits the run, whatever the prompts
        template = template or adapter_prompts
    structures, record = load_training_structures(
        data, canonical=canonical, limit=limit, skip_bad=skip_bad, cache=cache, cache_dir=cache_dir
    )
    val_structures, val_record = None, None
    if val is not None:
        val_structures, val_record = load_training_structures(
            val, canonical=canonical, limit=val_limit, skip_bad=skip_bad, cache=cache, cache_dir=cache_dir
        )
    trainer = _Trainer(
        cfg, out, structures, record, val_structures, val_record, template or PromptTemplate(),
        resume=resume, progress=progress, callbacks=callbacks, keep_checkpoints=keep_checkpoints,
        precision=precision or _default_precision(cfg), compile=compile,
    )  # fmt: skip
    trainer.setup()
    return trainer.run()


def _base_template(base):
    """The prompts a base trained by this package was trained with (None for other models)."""
    card = Path(base) / CARD_NAME
    return ModelCard.from_pretrained(base).template if Path(base).is_dir() and card.is_file() else None


def _adapter_template(cfg):
    """The prompts of the adapter a run continues, after checking it fits the run's base and LoRA settings.

    What it started from goes into ``cfg.extra["continued_from"]`` for the card.
    """
    card = ModelCard.from_pretrained(settings.model_folder(cfg.adapter))
    if card.kind != "lora":
        raise ValueError(f"--adapter {cfg.adapter} is not a LoRA adapter (its card says {card.kind!r})")
    check_base(card, cfg.base)
    if not (card.extra.get("base") or {}).get("sha256") and card.base_model != cfg.base:
        raise ValueError(f"--adapter {cfg.adapter} was trained on {card.base_model}, not on --base {cfg.base}")
    hyper = card.hyperparameters or {}
    for key in ("lora_rank", "lora_alpha"):
        if hyper.get(key, getattr(cfg, key)) != getattr(cfg, key):
            raise ValueError(f"--adapter {cfg.adapter} has {key} {hyper[key]}, not {getattr(cfg, key)}: "
                             f"pass --{key.replace('_', '-')} {hyper[key]}")
    # Its sampling settings were chosen for this lineage: the continued card starts from them.
    cfg.extra["continued_from"] = {"adapter": cfg.adapter, "steps": card.final_losses.get("steps"),
                                   "weights": card.weights, "sampling": card.sampling}
    return card.template


def _compile_layers(model):
    """Compile every decoder layer in place: one graph serves them all (they share their code)."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    for layer in lm.get_decoder().layers:
        layer.compile(dynamic=True)


def _default_precision(cfg):
    """bf16 autocast where the hardware computes in bf16 natively, else fp32.

    On a GPU that supports it, and for a pretrained, unquantised base on a CPU with AMX or
    AVX512-BF16 (SmolLM2 LoRA: 1.7x the fp32 step, losses within 0.2%,
    benchmarks/results/lora_cpu_speed_amx.json).  CPUs without them emulate bf16 (72x slower).
    """
    import torch

    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    pretrained = cfg.base is not None and not cfg.quantize
    return "bf16" if pretrained and cpu_computes_bf16() else "no"


def cpu_computes_bf16() -> bool:
    """True on CPUs with native bf16 arithmetic (AMX tiles or AVX512-BF16)."""
    import torch

    # torch has only private probes for these; a torch without them answers no.
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def _check_out(out, resume):
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} exists and is not a directory")
    if resume:
        return
    if (out / CARD_NAME).is_file() or (out / CHECKPOINTS).is_dir():
        raise FileExistsError(
            f"{out} already holds a training run: pass --resume to continue it or choose another --out"
        )
