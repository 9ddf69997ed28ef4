"""The HySAC model card: metadata as `huggingface_hub.ModelCardData`, body from `model_cards/hysac.md.j2`.

The paper's numbers (arXiv 2503.12127v1, Tables 1, 2 and 5, HySAC rows) become `model-index` eval results, each
attributed to the paper through `source_name`/`source_url`; they were not re-measured on the converted weights.
Rendering is local; only pushing touches the Hub.
"""

from __future__ import annotations

import importlib.resources
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .modeling.configuration_hysac import CONTENT_KINDS

logger = logging.getLogger(__name__)

PAPER_URL = "https://arxiv.org/abs/2503.12127"
PAPER_TITLE = "Hyperbolic Safety-Aware Vision-Language Models"
AUTHORS_REPO = "aimagelab/HySAC"
BASE_MODEL = "openai/clip-vit-large-patch14"
DATASET = "aimagelab/ViSU-Text"
LICENSE = "cc-by-nc-4.0"
TAGS = ["clip", "hyperbolic", "lorentz", "safety", "nsfw", "vision-language", "hysac", "custom_code"]
UNSAFE_CATEGORIES = ("hate", "harassment", "violence", "self-harm", "sexual", "shocking", "illegal activities")
# model_cards/ is installed as hysac_hf.model_cards (pyproject package-dir), in checkouts and wheels alike.
TEMPLATE_PATH = Path(str(importlib.resources.files("hysac_hf.model_cards") / "hysac.md.j2"))

CITATION = """@inproceedings{poppi2025hyperbolic,
  title     = {Hyperbolic Safety-Aware Vision-Language Models},
  author    = {Poppi, Tobia and Kasarla, Tejaswi and Mettes, Pascal and Baraldi, Lorenzo and Cucchiara, Rita},
  booktitle = {Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year      = {2025}
}"""


@dataclass(frozen=True)
class PaperResult:
    """One number from the paper: table, task column, metric, value in %."""

    table: int
    task: str
    description: str
    metric: str
    value: float
    dataset_id: str
    dataset_name: str
    task_type: str


RECALLS = ("R@1", "R@10", "R@20")
# The model-index groups results by (task type, dataset, config): each retrieval protocol is its own config.
PROTOCOL_SLUGS = {
    "T→I": "safe-text-to-safe-image",
    "I→T": "safe-image-to-safe-text",
    "T*→I∪I*": "unsafe-text-to-safe-image-mixed-pool",
    "I*→T∪T*": "unsafe-image-to-safe-text-mixed-pool",
    "T*→I*": "unsafe-text-to-unsafe-image",
    "I*→T*": "unsafe-image-to-unsafe-text",
    "T*→I*∪I": "unsafe-text-to-unsafe-image-mixed-pool",
    "I*→T*∪T": "unsafe-image-to-unsafe-text-mixed-pool",
}
# Table 1: safe content retrieval on the ViSU test set (unsafe queries are first moved by the safety traversal).
TABLE_1 = {
    "T→I": ("safe text → safe images", (49.8, 84.1, 90.7)),
    "I→T": ("safe image → safe texts", (48.2, 84.2, 91.2)),
    "T*→I∪I*": ("unsafe text → safe ∪ unsafe images, hit = paired safe image", (30.5, 62.8, 71.8)),
    "I*→T∪T*": ("unsafe image → safe ∪ unsafe texts, hit = paired safe text", (42.1, 73.3, 79.8)),
}
# Table 2: unsafe content retrieval on the ViSU test set.
TABLE_2 = {
    "T*→I*": ("unsafe text → unsafe images", (81.4, 98.4, 99.4)),
    "I*→T*": ("unsafe image → unsafe texts", (82.2, 97.8, 99.2)),
    "T*→I*∪I": ("unsafe text → unsafe ∪ safe images, hit = paired unsafe image", (81.1, 98.4, 99.4)),
    "I*→T*∪T": ("unsafe image → unsafe ∪ safe texts, hit = paired unsafe text", (80.5, 97.2, 98.9)),
}
# Table 5: NSFW image classification (thresholds 0.52 on NudeNet, 0.53 on Mixed NSFW per Table 6).
TABLE_5 = {
    "NudeNet": {"accuracy": 99.5, "false positive rate": 0.0, "false negative rate": 0.5},
    "Mixed NSFW": {"accuracy": 78.9, "false positive rate": 16.5, "false negative rate": 6.8},
}


def paper_results() -> list[PaperResult]:
    """The HySAC rows of Tables 1, 2 and 5 of the paper (arXiv v1), number for number."""
    results = []
    for table, rows in ((1, TABLE_1), (2, TABLE_2)):
        for task, (description, values) in rows.items():
            for metric, value in zip(RECALLS, values):
                results.append(
                    PaperResult(
                        table, task, description, metric, value, DATASET, "ViSU test set", "image-text-retrieval"
                    )
                )
    for dataset, metrics in TABLE_5.items():
        dataset_id = dataset.lower().replace(" ", "-")
        for metric, value in metrics.items():
            results.append(
                PaperResult(
                    5,
                    "NSFW classification",
                    f"unsafe-image classification on {dataset}",
                    metric,
                    value,
                    dataset_id,
                    dataset,
                    "image-classification",
                )
            )
    return results


