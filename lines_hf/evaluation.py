"""Target accuracy and the control-probe metric that measures forgetting.

**Target accuracy** is the accuracy of a sequence classifier's own head on the
task it was fine-tuned for.

**Control accuracy** measures how much of what the pre-trained encoder could
do on *other* tasks survives an edit. For each control task, a probe
(logistic regression by default, or nearest centroid) is fitted once on the
pre-trained encoder's mean-pooled, L2-normalised embeddings of the task's
train split. The probe then stays frozen, and any encoder is scored by the
probe's accuracy on that encoder's embeddings of the evaluation split. The
pre-trained encoder's own score is the zero-shot control accuracy, and an
edit's control accuracy is normalised by it: 1.0 means nothing was forgotten.

The probe stays frozen because the zero-shot heads in the CLIP experiments of
the LiNeS paper (Wang et al., ICLR 2025) do too: the pre-trained text encoder
computes them once. So the metric catches features that drift away from what
the pre-trained model's heads expect. A probe refitted on each edited encoder
would measure linear separability instead, which can survive such drift.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .errors import ConfigError

if TYPE_CHECKING:
    import datasets

LOG = logging.getLogger(__name__)

METRICS_DIR = Path(__file__).resolve().parent / "metrics"
PROBE_METHODS = ("logistic", "centroid")


@functools.lru_cache(maxsize=None)
def load_metric(name: str):
    """Load lines_hf's local ``evaluate`` metric ``name`` (``accuracy`` or ``normalized_accuracy``), offline."""
    import evaluate

    folder = METRICS_DIR / name
    if not (folder / f"{name}.py").is_file():
        raise ConfigError(f"no local metric {name!r} in {METRICS_DIR}: use 'accuracy' or 'normalized_accuracy'")
    return evaluate.load(str(folder))


def accuracy(predictions: Sequence[int] | np.ndarray, references: Sequence[int] | np.ndarray) -> float:
    """Return the fraction of ``predictions`` equal to ``references``, with the local accuracy metric."""
    result = load_metric("accuracy").compute(
        predictions=np.asarray(predictions).tolist(), references=np.asarray(references).tolist()
    )
    return float(result["accuracy"])


def encoder_of(model: torch.nn.Module) -> torch.nn.Module:
    """Return the backbone of a task model (``model.bert`` of a BERT classifier), or the model itself."""
    prefix = getattr(model, "base_model_prefix", "")
    return getattr(model, prefix, model) if prefix else model


def _batches_by_length(tokenizer, texts: Sequence[str], max_length: int, batch_size: int):
    # Batching texts of similar length keeps padding, and so CPU time, low.
    lengths = [len(ids) for ids in tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]]
    order = np.argsort(lengths, kind="stable")
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        batch = tokenizer(
            [texts[i] for i in index], truncation=True, max_length=max_length, padding=True, return_tensors="pt"
        )
        yield index, batch


@torch.no_grad()
def embed_texts(
    model: torch.nn.Module,
    tokenizer,
    texts: Sequence[str],
    *,
    max_length: int = 64,
    batch_size: int = 64,
) -> np.ndarray:
    """Embed ``texts`` with the encoder of ``model``: mean pooling over tokens, then L2 normalisation.

    This is the sentence embedding of all-MiniLM-L6-v2. Returns a float32 array
    of shape ``(len(texts), hidden_size)`` in the order of ``texts``.
    """
    encoder = encoder_of(model)
    was_training = encoder.training
    encoder.eval()
    device = next(encoder.parameters()).device
    output = None
    for index, batch in _batches_by_length(tokenizer, texts, max_length, batch_size):
        batch = {k: v.to(device) for k, v in batch.items()}
        hidden = encoder(**batch).last_hidden_state.float()
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        pooled = torch.nn.functional.normalize(pooled, dim=-1)
        if output is None:
            output = np.zeros((len(texts), pooled.shape[-1]), dtype=np.float32)
        output[index] = pooled.cpu().numpy()
    encoder.train(was_training)
    if output is None:
        hidden_size = getattr(getattr(encoder, "config", None), "hidden_size", 0)
        return np.zeros((0, hidden_size), dtype=np.float32)
    return output


