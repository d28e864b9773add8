"""Synthetic data for a tiny mPLUG-Owl: a world of coloured shapes, questions about it, a dataset
writer in the original jsonl format, and a LLaMA-style SentencePiece tokenizer trainer.

* :mod:`owl.data.scenes`: ``Scene``, ``random_scene``, ``render`` and render settings;
* :mod:`owl.data.dialogues`: question kinds, ``Dialogue``, the prompt template, answer matching;
* :mod:`owl.data.build`: examples in memory, evaluation items, ``python -m owl.data.build``;
* :mod:`owl.data.tokenizer`: ``train_tokenizer``, ``python -m owl.data.tokenizer``.

Nothing is re-exported here, so ``python -m owl.data.build`` runs its module exactly once.
"""