def eval_results() -> list[Any]:
    """`EvalResult`s for the model-index, each attributed to the paper's table (`source_name`, `source_url`)."""
    from huggingface_hub import EvalResult

    metric_types = {
        "R@1": "recall_at_1",
        "R@10": "recall_at_10",
        "R@20": "recall_at_20",
        "accuracy": "accuracy",
        "false positive rate": "false_positive_rate",
        "false negative rate": "false_negative_rate",
    }
    return [
        EvalResult(
            task_type=r.task_type,
            task_name=f"{r.task} (Table {r.table})",
            dataset_type=r.dataset_id,
            dataset_name=r.dataset_name,
            dataset_config=PROTOCOL_SLUGS.get(r.task),
            dataset_split="test",
            metric_type=metric_types[r.metric],
            metric_name=f"{r.task} {r.metric} (%)" if r.table in (1, 2) else f"{r.metric} (%)",
            metric_value=r.value,
            verified=False,
            source_name=f"{PAPER_TITLE} (Poppi et al., CVPR 2025), Table {r.table}",
            source_url=PAPER_URL,
        )
        for r in paper_results()
    ]


def card_data(model_name: str = "HySAC", base_model: str = BASE_MODEL):
    """The card's YAML metadata."""
    from huggingface_hub import ModelCardData

    return ModelCardData(
        model_name=model_name,
        license=LICENSE,
        base_model=base_model,
        datasets=[DATASET],
        language=["en"],
        library_name="transformers",
        pipeline_tag="zero-shot-image-classification",
        tags=list(TAGS),
        eval_results=eval_results(),
    )