@torch.no_grad()
def predict_labels(
    model: torch.nn.Module, tokenizer, texts: Sequence[str], *, max_length: int = 64, batch_size: int = 64
) -> np.ndarray:
    """Return the class ids a sequence classifier predicts for ``texts`` (argmax of its logits)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    predictions = np.zeros(len(texts), dtype=np.int64)
    for index, batch in _batches_by_length(tokenizer, texts, max_length, batch_size):
        logits = model(**{k: v.to(device) for k, v in batch.items()}).logits
        predictions[index] = logits.argmax(-1).cpu().numpy()
    model.train(was_training)
    return predictions


def target_accuracy(
    model: torch.nn.Module, tokenizer, dataset: "datasets.Dataset", *, max_length: int = 64, batch_size: int = 64
) -> float:
    """Return the accuracy of a sequence classifier's head on ``dataset`` (columns ``text``, ``label``)."""
    predictions = predict_labels(model, tokenizer, dataset["text"], max_length=max_length, batch_size=batch_size)
    return accuracy(predictions, dataset["label"])


class Probe:
    """A classifier on fixed embeddings: logistic regression or nearest centroid.

    ``centroid`` assigns each embedding to the class whose mean training
    embedding is nearest in Euclidean distance (ties go to the lower class id).
    """

    def __init__(self, method: str = "logistic", *, seed: int = 0) -> None:
        if method not in PROBE_METHODS:
            raise ConfigError(f"probe method must be one of {', '.join(PROBE_METHODS)}, got {method!r}")
        self.method = method
        self.seed = seed
        self._model: Any = None
        self._centroids: np.ndarray | None = None
        self._classes: np.ndarray | None = None

    def fit(self, embeddings: np.ndarray, labels: Sequence[int] | np.ndarray) -> "Probe":
        """Fit the probe on ``embeddings`` of shape ``(n, d)`` and class ids ``labels`` of shape ``(n,)``."""
        embeddings = np.asarray(embeddings, dtype=np.float64)
        labels = np.asarray(labels)
        if embeddings.ndim != 2 or len(embeddings) != len(labels) or len(labels) == 0:
            raise ConfigError(
                f"a probe needs (n, d) embeddings and n labels with n > 0, got shapes {embeddings.shape} "
                f"and {labels.shape}"
            )
        self._classes = np.unique(labels)
        if self.method == "centroid":
            self._centroids = np.stack([embeddings[labels == c].mean(0) for c in self._classes])
        else:
            from sklearn.linear_model import LogisticRegression

            self._model = LogisticRegression(max_iter=2000, random_state=self.seed).fit(embeddings, labels)
        return self

    def predict(self, embeddings: np.ndarray) -> np.ndarray:
        """Return the predicted class id of each row of ``embeddings``."""
        if self._classes is None:
            raise ConfigError("the probe is not fitted: call fit() first")
        embeddings = np.asarray(embeddings, dtype=np.float64)
        if self.method == "centroid":
            assert self._centroids is not None
            distances = ((embeddings[:, None, :] - self._centroids[None, :, :]) ** 2).sum(-1)
            return self._classes[np.argmin(distances, axis=1)]
        return self._model.predict(embeddings)


