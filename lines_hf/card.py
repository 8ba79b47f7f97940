"""The model card (``README.md``) and scale plot that every LiNeS output carries.

The card states exactly how the output was made. Its metadata gives the Hub's
model tree ``base_model``, ``base_model_relation``, ``library_name`` and
``tags``, plus a ``lines`` mapping with every setting. Its body has a paragraph
on what LiNeS did, the command that reproduces it, the scale of every block and
a plot of scale against depth. A fine-tune's own card is kept below ours.

``build_model_card`` is pure (no files); ``write_model_card`` writes the card
and the plot into an output folder.

The *record* is the dict an edit resolves (``model.lines_record``, also stored
in ``lines_config.json`` under ``"resolved"``)::

    {"kind": "edit" | "adapter" | "merge",
     "library_name": "transformers" | "peft",
     "inputs": {"base_model": {"path": str, "hub_id": str | None, "revision": str | None},
                "finetuned": [{"path": ..., "hub_id": ..., "revision": ...}, ...]},
     "command": str,
     "alpha": float, "beta": float, "non_block_scale": float, "out_dtype": str | None,
     "stacks": {name: {"depth": int, "scales": [float, ...], ...}},
     "copied_from_finetuned_not_in_base": [...], "excluded": [...], "dropped_base_only": [...],
     "merge": {"method": str, "params": {...}, "alpha_auto": bool}}   # merges only
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Union

from huggingface_hub import ModelCard, ModelCardData

from .config import CONFIG_NAME, LiNeSConfig
from .errors import OutputPathError
from .plot import PLOT_NAME, ScalePlot, draw_scales

LOG = logging.getLogger(__name__)

CARD_NAME = "README.md"
PAPER_URL = "https://arxiv.org/abs/2410.17146"
PAPER_TITLE = "LiNeS: Post-training Layer Scaling Prevents Forgetting and Enhances Model Merging"
FINETUNED_CARD_HEADING = "Card of the fine-tuned model"
TAG = "lines"

# Metadata of a fine-tune's card that still describes the edited model. Its
# ``model-index`` (evaluation results) and ``base_model`` do not, so they are dropped.
KEPT_LIST_METADATA = ("language", "datasets", "metrics")
KEPT_SCALAR_METADATA = ("license", "license_name", "license_link", "pipeline_tag")

# Lines that PEFT's save_pretrained adds to huggingface_hub's default card template.
_PEFT_TEMPLATE_LINES = ("### Framework versions", "- PEFT ")

# ``--token VALUE``, ``--token=VALUE``, ``token="..."`` and bare Hugging Face tokens.
_TOKEN_PATTERNS = (
    re.compile(r"(--(?:hub-)?token[= ])(\S+)"),
    re.compile(r"""(\btoken\s*=\s*)(["'])[^"']*\2"""),
    re.compile(r"\bhf_[A-Za-z0-9]{20,}\b"),
)

CardSource = Union[str, os.PathLike, ModelCard]

_CARD_TEMPLATE = """---
{{ card_data }}
---

{{ body }}
"""


# --------------------------------------------------------------------------- inputs and metadata


def redact_command(command: str) -> str:
    """Return ``command`` with any access token replaced by ``<token>``.

    Covers ``--token VALUE``, ``--token=VALUE``, ``token="..."`` and bare
    ``hf_...`` tokens, so a recorded command never carries a secret to disk.
    """
    redacted = _TOKEN_PATTERNS[0].sub(r"\1<token>", command)
    redacted = _TOKEN_PATTERNS[1].sub(r"\1\2<token>\2", redacted)
    return _TOKEN_PATTERNS[2].sub("<token>", redacted)


def _inputs(record: Mapping[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    inputs = record.get("inputs") or {}
    base = dict(inputs.get("base_model") or {})
    finetuned = inputs.get("finetuned") or []
    if isinstance(finetuned, Mapping):
        finetuned = [finetuned]
    return base, [dict(item) for item in finetuned]


def _hub_id(item: Mapping[str, Any]) -> str | None:
    """Return the Hub repo id of an input, from the record or a cache snapshot path."""
    if item.get("hub_id"):
        return str(item["hub_id"])

    # A folder inside the huggingface_hub cache (models--org--name/snapshots/<rev>)
    # names its repo even when the caller passed the path.
    path = item.get("path")
    if path:
        for part in Path(os.fspath(path)).parts:
            if part.startswith("models--"):
                return part[len("models--") :].replace("--", "/")
    return None


def _label(item: Mapping[str, Any]) -> str:
    """Return a short name for an input: its Hub id, or its folder name."""
    hub_id = _hub_id(item)
    if hub_id:
        return hub_id
    path = item.get("path")
    return Path(os.fspath(path)).name if path else "unknown"


def _kind(record: Mapping[str, Any]) -> str:
    kind = record.get("kind", "edit")
    if kind not in ("edit", "adapter", "merge"):
        raise ValueError(f"record kind must be 'edit', 'adapter' or 'merge', got {kind!r}")
    return kind


def _is_merged_adapter(record: Mapping[str, Any]) -> bool:
    """Return whether the output is a full model with the scaled adapter merged into the base."""
    return _kind(record) == "adapter" and bool((record.get("adapter") or {}).get("merged"))


def _uses_lines(record: Mapping[str, Any]) -> bool:
    """Return false for a merge baseline that scaled the merged task vector uniformly, without LiNeS."""
    return (record.get("merge") or {}).get("lines", True) is not False


def base_model_ids(record: Mapping[str, Any]) -> list[str]:
    """Return the Hub ids for the card's ``base_model`` field, in order, without repeats.

    An edit or merge lists the pre-trained model and every fine-tune whose Hub
    id is known. An adapter lists only the pre-trained model, because the Hub
    reads ``base_model`` of an adapter as the model it plugs into, and so does
    an adapter merged into that model. Local paths are left out (they are
    recorded in the ``lines`` mapping).
    """
    base, finetuned = _inputs(record)
    items = [base] if _kind(record) == "adapter" else [base, *finetuned]
    ids: list[str] = []
    for item in items:
        hub_id = _hub_id(item)
        if hub_id and hub_id not in ids:
            ids.append(hub_id)
    return ids


def base_model_relation(record: Mapping[str, Any], ids: Sequence[str]) -> str | None:
    """Return the card's ``base_model_relation``, or ``None`` where none applies.

    The Hub accepts ``adapter``, ``merge``, ``quantized`` and ``finetune``. A
    single-model edit is ``base + scale * (finetuned - base)`` per block, a
    weight-space combination of its two inputs: with both on the Hub it is a
    ``merge`` of them, with only one it is a ``finetune`` of that one. An
    adapter merged into its base model is a ``finetune`` of that model.
    """
    if not ids:
        return None
    kind = _kind(record)
    if _is_merged_adapter(record):
        return "finetune"
    if kind == "adapter":
        return "adapter"
    if kind == "merge" or len(ids) > 1:
        return "merge"
    return "finetune"


def _compact(item: Mapping[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in item.items() if value is not None}


def lines_metadata(config: LiNeSConfig, record: Mapping[str, Any]) -> dict[str, Any]:
    """Return the ``lines`` mapping of the card's metadata.

    The mapping contains the resolved alpha and beta, gamma when set, the
    schedule name, and the non-block policy (as configured) with its value. It
    also records the stack policy, exclude patterns, output dtype, depths and
    inputs (local paths included). Merges add the method and its parameters,
    and every card gets the lines_hf version.
    """
    from . import __version__

    base, finetuned = _inputs(record)
    mapping: dict[str, Any] = {
        "kind": _kind(record),
        "alpha": record.get("alpha", config.alpha),
        "beta": record.get("beta", config.beta),
    }
    if config.gamma is not None:
        mapping["gamma"] = config.gamma
    mapping["schedule"] = "linear"
    mapping["non_block_scale"] = {"policy": config.non_block_scale, "value": record.get("non_block_scale")}
    mapping["stack_policy"] = config.stack_policy
    mapping["exclude"] = list(config.exclude)
    mapping["out_dtype"] = config.out_dtype or record.get("out_dtype")
    if config.layer_pattern is not None:
        mapping["layer_pattern"] = config.layer_pattern
    if config.num_layers is not None:
        mapping["num_layers"] = config.num_layers
    stacks = record.get("stacks") or {}
    if stacks:
        mapping["depths"] = {name: info.get("depth", len(info.get("scales", []))) for name, info in stacks.items()}

    merge = record.get("merge")
    if merge:
        mapping["merge"] = {
            **merge,
            "params": dict(merge.get("params") or {}),
            "alpha_auto": bool(merge.get("alpha_auto", config.alpha is None)),
        }
    adapter = record.get("adapter")
    if adapter:
        # Per-module scales repeat the table in the body, so the mapping leaves them out.
        mapping["adapter"] = {
            key: value for key, value in adapter.items() if key not in ("module_scales", "full_tensor_scales")
        }

    mapping["base_model"] = _compact(base)
    mapping["finetuned"] = [_compact(item) for item in finetuned]
    mapping["lines_hf_version"] = __version__
    return mapping


# --------------------------------------------------------------------------- the fine-tune's card


def load_card(source: CardSource) -> ModelCard | None:
    """Load a card from a ``ModelCard``, a README path, a folder holding one, or card text.

    A string that contains a line break or starts with ``---`` or ``#`` is card
    text; any other string is a path. Returns ``None`` for an empty text, a
    folder without ``README.md`` or a missing file (with a warning).
    """
    if isinstance(source, ModelCard):
        return source
    if isinstance(source, str) and not source.strip():
        return None
    if isinstance(source, str) and ("\n" in source or source.lstrip().startswith(("---", "#"))):
        return _parse_card(source)

    path = Path(os.fspath(source))
    if path.is_dir():
        path = path / CARD_NAME
        if not path.is_file():
            return None
    if not path.is_file():
        LOG.warning("No model card at %s: the LiNeS card will not include the fine-tuned model's card.", path)
        return None
    return _parse_card(path.read_text(encoding="utf-8"))


def _parse_card(text: str) -> ModelCard | None:
    if not text.strip():
        return None
    try:
        return ModelCard(text, ignore_metadata_errors=True)
    except ValueError as exc:
        # Broken YAML: keep the body and drop the header, since its values cannot be trusted.
        LOG.warning("Ignoring the metadata of the fine-tuned model's card: %s", exc)
        body = re.sub(r"\A---\n.*?\n---\n", "", text, count=1, flags=re.DOTALL)
        return ModelCard(body, ignore_metadata_errors=True)


def _is_lines_card(card: ModelCard) -> bool:
    return "lines" in card.data.to_dict()


def _is_unfilled_template(card: ModelCard) -> bool:
    """Return whether ``card``'s body has no line beyond huggingface_hub's default template.

    PEFT's ``save_pretrained`` writes that template, with placeholders only,
    next to every adapter. A card with any line of its own is kept.
    """
    template = {line.strip() for line in ModelCard.from_template(ModelCardData()).text.splitlines()}
    for line in card.text.splitlines():
        line = line.strip()
        if line and line not in template and not line.startswith(_PEFT_TEMPLATE_LINES):
            return False
    return True


def _merge_metadata(cards: Sequence[ModelCard]) -> tuple[dict[str, Any], list[str]]:
    """Return the kept metadata of ``cards`` and the union of their tags.

    Lists are joined. A scalar such as ``license`` is kept only when every card
    that sets it agrees, because a merge of differently licensed models needs a
    human decision.
    """
    merged: dict[str, Any] = {}
    tags: list[str] = []
    for key in KEPT_LIST_METADATA:
        values: list[Any] = []
        for card in cards:
            value = card.data.to_dict().get(key)
            for item in [value] if isinstance(value, str) else value or []:
                if item not in values:
                    values.append(item)
        if values:
            merged[key] = values
    for key in KEPT_SCALAR_METADATA:
        values = []
        for card in cards:
            value = card.data.to_dict().get(key)
            if value is not None and value not in values:
                values.append(value)
        if len(values) == 1:
            merged[key] = values[0]
        elif len(values) > 1:
            LOG.warning(
                "The fine-tuned models' cards disagree on %s (%s), so the LiNeS card leaves it unset: "
                "add it to README.md by hand.",
                key,
                ", ".join(map(str, values)),
            )
    for card in cards:
        for tag in card.data.to_dict().get("tags") or []:
            if tag not in tags:
                tags.append(tag)
    return merged, tags


# --------------------------------------------------------------------------- the body


def _number(value: Any) -> str:
    return "unknown" if value is None else format(float(value), ".6g")


def _non_block_phrase(policy: Any, value: Any) -> str:
    if policy == "alpha":
        return f"{_number(value)} (alpha, as in the LiNeS paper)"
    if policy == "keep":
        return "1 (kept at their fine-tuned values)"
    if policy == "base":
        return "0 (reset to their pre-trained values)"
    return f"{_number(value)} (a fixed value)"


def _summary_paragraph(config: LiNeSConfig, record: Mapping[str, Any]) -> str:
    kind = _kind(record)
    base, finetuned = _inputs(record)
    base_name = f"`{_label(base)}`"
    alpha, beta = _number(record.get("alpha")), _number(record.get("beta"))
    schedule = (
        "the part of the task vector in block l of a stack of L blocks was scaled by "
        f"alpha + beta * l / (L - 1), with alpha = {alpha} and beta = {beta}, so the first block gets "
        f"alpha and the last gets alpha + beta"
    )
    why = (
        "Shallow blocks stay close to the pre-trained model, which limits forgetting of general skills, "
        "while deep blocks keep most of the task-specific update."
    )
    outside = (
        "Tensors outside every block (embeddings, final norms, heads) were scaled by "
        f"{_non_block_phrase(config.non_block_scale, record.get('non_block_scale'))}."
    )
    dtype = record.get("out_dtype") or config.out_dtype
    stored = f" Output tensors are stored in {dtype}." if dtype else ""

    if kind == "merge":
        why = (
            "Shallow blocks, whose general features every task shares, stay closer to the pre-trained model "
            "than deep blocks, which reduces interference between the merged tasks."
        )
        return _merge_paragraph(config, record, base_name, schedule, f"{why} {outside}{stored}")
    source = f"`{_label(finetuned[0])}`" if finetuned else "the fine-tuned model"
    if _is_merged_adapter(record):
        dora = (record.get("adapter") or {}).get("method") == "merged task vector"
        how = (
            "Because the adapter is DoRA, whose update is not linear in B, the update was merged first and the "
            "scale applied to the merged task vector (merged minus pre-trained weights)."
            if dora
            else "The scale multiplied the adapter's B factor, which scales the update B @ A exactly, before "
            "the adapter was merged into the weights."
        )
        return (
            f"This model is {base_name} with the LoRA adapter {source} merged in after LiNeS "
            "(layer-increasing network scaling) edited it. The update that the adapter adds to a module is its "
            f"task vector: {schedule}. {how} {why} {outside}{stored}"
        )
    if kind == "adapter":
        return (
            f"This LoRA adapter for {base_name} is {source} edited after training with LiNeS "
            "(layer-increasing network scaling). The update that the adapter adds to a module is its task "
            f"vector: {schedule}. The scale multiplies the adapter's B factor, which scales the update "
            f"B @ A exactly, so the result is still a standard LoRA adapter. {why} {outside}{stored}"
        )
    return (
        f"This model is {source} edited after training with LiNeS (layer-increasing network scaling). "
        f"Its task vector is the fine-tuned weights minus those of the pre-trained model {base_name}: "
        f"{schedule}. The output is pre-trained + scale * task vector for every tensor. {why} "
        f"{outside}{stored}"
    )


def _merge_paragraph(config: LiNeSConfig, record: Mapping[str, Any], base_name: str, schedule: str, rest: str) -> str:
    merge = record.get("merge") or {}
    _, finetuned = _inputs(record)
    params = ", ".join(f"{key}={value}" for key, value in (merge.get("params") or {}).items())
    method = f"`{merge.get('method', 'unknown')}`" + (f" ({params})" if params else "")
    names = ", ".join(f"`{_label(item)}`" for item in finetuned)
    merged = (
        f"This model merges {len(finetuned)} fine-tuned models of {base_name} ({names}). Their task vectors "
        f"(fine-tuned minus pre-trained weights) were merged with {method}"
    )
    if not _uses_lines(record):
        scale = _number(merge.get("scale", record.get("alpha")))
        return (
            f"{merged}, and the merged task vector was scaled by {scale} in every tensor, without LiNeS. "
            "It is the baseline that LiNeS merges are compared against."
        )

    auto = (
        " Alpha was computed automatically as the L1 norm of the sum of the task vectors divided by "
        "T times the L1 norm of the merged task vector, where T is the number of models."
        if merge.get("alpha_auto", config.alpha is None)
        else ""
    )
    selection = merge.get("selection") or {}
    chosen = (
        f" {selection['searched'].capitalize()} was chosen on validation data by mean normalized accuracy."
        if selection.get("searched")
        else ""
    )
    return f"{merged}, and then LiNeS (layer-increasing network scaling) was applied: {schedule}.{auto}{chosen} {rest}"


def _reproduce_section(record: Mapping[str, Any]) -> list[str]:
    lines = ["## How to reproduce", ""]
    command = record.get("command")
    if command:
        command = redact_command(str(command))
        language = "bash" if command.lstrip().startswith(("lines-hf", "python -m lines_hf")) else "python"
        lines += [f"```{language}", command, "```", ""]
    else:
        lines += ["No command was recorded for this output.", ""]
    lines.append(
        f"`{CONFIG_NAME}` in this repository stores every setting of the edit; "
        f'`LiNeSConfig.from_pretrained("{CONFIG_NAME}")` loads them.'
    )
    return lines


def scale_rows(record: Mapping[str, Any]) -> list[tuple[str, int, float]]:
    """Return ``(stack, block, scale)`` for every block of every stack, in record order."""
    rows = []
    for stack, info in (record.get("stacks") or {}).items():
        for block, scale in enumerate(info.get("scales") or []):
            rows.append((stack, block, float(scale)))
    return rows


def _scale_section(config: LiNeSConfig, record: Mapping[str, Any], plot_name: str | None) -> list[str]:
    lines = ["## Scale per block", ""]
    if plot_name:
        lines += [f"![LiNeS scale against block depth]({plot_name})", ""]

    rows = scale_rows(record)
    if rows:
        lines += ["| Stack | Block | Scale |", "|---|---:|---:|"]
        lines += [f"| `{stack}` | {block} | {_number(scale)} |" for stack, block, scale in rows]
        lines.append("")
    else:
        lines += ["The record of this output lists no blocks.", ""]

    lines.append(
        "Tensors outside every block: scale "
        f"{_non_block_phrase(config.non_block_scale, record.get('non_block_scale'))}."
    )
    if config.stack_policy == "global" and len(record.get("stacks") or {}) > 1:
        lines.append(
            "The stacks share one schedule (`stack_policy: global`): blocks are numbered across stacks "
            "in forward order, encoder first."
        )
    notes = (
        ("excluded", "tensor(s) matched an exclude pattern and kept their fine-tuned values"),
        ("copied_from_finetuned_not_in_base", "tensor(s) absent from the pre-trained model were copied unchanged"),
        ("dropped_base_only", "tensor(s) of the pre-trained model absent from the fine-tune were dropped"),
        (
            "new_vocab_rows",
            "tensor(s) have more rows than in the pre-trained model (resize_token_embeddings); the shared rows "
            "were edited and the new rows copied unchanged from the fine-tune (`new_vocab_rows: finetuned`)",
        ),
        (
            "tied_in_base",
            "tensor(s) are tied to another tensor in the pre-trained model, and their task vectors were taken "
            "against that tensor",
        ),
    )
    for key, text in notes:
        names = list(record.get(key) or [])
        if names:
            shown = ", ".join(f"`{name}`" for name in names[:10])
            more = f" and {len(names) - 10} more" if len(names) > 10 else ""
            lines.append(f"{len(names)} {text}: {shown}{more}.")
    return lines


def _finetuned_sections(cards: Sequence[tuple[str | None, ModelCard]]) -> list[str]:
    lines: list[str] = []
    for name, card in cards:
        heading = f"## {FINETUNED_CARD_HEADING}" + (f" `{name}`" if len(cards) > 1 and name else "")
        source = f" `{name}`" if name else ""
        lines += [
            "",
            heading,
            "",
            f"The card of the fine-tuned model{source} follows unchanged, without its metadata header. "
            "Its results describe the model before the LiNeS edit.",
            "",
            card.text.strip(),
        ]
    return lines


def _title(record: Mapping[str, Any]) -> str:
    kind = _kind(record)
    base, finetuned = _inputs(record)
    if kind == "merge":
        method = "LiNeS merge" if _uses_lines(record) else "Merge"
        return f"{method} of {len(finetuned)} fine-tuned models of {_label(base)}"
    if _is_merged_adapter(record):
        return f"{_label(base)} with {_label(finetuned[0]) if finetuned else 'an adapter'} merged in, with LiNeS scaling"
    if kind == "adapter":
        return f"{_label(finetuned[0]) if finetuned else 'Adapter'} with LiNeS scaling"
    return f"{_label(finetuned[0]) if finetuned else 'Model'} edited with LiNeS"


def build_model_card(
    config: LiNeSConfig,
    record: Mapping[str, Any],
    finetuned_cards: Sequence[tuple[str | None, ModelCard]] = (),
    *,
    plot_name: str | None = PLOT_NAME,
) -> ModelCard:
    """Build the LiNeS model card of an output, without touching any file.

    Args:
        config: the settings of the edit.
        record: what the edit resolved (see the module docstring).
        finetuned_cards: ``(name, card)`` of each fine-tune that had a card;
            their bodies go below ours and part of their metadata (license,
            language, datasets, metrics, pipeline tag, tags) is merged in.
        plot_name: file name of the scale plot to link, or ``None`` for none.

    Returns:
        The card; ``str(card)`` is the README text.

    Raises:
        ValueError: if ``record["kind"]`` is not ``edit``, ``adapter`` or ``merge``.
    """
    kind = _kind(record)
    ids = base_model_ids(record)
    kept, inherited_tags = _merge_metadata([card for _, card in finetuned_cards])

    tags = [TAG]
    if kind == "merge":
        tags.append("merge")
    if (record.get("adapter") or {}).get("peft_type") == "LORA":
        tags.append("lora")
    for tag in inherited_tags:
        if tag not in tags:
            tags.append(tag)

    extra: dict[str, Any] = {}
    relation = base_model_relation(record, ids)
    if relation is not None:
        extra["base_model_relation"] = relation
    card_data = ModelCardData(
        base_model=ids or None,
        library_name=record.get("library_name") or ("peft" if kind == "adapter" else "transformers"),
        tags=tags,
        **kept,
        **extra,
        lines=lines_metadata(config, record),
    )

    body = [
        f"# {_title(record)}",
        "",
        _summary_paragraph(config, record),
        "",
        f"Method: Wang et al., [{PAPER_TITLE}]({PAPER_URL}), ICLR 2025.",
        "",
        *_reproduce_section(record),
        "",
        *_scale_section(config, record, plot_name),
        *_finetuned_sections(finetuned_cards),
    ]
    return ModelCard.from_template(card_data, template_str=_CARD_TEMPLATE, body="\n".join(body))


# --------------------------------------------------------------------------- files


def write_model_card(
    folder: str | os.PathLike,
    config: LiNeSConfig,
    record: Mapping[str, Any],
    finetuned_card: CardSource | Sequence[CardSource] | None = None,
    plot: ScalePlot | None = None,
) -> Path:
    """Write ``README.md`` and ``lines_scales.png`` into an output folder.

    Args:
        folder: the output folder (it must exist).
        config: the settings of the edit.
        record: what the edit resolved (see the module docstring).
        finetuned_card: the fine-tune's card as text, a README path or a
            ``ModelCard``, or one per fine-tune of a merge. When ``None``, a
            ``README.md`` already in ``folder`` (copied from the fine-tune) is
            used, unless it is a LiNeS card. A card that is only the unfilled
            template PEFT writes is skipped in either case.
        plot: a ``ScalePlot`` started earlier into ``folder``, whose result the
            card links. When ``None``, the plot is drawn here.

    Returns:
        The path of ``README.md``.

    Raises:
        OutputPathError: if ``folder`` is not an existing folder.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise OutputPathError(f"cannot write a model card into {os.fspath(folder)!r}: it is not an existing folder")
    readme = folder / CARD_NAME

    names = [_hub_id(item) or _label(item) for item in _inputs(record)[1]]
    cards: list[tuple[str | None, ModelCard]] = []
    if finetuned_card is None:
        if readme.is_file():
            card = load_card(readme)
            if card is not None and not _is_lines_card(card) and not _is_unfilled_template(card):
                cards.append((names[0] if len(names) == 1 else None, card))
    else:
        sources = [finetuned_card] if isinstance(finetuned_card, (str, os.PathLike, ModelCard)) else finetuned_card
        for index, source in enumerate(sources):
            if source is None:
                continue
            card = load_card(source)
            if card is not None and not _is_unfilled_template(card):
                cards.append((names[index] if index < len(names) else None, card))

    plot_path = plot.result() if plot is not None else draw_scales(record, folder / PLOT_NAME)
    card = build_model_card(config, record, cards, plot_name=plot_path.name if plot_path else None)
    readme.write_text(str(card), encoding="utf-8")
    LOG.info("Wrote the model card %s", readme)
    return readme

