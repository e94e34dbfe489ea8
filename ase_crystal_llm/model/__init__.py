"""The model side: loading bases and trained models, encoding, training, scoring.

* :mod:`.config`: :class:`~.config.TrainConfig` and the from-scratch sizes;
* :mod:`.loading`: base models (Hugging Face, GGUF, QLoRA), trained models,
  checkpoints, LoRA merging;
* :mod:`.modelcard`: ``crystal_llm.json``, what a trained model records;
* :mod:`.encoding`: crystals to token ids and labels, batches;
* :mod:`.training`: :func:`~.training.train`, ``crystal-llm train``;
* :mod:`.scoring`: answer log-likelihoods (NLL, IPT).
"""
