"""Choosing LiNeS's knobs on validation data: a generic grid search and the one-knob gamma selection.

``grid_search`` evaluates any callable over a grid and keeps every point's
scores; the merge helpers reuse it for beta. ``select_gamma`` applies it to the
one-knob form for forgetting (``alpha = gamma``, ``beta = 1 - gamma``) with the
criterion of Wang et al. (ICLR 2025):

    score(gamma) = 2 * target_acc / finetuned_target_acc + mean(control_acc / zeroshot_control_acc)

over the grid 1.0, 0.9, ..., 0.0. Each grid point is edited in memory, into one
working copy of the fine-tune, by the same plan and engine as
``LiNeSEditor.from_pretrained``.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .config import LiNeSConfig
from .errors import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

LOG = logging.getLogger(__name__)

# 1.0, 0.9, ..., 0.0, rounded so that each value prints and compares exactly.
DEFAULT_GAMMA_GRID: tuple[float, ...] = tuple(round(1.0 - 0.1 * i, 1) for i in range(11))


@dataclass
class GridPoint:
    """One evaluated grid value: the raw scores the evaluation returned and the criterion."""

    value: float
    scores: dict[str, Any]
    criterion: float


@dataclass
class GridSearchResult:
    """Every grid point in evaluation order, and the best one.

    ``best`` is the point with the highest criterion; among equal criteria the
    first evaluated wins, so the grid order is the tie-break.
    """

    parameter: str
    points: list[GridPoint]
    best: GridPoint
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def best_value(self) -> float:
        return self.best.value

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable form (for benchmark records)."""
        return {
            "parameter": self.parameter,
            "best_value": self.best.value,
            "best_criterion": self.best.criterion,
            "points": [{"value": p.value, "criterion": p.criterion, **p.scores} for p in self.points],
            **self.extra,
        }


def _progress(total: int, description: str, enabled: bool):
    from huggingface_hub.utils import tqdm

    return tqdm(total=total, desc=description, unit="point", disable=not enabled)


def grid_search(
    values: Sequence[float],
    evaluate: Callable[[float], Mapping[str, Any]],
    criterion: Callable[[Mapping[str, Any]], float],
    *,
    parameter: str = "value",
    progress: bool = True,
) -> GridSearchResult:
    """Evaluate ``evaluate(value)`` for every grid value and pick the one with the highest ``criterion``.

    Args:
        values: the grid, evaluated in this order.
        evaluate: returns a mapping of scores for one grid value.
        criterion: turns that mapping into one number to maximise.
        parameter: the knob's name, for progress and records.
        progress: show a progress bar (``HF_HUB_DISABLE_PROGRESS_BARS=1`` silences it).

    Raises:
        ConfigError: if the grid is empty or a criterion is NaN.
    """
    values = list(values)
    if not values:
        raise ConfigError(f"the {parameter} grid is empty: pass at least one value")

    points: list[GridPoint] = []
    with _progress(len(values), f"Choosing {parameter}", progress) as bar:
        for value in values:
            scores = dict(evaluate(value))
            score = float(criterion(scores))
            if math.isnan(score):
                raise ConfigError(f"the selection criterion is NaN at {parameter}={value}; scores were {scores}")
            points.append(GridPoint(value=float(value), scores=scores, criterion=score))
            LOG.debug("%s=%g: criterion %.4f, scores %s", parameter, value, score, scores)
            bar.update(1)
            bar.set_postfix({parameter: value, "criterion": round(score, 4)})

    best = points[0]
    for point in points[1:]:
        if point.criterion > best.criterion:
            best = point
    return GridSearchResult(parameter=parameter, points=points, best=best)


def forgetting_criterion(
    target_accuracy: float,
    finetuned_target_accuracy: float,
    control_accuracies: Mapping[str, float],
    zeroshot_control_accuracies: Mapping[str, float],
) -> float:
    """Return ``2 * target / finetuned_target + mean(control / zeroshot_control)``.

    This is LiNeS's selection criterion for the one-knob form: keeping the
    target accuracy weighs twice as much as restoring the control accuracy.

    Raises:
        ConfigError: if a reference accuracy is not positive or a control task
            has no zero-shot accuracy.
    """
    if not finetuned_target_accuracy > 0:
        raise ConfigError(f"the fine-tune's target accuracy must be positive, got {finetuned_target_accuracy}")
    ratios = []
    for name, value in control_accuracies.items():
        reference = zeroshot_control_accuracies.get(name)
        if reference is None or not reference > 0:
            raise ConfigError(f"control task {name!r} needs a positive zero-shot accuracy, got {reference!r}")
        ratios.append(value / reference)
    control = sum(ratios) / len(ratios) if ratios else 0.0
    return 2.0 * target_accuracy / finetuned_target_accuracy + control


