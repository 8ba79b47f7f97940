"""Normalised accuracy as a local ``evaluate`` metric script, computed with numpy.

The accuracy of a model divided by a reference accuracy on the same examples:
LiNeS reports target accuracy over the fine-tune's and control accuracy over
the pre-trained model's. Load it with ``evaluate.load(<path of this folder>)``.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Accuracy divided by a reference model's accuracy on the same examples."

_INPUTS = """
Args:
    predictions (list of int): predicted class ids.
    references (list of int): true class ids, as many as predictions.
    reference_accuracy (float): the accuracy to normalise by, in (0, 1].
Returns:
    accuracy (float): correct predictions over all predictions.
    normalized_accuracy (float): accuracy / reference_accuracy; 1.0 matches the reference.
"""


class NormalizedAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_INPUTS,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, reference_accuracy=None):
        if reference_accuracy is None or not reference_accuracy > 0:
            raise ValueError(
                f"reference_accuracy must be a positive number, got {reference_accuracy!r}: pass the "
                "reference model's accuracy on the same examples"
            )
        predictions = np.asarray(predictions, dtype=np.int64)
        references = np.asarray(references, dtype=np.int64)
        if predictions.size == 0:
            raise ValueError("normalized_accuracy needs at least one prediction, got none")
        accuracy = float(np.mean(predictions == references))
        return {"accuracy": accuracy, "normalized_accuracy": accuracy / float(reference_accuracy)}
