"""The control-probe metric, embeddings and target accuracy, on a tiny encoder and hand-made data."""

from __future__ import annotations

import copy

import datasets
import numpy as np
import pytest
import torch
import transformers

from lines_hf.errors import ConfigError
from lines_hf.evaluation import ControlProbes, Probe, accuracy, embed_texts, load_metric, target_accuracy
from tiny_text import FRUIT, VEHICLES, save_tiny_encoder, word_task

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]
ANIMALS = ["dog", "cat", "horse", "cow", "sheep", "goat", "mouse", "rabbit"]


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    folder = save_tiny_encoder(tmp_path_factory.mktemp("tiny-encoder"))
    return transformers.AutoModel.from_pretrained(folder).eval(), transformers.AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def tasks():
    return {
        "fruit_vehicle": word_task(FRUIT, VEHICLES, size=(24, 10, 12)),
        "colour_animal": word_task(COLOURS, ANIMALS, size=(24, 10, 12), seed=1),
    }


def test_local_metrics_compute_offline():
    assert load_metric("accuracy").compute(predictions=[1, 0, 1, 1], references=[1, 1, 1, 0]) == {"accuracy": 0.5}
    result = load_metric("normalized_accuracy").compute(
        predictions=[1, 0, 1, 1], references=[1, 1, 1, 0], reference_accuracy=0.8
    )
    assert result == {"accuracy": 0.5, "normalized_accuracy": 0.625}


def test_normalized_metric_needs_reference():
    with pytest.raises(ValueError, match="reference_accuracy"):
        load_metric("normalized_accuracy").compute(predictions=[1], references=[1])


def test_embedding_matches_unbatched_mean_pool(encoder):
    model, tokenizer = encoder
    texts = ["apple", "a much longer text about a red truck", "banana bus"]
    batched = embed_texts(model, tokenizer, texts, batch_size=2)

    for row, text in zip(batched, texts):
        ids = tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            hidden = model(**ids).last_hidden_state[0]
        pooled = hidden.mean(0)
        expected = (pooled / pooled.norm()).numpy()
        np.testing.assert_allclose(row, expected, atol=1e-5)
    assert batched.shape == (3, model.config.hidden_size)


def test_centroid_probe_hand_made_points():
    train = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    probe = Probe("centroid").fit(train, [0, 0, 1, 1])
    assert probe.predict(np.array([[0.8, 0.3], [0.2, 0.7], [0.5, 0.5]])).tolist() == [0, 1, 0]


def test_probe_rejects_unknown_method():
    with pytest.raises(ConfigError, match="nearest"):
        Probe("nearest")


def test_pretrained_scores_normalize_to_one(encoder, tasks):
    model, tokenizer = encoder
    probes = ControlProbes(model, tokenizer, tasks, probe="centroid")

    for split in ("validation", "test"):
        scores = probes.accuracies(copy.deepcopy(model), split=split)
        assert scores == probes.zeroshot[split]
        assert probes.normalized(scores, split=split) == {name: 1.0 for name in tasks}


def test_probe_accuracy_matches_numpy_reference(encoder, tasks):
    model, tokenizer = encoder
    probes = ControlProbes(model, tokenizer, tasks, probe="centroid", splits=("test",))

    for name, data in tasks.items():
        train = embed_texts(model, tokenizer, data["train"]["text"])
        test = embed_texts(model, tokenizer, data["test"]["text"])
        labels = np.array(data["train"]["label"])
        centroids = np.stack([train[labels == c].mean(0) for c in (0, 1)])
        nearest = np.argmin(((test[:, None, :] - centroids[None]) ** 2).sum(-1), axis=1)
        expected = float(np.mean(nearest == np.array(data["test"]["label"])))
        assert probes.zeroshot["test"][name] == pytest.approx(expected, abs=1e-12)


def test_collapsed_encoder_scores_majority_share(encoder):
    model, tokenizer = encoder
    # Three of four test examples are class 1: an encoder that maps every text to
    # the same embedding makes one prediction for all, scoring 0.25 or 0.75.
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["fruit", "vehicle"])})
    data = datasets.DatasetDict(
        train=datasets.Dataset.from_dict(
            {"text": ["apple pear", "car bus", "apple mango", "truck van"], "label": [0, 1, 0, 1]}, features=features
        ),
        test=datasets.Dataset.from_dict(
            {"text": ["bus car", "van truck", "tractor bus", "grape apple"], "label": [1, 1, 1, 0]}, features=features
        ),
    )
    probes = ControlProbes(model, tokenizer, {"toy": data}, probe="centroid", splits=("test",))

    collapsed = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in collapsed.parameters():
            parameter.zero_()
    score = probes.accuracies(collapsed, split="test")["toy"]
    assert score in (0.25, 0.75)
    assert probes.normalized({"toy": score}, split="test")["toy"] == score / probes.zeroshot["test"]["toy"]


def test_target_accuracy_matches_argmax(encoder, tasks):
    model, tokenizer = encoder
    torch.manual_seed(0)
    classifier = transformers.BertForSequenceClassification(model.config.__class__(**{**model.config.to_dict(), "num_labels": 2}))
    classifier.bert.load_state_dict(model.state_dict())
    classifier.eval()
    data = tasks["fruit_vehicle"]["test"]

    with torch.no_grad():
        predictions = [int(classifier(**tokenizer(t, return_tensors="pt")).logits.argmax(-1)) for t in data["text"]]
    expected = accuracy(predictions, data["label"])
    assert target_accuracy(classifier, tokenizer, data) == expected
    assert expected == float(np.mean(np.array(predictions) == np.array(data["label"])))


def test_control_probes_reject_missing_split(encoder, tasks):
    model, tokenizer = encoder
    with pytest.raises(ConfigError, match="lacks the split"):
        ControlProbes(model, tokenizer, tasks, splits=("dev",))
