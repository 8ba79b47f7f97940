"""A tiny BERT encoder with the real MiniLM tokenizer, and small hand-made text tasks."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

from lines_hf.tasks import make_splits, minilm_path
from tiny import tiny_config

MINILM_VOCAB = 30522


def save_tiny_encoder(folder: Path, seed: int = 0) -> Path:
    """Save a seeded tiny ``BertModel`` and the bundled MiniLM tokenizer into ``folder``."""
    torch.manual_seed(seed)
    model = transformers.BertModel(
        tiny_config("bert", vocab_size=MINILM_VOCAB, max_position_embeddings=64, num_hidden_layers=2)
    )
    model.save_pretrained(folder)
    transformers.AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(folder)
    return folder


FRUIT = ["apple", "banana", "cherry", "grape", "lemon", "mango", "peach", "pear"]
VEHICLES = ["car", "truck", "bus", "train", "bicycle", "tractor", "scooter", "van"]


def word_task(words_a, words_b, names=("a", "b"), size=(16, 8, 8), seed=0):
    """Return splits of two-word texts whose class decides which word list both words come from."""
    texts, labels = [], []
    for label, words in enumerate((words_a, words_b)):
        for first in words:
            for second in words:
                if first != second:
                    texts.append(f"{first} {second}")
                    labels.append(label)
    train, validation, test = size
    return make_splits(
        texts, labels, list(names), train_size=train, validation_size=validation, test_size=test, seed=seed
    )