class InMemoryEditor:
    """Edits one working copy of a fine-tune in place, once per knob setting.

    The two models are read through ``StateDictSource`` once. Each ``apply``
    builds the plan for its alpha and beta and runs the engine into the working
    copy's tensors, as ``LiNeSEditor.from_pretrained`` does, so no grid point
    needs a new model or a disk round trip. Neither input is modified.
    """

    def __init__(
        self, finetuned: "PreTrainedModel", base_model: "PreTrainedModel", config: LiNeSConfig | None = None
    ) -> None:
        from .checkpoint import StateDictSource

        self.config = config or LiNeSConfig()
        self.model = copy.deepcopy(finetuned).eval()
        self._finetuned = StateDictSource(finetuned.state_dict(), config=finetuned.config.to_dict())
        self._base = StateDictSource(base_model.state_dict(), config=base_model.config.to_dict())
        self._targets = StateDictSource(self.model.state_dict())._tensors
        self._prefix = getattr(finetuned, "base_model_prefix", None)

    def apply(self, alpha: float, beta: float) -> "PreTrainedModel":
        """Set the working copy to ``base + lambda(alpha, beta) * (finetuned - base)`` and return it."""
        from .engine import MemorySink, run_edit
        from .plan import build_plan

        plan = build_plan(
            self._finetuned.specs(),
            self._base.specs(),
            self._finetuned.config,
            self.config,
            alpha=alpha,
            beta=beta,
            prefix_hint=self._prefix,
        )
        run_edit(
            plan,
            self._base,
            self._finetuned,
            MemorySink(self._targets),
            allow_non_finite=self.config.allow_non_finite,
            progress=False,
        )
        return self.model

    def apply_gamma(self, gamma: float) -> "PreTrainedModel":
        """Apply the one-knob form ``alpha = gamma``, ``beta = 1 - gamma``."""
        from .schedule import gamma_to_alpha_beta

        return self.apply(*gamma_to_alpha_beta(gamma))


def select_gamma(
    finetuned: "PreTrainedModel",
    base_model: "PreTrainedModel",
    evaluate_target: Callable[["PreTrainedModel"], float],
    evaluate_control: Callable[["PreTrainedModel"], Mapping[str, float]],
    *,
    grid: Sequence[float] = DEFAULT_GAMMA_GRID,
    finetuned_target_accuracy: float | None = None,
    zeroshot_control_accuracies: Mapping[str, float] | None = None,
    config: LiNeSConfig | None = None,
    progress: bool = True,
) -> GridSearchResult:
    """Choose LiNeS's gamma for a fine-tune by ``forgetting_criterion`` on validation data.

    Args:
        finetuned: the fine-tuned task model (not modified).
        base_model: the pre-trained model (not modified).
        evaluate_target: returns a model's target accuracy on the validation split.
        evaluate_control: returns a model's accuracy on each control task's
            validation split, keyed by task.
        grid: the gamma values, evaluated in order (default 1.0, 0.9, ..., 0.0).
            Ties keep the earlier value, so the default order prefers the
            smallest change to the fine-tune.
        finetuned_target_accuracy: default ``evaluate_target(finetuned)``.
        zeroshot_control_accuracies: default ``evaluate_control(base_model)``.
        config: other LiNeS settings (``non_block_scale``, ``exclude``, ...);
            its alpha, beta and gamma are ignored.
        progress: show a progress bar over the grid.

    Returns:
        A ``GridSearchResult`` whose points hold ``target``, ``control`` (per
        task), ``target_normalized`` and ``control_normalized`` for every gamma,
        and whose ``extra`` holds the two reference accuracies.

    Raises:
        ConfigError: if a gamma is outside [0, 1] or a reference accuracy is not positive.
    """
    for gamma in grid:
        if not 0.0 <= gamma <= 1.0:
            raise ConfigError(f"every gamma must be in [0, 1], got {gamma} in the grid {list(grid)}")
    base_config = LiNeSConfig(**{**(config or LiNeSConfig()).to_dict(), "alpha": None, "beta": None, "gamma": None})

    if finetuned_target_accuracy is None:
        finetuned_target_accuracy = float(evaluate_target(finetuned))
    if zeroshot_control_accuracies is None:
        zeroshot_control_accuracies = dict(evaluate_control(base_model))
    zeroshot = dict(zeroshot_control_accuracies)

    editor = InMemoryEditor(finetuned, base_model, base_config)

    def evaluate(gamma: float) -> dict[str, Any]:
        model = editor.apply_gamma(gamma)
        target = float(evaluate_target(model))
        control = {name: float(v) for name, v in evaluate_control(model).items()}
        normalized = {name: control[name] / zeroshot[name] for name in control}
        return {
            "target": target,
            "target_normalized": target / finetuned_target_accuracy,
            "control": control,
            "control_normalized": sum(normalized.values()) / len(normalized) if normalized else float("nan"),
        }

    def criterion(scores: Mapping[str, Any]) -> float:
        return forgetting_criterion(scores["target"], finetuned_target_accuracy, scores["control"], zeroshot)

    result = grid_search(grid, evaluate, criterion, parameter="gamma", progress=progress)
    result.extra = {"finetuned_target_accuracy": finetuned_target_accuracy, "zeroshot_control_accuracies": zeroshot}
    LOG.info("Selected gamma=%g (criterion %.4f)", result.best.value, result.best.criterion)
    return result