def _grouped(results: list[PaperResult], table: int) -> list[dict[str, Any]]:
    """Rows of one table for the card body: `{"task", "description", "dataset", "values": {metric: value}}`."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for r in results:
        if r.table == table:
            key = (r.task, r.dataset_name)
            rows.setdefault(
                key, {"task": r.task, "description": r.description, "dataset": r.dataset_name, "values": {}}
            )
            rows[key]["values"][r.metric] = r.value
    return list(rows.values())


def render_model_card(
    repo_id: str = "your-org/hysac",
    bounds: dict[str, dict[str, float]] | None = None,
    curvature: float | None = None,
    base_model: str = BASE_MODEL,
    source: str = AUTHORS_REPO,
    dtype: str = "float32",
    max_abs_diff: float | None = None,
    template_path: str | Path | None = None,
):
    """Render the card for a converted model.

    Args:
        repo_id: where the model will live (used in the usage snippets).
        bounds: `config.bounds` of the converted model (shown in a table).
        curvature: learned curvature magnitude `c` (shown).
        base_model: the base CLIP.
        source: where the original checkpoint came from.
        dtype: the saved weight dtype.
        max_abs_diff: the `--verify` result (max abs embedding difference vs the authors' model), if run.
        template_path: defaults to `model_cards/hysac.md.j2` of this repository.
    Returns:
        `huggingface_hub.ModelCard`.
    """
    from huggingface_hub import ModelCard

    template_path = Path(template_path or TEMPLATE_PATH)
    if not template_path.is_file():
        raise FileNotFoundError(
            f"model card template {str(template_path)!r} not found; run from a checkout of hysac-hf or pass "
            "template_path="
        )
    results = paper_results()
    return ModelCard.from_template(
        card_data(base_model=base_model),
        template_path=str(template_path),
        repo_id=repo_id,
        base_model=base_model,
        bounds=bounds,
        bound_names={k.key: k.name for k in CONTENT_KINDS},
        curvature=curvature,
        source=source,
        dtype=dtype,
        max_abs_diff=max_abs_diff,
        categories=UNSAFE_CATEGORIES,
        table_1=_grouped(results, 1),
        table_2=_grouped(results, 2),
        table_5=_grouped(results, 5),
        recalls=RECALLS,
        paper_url=PAPER_URL,
        citation=CITATION,
    )


# Validation metrics of a training run (`hysac_hf.training.validation_metrics`) shown in its card.
RUN_METRICS = {
    "R1_t2i_S_V": "T→I",
    "R1_i2t_S_V": "I→T",
    "R1_t2i_S_G": "T→I*",
    "R1_i2t_S_G": "I*→T",
    "R1_t2i_U_V": "T*→I",
    "R1_i2t_U_V": "I→T*",
}
# Settings of a training run listed in its card (the rest are bookkeeping).
RUN_SETTINGS = (
    "dataset",
    "train_split",
    "validation_split",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "num_train_epochs",
    "max_train_steps",
    "learning_rate",
    "lr_scheduler_type",
    "num_warmup_steps",
    "weight_decay",
    "entailment_weight",
    "aperture_scale",
    "loss_weighting",
    "local_negatives",
    "contrastive",
    "full_finetune",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "mixed_precision",
    "seed",
    "select_best",
)


def render_training_card(
    repo_id: str,
    base_model: str,
    dataset: str,
    settings: dict[str, Any],
    summary: dict[str, Any],
    bounds: dict[str, dict[str, float]] | None = None,
    curvature: float | None = None,
    histogram: str | None = None,
    template_path: str | Path | None = None,
    load_from: str | None = None,
    embed_dim: int | None = None,
    base_family: str = "CLIP",
    base_checkpoint: str | None = None,
    fixed_text_length: int | None = None,
    contrastive: str = "softmax",
):
    """Render the card of a model trained with `train.py`: base model, data, settings, bounds, validation metrics,
    and how well the calibrated unsafe thresholds separate the validation rows.

    Args:
        repo_id: the model's name (its Hub repo when pushed).
        load_from: what the usage snippets load (the Hub repo, or the exported folder); default `repo_id`.
        embed_dim: the embedding dimension the snippets show.
        base_model: `--model_name_or_path` of the run.
        base_family: the display name of the dual-encoder family of the towers (`BaseFamily.name`: "CLIP", "SigLIP",
            ...), in the title, the description and the tags.
        base_checkpoint: the dual encoder the towers came from (`config.base_model_name_or_path`), named when it is not
            `base_model` (a run that continued a HySAC checkpoint); the card's `base_model` metadata when
            `base_model` is not a Hub id.
        fixed_text_length: the SigLIP families' text length (`config.fixed_text_length`): the zero-shot snippet pads
            to it.
        contrastive: the run's contrastive loss, `"softmax"` or `"sigmoid"`.
        dataset: `--dataset` of the run.
        settings: the run's settings (`TrainingConfig` as a dict).
        summary: the run summary (`global_step`, `history` of validation metrics, `best_epoch`, `data` (where the
            rows came from), `unsafe_thresholds`, `unsafe_threshold_quality`).
        bounds: the calibrated `config.bounds`.
        curvature: the learned curvature magnitude.
        histogram: file name of the distance histogram inside the folder (embedded in the card).
    Returns:
        `huggingface_hub.ModelCard`; the model-index holds the selected epoch's validation R@1 values.
    """
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    from .conversion_utils import is_hub_repo_id

    history = summary.get("history") or []
    chosen = next(
        (row for row in history if row.get("epoch") == summary.get("best_epoch")), history[-1] if history else None
    )
    on_hub = lambda name: isinstance(name, str) and not Path(name).exists() and is_hub_repo_id(name)
    results = [
        EvalResult(
            task_type="image-text-retrieval",
            task_name=f"{label} retrieval",
            dataset_type=dataset if on_hub(dataset) else "custom",
            dataset_name=f"{Path(dataset).name} ({settings.get('validation_split')} split)",
            dataset_split=str(settings.get("validation_split")),
            metric_type="recall_at_1",
            metric_name=f"{label} R@1 (%)",
            metric_value=round(float(chosen[key]), 2),
        )
        for key, label in RUN_METRICS.items()
        if chosen is not None and key in chosen
    ]
    hub_base = base_model if on_hub(base_model) else base_checkpoint if on_hub(base_checkpoint) else None
    family_tag = base_family.split(" (")[0].lower().replace(" ", "")  # "SigLIP 2 (NaFlex)" -> "siglip2"
    data = ModelCardData(
        model_name=Path(repo_id).name,
        base_model=hub_base,
        datasets=[dataset] if on_hub(dataset) else None,
        library_name="transformers",
        pipeline_tag="zero-shot-image-classification",
        tags=[family_tag if tag == "clip" else tag for tag in TAGS],
        eval_results=results or None,
    )
    template_path = Path(template_path or TEMPLATE_PATH)
    return ModelCard.from_template(
        data,
        template_path=str(template_path),
        trained=True,
        repo_id=repo_id,
        load_from=load_from or repo_id,
        embed_dim=embed_dim,
        data=summary.get("data") or {},
        threshold_quality=summary.get("unsafe_threshold_quality"),
        base_model=base_model,
        base_family=base_family,
        base_checkpoint=base_checkpoint,
        fixed_text_length=fixed_text_length,
        contrastive=contrastive,
        dataset=dataset,
        settings=settings,
        setting_keys=[k for k in RUN_SETTINGS if k in settings],
        summary={
            "global_step": summary.get("global_step"),
            "best_epoch": summary.get("best_epoch"),
            "history": history,
        },
        metric_keys=list(RUN_METRICS),
        metric_names=list(RUN_METRICS.values()),
        bounds=bounds,
        unsafe_thresholds=summary.get("unsafe_thresholds"),
        bound_names={k.key: k.name for k in CONTENT_KINDS},
        curvature=curvature,
        histogram=histogram,
        categories=UNSAFE_CATEGORIES,
        citation=CITATION,
    )


__all__ = [
    "CITATION",
    "UNSAFE_CATEGORIES",
    "card_data",
    "eval_results",
    "paper_results",
    "render_model_card",
    "render_training_card",
]
