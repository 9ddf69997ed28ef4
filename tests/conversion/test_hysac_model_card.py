"""The model card: metadata parses back offline, and the model-index holds the paper's Tables 1, 2 and 5."""

from __future__ import annotations

import pytest
from huggingface_hub import ModelCard

from hysac_hf.model_card import render_model_card

# HySAC rows of the paper (arXiv 2503.12127v1), typed in from docs/method.md §7.7, independently of the module.
PAPER_TABLES = {
    1: {
        "safe-text-to-safe-image": (49.8, 84.1, 90.7),
        "safe-image-to-safe-text": (48.2, 84.2, 91.2),
        "unsafe-text-to-safe-image-mixed-pool": (30.5, 62.8, 71.8),
        "unsafe-image-to-safe-text-mixed-pool": (42.1, 73.3, 79.8),
    },
    2: {
        "unsafe-text-to-unsafe-image": (81.4, 98.4, 99.4),
        "unsafe-image-to-unsafe-text": (82.2, 97.8, 99.2),
        "unsafe-text-to-unsafe-image-mixed-pool": (81.1, 98.4, 99.4),
        "unsafe-image-to-unsafe-text-mixed-pool": (80.5, 97.2, 98.9),
    },
}
TABLE_5 = {"NudeNet": (99.5, 0.0, 0.5), "Mixed NSFW": (78.9, 16.5, 6.8)}
BOUNDS = {
    "S": {"avg": 0.31, "up_95": 0.47, "low_05": 0.17},
    "V": {"avg": 0.52, "up_95": 0.73, "low_05": 0.41},
    "U": {"avg": 0.83, "up_95": 0.97, "low_05": 0.61},
    "G": {"avg": 1.04, "up_95": 1.23, "low_05": 0.89},
}


@pytest.fixture(scope="module")
def card_text():
    return str(render_model_card(repo_id="org/hysac", bounds=BOUNDS, curvature=1.234, max_abs_diff=3e-7))


def test_metadata_parses_back(card_text):
    data = ModelCard(card_text).data
    assert data.license == "cc-by-nc-4.0"
    assert data.base_model == "openai/clip-vit-large-patch14"
    assert data.datasets == ["aimagelab/ViSU-Text"]
    assert data.pipeline_tag == "zero-shot-image-classification"
    assert data.library_name == "transformers"
    assert {"clip", "hyperbolic", "safety", "custom_code"} <= set(data.tags)
    assert data.model_name == "HySAC"


def test_eval_results_are_the_paper_tables(card_text):
    results = ModelCard(card_text).data.eval_results
    assert len(results) == 3 * 4 * 2 + 3 * 2
    found = {}
    for result in results:
        assert result.source_url == "https://arxiv.org/abs/2503.12127" and result.verified is False
        table = int(result.source_name.rsplit("Table ", 1)[1])
        if table in (1, 2):
            assert result.dataset_type == "aimagelab/ViSU-Text" and result.dataset_split == "test"
            k = {"recall_at_1": 0, "recall_at_10": 1, "recall_at_20": 2}[result.metric_type]
            found[(table, result.dataset_config, k)] = result.metric_value
        else:
            assert table == 5 and result.task_type == "image-classification"
            k = {"accuracy": 0, "false_positive_rate": 1, "false_negative_rate": 2}[result.metric_type]
            found[(5, result.dataset_name, k)] = result.metric_value
    expected = {
        (t, config, k): v
        for t, rows in PAPER_TABLES.items()
        for config, vals in rows.items()
        for k, v in enumerate(vals)
    }
    expected.update({(5, name, k): v for name, vals in TABLE_5.items() for k, v in enumerate(vals)})
    assert found == expected


def test_body_sections(card_text):
    body = ModelCard(card_text).text
    for needle in (
        "Content warning",
        "trust_remote_code=True",
        'AutoModel.from_pretrained("org/hysac"',
        'pipeline("zero-shot-image-classification"',
        "traverse_to_safe",
        "classify_unsafe",
        "Out-of-scope",
        "Limitations",
        "@inproceedings{poppi2025hyperbolic",
        "c = 1.2340",
        "3.0e-07",
        "| `V` | safe image | 0.5200 | 0.4100 | 0.7300 |",
    ):
        assert needle in body, needle
    categories = "hate, harassment, violence, self-harm, sexual, shocking, illegal activities"
    assert categories in body
    # The body's tables show the same numbers as the metadata.
    assert "| T*→I∪I* | unsafe text → safe ∪ unsafe images, hit = paired safe image | 30.5 | 62.8 | 71.8 |" in body
    assert "| Mixed NSFW | 78.9 | 16.5 | 6.8 |" in body


def test_card_without_bounds_or_verification(tmp_path):
    body = ModelCard(str(render_model_card())).text
    assert "differ by at most" not in body and "| `S` |" not in body
    with pytest.raises(FileNotFoundError, match="template"):
        render_model_card(template_path=tmp_path / "missing.md.j2")