class ControlProbes:
    """The control-probe metric over a set of control tasks (see the module docstring).

    Construction embeds every task's train split with the pre-trained model,
    fits one frozen probe per task and records the zero-shot accuracy on each
    evaluation split. All of this happens once and serves every later edit.

    Args:
        pretrained: the pre-trained encoder (or any model whose backbone it is).
        tokenizer: its tokenizer.
        tasks: task name -> ``DatasetDict`` with ``train`` and the evaluation splits.
        splits: the evaluation splits to score (default validation and test).
        probe: ``logistic`` or ``centroid``.
        max_length, batch_size: tokenisation length and inference batch size.

    Raises:
        ConfigError: if ``tasks`` is empty, a split is missing or the probe method is unknown.
    """

    def __init__(
        self,
        pretrained: torch.nn.Module,
        tokenizer,
        tasks: Mapping[str, "datasets.DatasetDict"],
        *,
        splits: Sequence[str] = ("validation", "test"),
        probe: str = "logistic",
        max_length: int = 64,
        batch_size: int = 64,
    ) -> None:
        if not tasks:
            raise ConfigError("ControlProbes needs at least one control task")
        for name, data in tasks.items():
            missing = [s for s in ("train", *splits) if s not in data]
            if missing:
                raise ConfigError(f"control task {name!r} lacks the split(s) {', '.join(missing)}")
        self.tokenizer = tokenizer
        self.tasks = dict(tasks)
        self.splits = tuple(splits)
        self.max_length = max_length
        self.batch_size = batch_size
        self.probes: dict[str, Probe] = {}
        self.zeroshot: dict[str, dict[str, float]] = {split: {} for split in self.splits}

        for name, data in self.tasks.items():
            train = self._embed(pretrained, data["train"]["text"])
            self.probes[name] = Probe(probe).fit(train, data["train"]["label"])
            for split in self.splits:
                predictions = self.probes[name].predict(self._embed(pretrained, data[split]["text"]))
                self.zeroshot[split][name] = accuracy(predictions, data[split]["label"])
            LOG.info("Control probe %s: pre-trained accuracy %s", name, {s: self.zeroshot[s][name] for s in self.splits})

    def _embed(self, model: torch.nn.Module, texts: Sequence[str]) -> np.ndarray:
        return embed_texts(model, self.tokenizer, texts, max_length=self.max_length, batch_size=self.batch_size)

    def _names(self, tasks: Sequence[str] | None) -> list[str]:
        names = list(self.tasks) if tasks is None else list(tasks)
        unknown = [n for n in names if n not in self.tasks]
        if unknown:
            raise ConfigError(f"no control probe for task(s) {', '.join(unknown)}; known: {', '.join(self.tasks)}")
        return names

    def _split(self, split: str) -> str:
        if split not in self.splits:
            raise ConfigError(f"split {split!r} was not prepared; prepared splits: {', '.join(self.splits)}")
        return split

    def accuracies(
        self, model: torch.nn.Module, *, split: str = "test", tasks: Sequence[str] | None = None
    ) -> dict[str, float]:
        """Return the frozen probes' accuracy on ``model``'s embeddings of each control task's ``split``."""
        split = self._split(split)
        scores = {}
        for name in self._names(tasks):
            data = self.tasks[name][split]
            predictions = self.probes[name].predict(self._embed(model, data["text"]))
            scores[name] = accuracy(predictions, data["label"])
        return scores

    def normalized(self, accuracies: Mapping[str, float], *, split: str = "test") -> dict[str, float]:
        """Divide each task's control accuracy by the pre-trained encoder's accuracy on it.

        Raises:
            ConfigError: if the pre-trained encoder scored 0 on a task, which
                leaves nothing to normalise by.
        """
        split = self._split(split)
        result = {}
        for name, value in accuracies.items():
            reference = self.zeroshot[split][self._names([name])[0]]
            if reference <= 0:
                raise ConfigError(
                    f"the pre-trained probe scored 0 on the {split} split of {name!r}: use a larger split or "
                    "another control task"
                )
            result[name] = value / reference
        return result


def mean(values: Mapping[str, float] | Sequence[float]) -> float:
    """Return the arithmetic mean of the values of a mapping or sequence (NaN when empty)."""
    items = list(values.values()) if isinstance(values, Mapping) else list(values)
    return float(np.mean(items)) if items else float("nan")
