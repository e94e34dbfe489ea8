"""From crystals to training batches: structures, token ids, labels.

* **Structures** are read once and cached by the sha256 of their source
  (:func:`load_training_structures`).
* **Labels**: prompt and answer are tokenised separately and the ids
  concatenated, so the prompt/answer boundary is exact for any tokenizer; the
  labels are ``-100`` on the prompt and on padding (found from the attention
  mask, not the token id), so an end-of-sequence token that doubles as padding
  still teaches the model to stop.
* :class:`EpochData` draws each example's task, translation and conditions
  from ``(seed, epoch, index)``: the same data after a resume.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import io
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ase_crystal_llm import settings
from ase_crystal_llm.data import datasets
from ase_crystal_llm.io.files import atomic_write, plain
from ase_crystal_llm.text.prompts import make_example

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

    import torch
    from ase import Atoms
    from transformers import PreTrainedTokenizerBase

    from ase_crystal_llm.text.prompts import PromptTemplate

__all__ = [
    "EpochData", "IGNORE_INDEX", "collate", "encode_example", "encode_examples", "load_training_structures",
]


IGNORE_INDEX = -100


def _source_files(source):
    """Local files behind a source (glob expanded), or None for URLs and lists."""
    if not isinstance(source, (str, os.PathLike)):
        return None
    name = os.path.expanduser(str(source))
    if "://" in name:
        return None
    files = sorted(glob.glob(name)) if any(c in name for c in "*?[") else [name]
    return [Path(f) for f in files if Path(f).is_file()] or None


def _sha256_files(files):
    from ase_crystal_llm.model.modelcard import sha256_file

    digest = hashlib.sha256()
    for path in files:
        digest.update(sha256_file(path).encode())
    return digest.hexdigest()


def _structures_hash(structures):
    from ase_crystal_llm.text.format import atoms_to_text

    digest = hashlib.sha256()
    for atoms in structures:
        digest.update(atoms_to_text(atoms).encode())
        digest.update(json.dumps(_json_info(atoms.info), sort_keys=True).encode())
    return digest.hexdigest()


def _json_info(info):
    """The scalar entries of ``atoms.info`` (numpy scalars as Python ones): what the cache keeps."""
    out = {}
    for key, value in info.items():
        value = plain(value)
        if isinstance(value, (str, int, float, bool)) or value is None:
            out[key] = value
    return out


def _save_structure_cache(path, structures):
    counts = np.array([len(a) for a in structures], dtype=np.int64)
    arrays = dict(
        counts=counts,
        numbers=np.concatenate([a.numbers for a in structures]).astype(np.int16),
        frac=np.concatenate([a.get_scaled_positions(wrap=False) for a in structures]),
        cells=np.array([np.array(a.cell) for a in structures]),
        info=np.array(json.dumps([_json_info(a.info) for a in structures])),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    data = io.BytesIO()
    np.savez(data, **arrays)
    atomic_write(path, data.getvalue())


def _load_structure_cache(path):
    from ase import Atoms

    with np.load(path, allow_pickle=False) as data:
        infos = json.loads(str(data["info"]))
        bounds = np.concatenate([[0], np.cumsum(data["counts"])])
        numbers, frac, cells = data["numbers"], data["frac"], data["cells"]
        structures = []
        for i, info in enumerate(infos):
            s = slice(bounds[i], bounds[i + 1])
            atoms = Atoms(numbers=numbers[s], scaled_positions=frac[s], cell=cells[i], pbc=True)
            atoms.info = info
            structures.append(atoms)
    return structures


def load_training_structures(source: str | os.PathLike | Atoms | Sequence[Atoms], *, canonical: bool = True,
                             limit: int | None = None, skip_bad: bool = False, cache: bool = True,
                             cache_dir: str | os.PathLike | None = None) -> tuple[list[Atoms], dict[str, Any]]:
    """Read (and cache) the structures of a training or validation split.

    Canonicalising 27k MP-20 cells takes minutes, so file sources are cached
    under ``$CRYSTAL_LLM_CACHE`` (default ``~/.cache/ase-crystal-llm``), keyed
    by the files' sha256 and the reading options.

    Returns
    -------
    structures : list of ase.Atoms
    record : dict
        ``source``, ``sha256`` (of the files, or of the structures for a
        list), ``hash_of`` and ``n_structures``, for the model card.
    """
    from ase import Atoms

    if isinstance(source, Atoms):
        source = [source]
    if isinstance(source, (list, tuple)):
        structures = list(source)[:limit] if limit else list(source)
        record = {"source": "<structures>", "sha256": _structures_hash(structures), "hash_of": "structures"}
    else:
        structures, record = _read_source(source, canonical, limit, skip_bad, cache, cache_dir)
    if not structures:
        raise ValueError(f"no structures in {record['source']}: the dataset is empty")
    record["n_structures"] = len(structures)
    return structures, record


def _read_source(source, canonical, limit, skip_bad, cache, cache_dir):

    files = _source_files(source)
    if files is None and "://" not in str(source):
        raise FileNotFoundError(f"structure source not found: {source}")
    record = {"source": str(source), "hash_of": "files" if files else "structures"}
    cache_path = None
    if files:
        record["sha256"] = _sha256_files(files)
        if cache:
            options = json.dumps(
                [record["sha256"], canonical, limit, skip_bad, _module_hash(datasets)], sort_keys=True
            )
            key = hashlib.sha256(options.encode()).hexdigest()[:32]
            cache_path = settings.cache_dir(cache_dir) / "structures" / f"{key}.npz"
            if cache_path.is_file():
                try:
                    return _load_structure_cache(cache_path), record
                except Exception:  # a damaged cache is rebuilt, never fatal
                    pass
    structures = datasets.read_structures(source, canonical=canonical, limit=limit, skip_bad=skip_bad)
    if files is None:
        record["sha256"] = _structures_hash(structures)
    if cache_path is not None and structures:
        with contextlib.suppress(OSError):
            _save_structure_cache(cache_path, structures)
    return structures, record


def _module_hash(module):
    return hashlib.sha256(Path(module.__file__).read_bytes()).hexdigest()[:16]


def encode_example(tokenizer: PreTrainedTokenizerBase, prompt: str, answer: str) -> tuple[np.ndarray, int]:
    """Token ids of prompt + answer + EOS and the number of prompt tokens.

    Prompt and answer are tokenised separately (the prompt with the
    tokenizer's special tokens, e.g. BOS; the answer without), so the
    boundary is exact even for tokenizers that add a prefix space.
    """
    ids, n_prompt = encode_examples(tokenizer, [prompt], [answer])
    return ids[0], int(n_prompt[0])


def encode_examples(tokenizer: PreTrainedTokenizerBase, prompts: Iterable[str],
                    answers: Iterable[str]) -> tuple[list[np.ndarray], np.ndarray]:
    """Batched :func:`encode_example`: a list of id arrays and the prompt lengths."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no end-of-sequence token")
    p_ids = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
    a_ids = tokenizer(list(answers), add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    ids = [np.asarray(p + a + [eos], dtype=np.int64) for p, a in zip(p_ids, a_ids)]
    n_prompt = np.array([len(p) for p in p_ids], dtype=np.int64)
    return ids, n_prompt


def collate(examples: Sequence[tuple[np.ndarray, int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad encoded examples into a batch.

    Parameters
    ----------
    examples : list of (ids, n_prompt)
    pad_id : int
        Filler token id; padding is excluded through the attention mask, so it
        may equal the EOS id.

    Returns
    -------
    dict of torch.LongTensor
        ``input_ids``, ``attention_mask`` and ``labels`` (``-100`` on prompt
        tokens and padding).
    """
    import torch

    length = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), length), int(pad_id), dtype=torch.long)
    attention = torch.zeros((len(examples), length), dtype=torch.long)
    for row, (ids, _) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.as_tensor(ids)
        attention[row, : len(ids)] = 1
    labels = input_ids.clone()
    labels[attention == 0] = IGNORE_INDEX
    for row, (_, n_prompt) in enumerate(examples):
        labels[row, :n_prompt] = IGNORE_INDEX
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


class EpochData:
    """The encoded examples and length-bucketed batches of one epoch.

    Everything is a pure function of ``(seed, epoch)``, so a resumed run
    rebuilds exactly the batches it would have seen.
    """

    CHUNK = 64  # batches per length-sorting chunk

    def __init__(self, structures: Sequence[Atoms], tokenizer: PreTrainedTokenizerBase, template: PromptTemplate | None,
                 *, seed: int, epoch: int, batch_size: int, infill_fraction: float, max_length: int | None) -> None:
        examples = [
            make_example(a, template, seed=seed, epoch=epoch, index=i, infill_fraction=infill_fraction)
            for i, a in enumerate(structures)
        ]
        self.tasks = [e.task for e in examples]
        self.ids, self.n_prompt = encode_examples(tokenizer, [e.prompt for e in examples], [e.answer for e in examples])
        self.lengths = np.array([len(x) for x in self.ids])
        self.too_long = int(np.sum(self.lengths > max_length)) if max_length else 0
        self.batches = self._batches(seed, epoch, batch_size, max_length)
        self._mean_labels = {}

    def _batches(self, seed, epoch, batch_size, max_length):
        rng = np.random.default_rng([int(seed), int(epoch), 0xBA7C])
        order = rng.permutation(len(self.ids))
        chunk = batch_size * self.CHUNK
        batches = []
        for start in range(0, len(order), chunk):
            part = order[start : start + chunk]
            part = part[np.argsort(-self.lengths[part], kind="stable")]
            batches += [part[i : i + batch_size] for i in range(0, len(part), batch_size)]
        batches = [batches[i] for i in rng.permutation(len(batches))]
        if max_length:  # overlong examples are dropped; the batch count stays fixed
            batches = [b[self.lengths[b] <= max_length] for b in batches]
        return batches

    def batch(self, j: int) -> list[tuple[np.ndarray, int]]:
        return [(self.ids[i], int(self.n_prompt[i])) for i in self.batches[j]]

    def label_counts(self, averaging: str) -> np.ndarray:
        """Labelled tokens (``per_token``: answer and EOS) or examples (``per_example``) of each batch."""
        each = self.lengths - self.n_prompt if averaging == "per_token" else np.ones_like(self.lengths)
        return np.array([each[b].sum() for b in self.batches], dtype=float)

    def mean_labels(self, averaging: str) -> float:
        """Mean of :meth:`label_counts` over the epoch's batches (computed once per averaging)."""
        if averaging not in self._mean_labels:
            counts = self.label_counts(averaging)
            self._mean_labels[averaging] = float(counts.mean()) if len(counts) else 0.0
        return self._mean_labels[averaging]


def _conditions(atoms):
    from ase_crystal_llm.text.prompts import conditions_from_info

    return conditions_from_info(atoms.info)
