"""Accuracy as a local ``evaluate`` metric script, computed with numpy.

Load it with ``evaluate.load(<path of this folder>)``: it needs no network,
unlike ``evaluate.load("accuracy")``, which fetches its script from the Hub.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "The fraction of predictions equal to their references."

_INPUTS = """
Args:
    predictions (list of int): predicted class ids.
    references (list of int): true class ids, as many as predictions.
Returns:
    accuracy (float): correct predictions over all predictions, in [0, 1].
"""


class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_INPUTS,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references):
        predictions = np.asarray(predictions, dtype=np.int64)
        references = np.asarray(references, dtype=np.int64)
        if predictions.size == 0:
            raise ValueError("accuracy needs at least one prediction, got none")
        return {"accuracy": float(np.mean(predictions == references))}
