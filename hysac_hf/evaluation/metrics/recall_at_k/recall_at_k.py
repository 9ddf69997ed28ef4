"""Recall@K as an `evaluate` metric module, loadable offline: `evaluate.load("<path>/recall_at_k")`.

Inputs per query: `predictions`, the pool indices ranked best first (at least max(k) of them), and
`references`, the index of the query's single ground-truth item. R@K is the percentage of queries whose
ground truth is among the first K predictions. Ties must be resolved by whoever ranked the pool; hysac-hf's
retrieval ranks pessimistically (an item tied with the target counts as ranked above it).
"""

from __future__ import annotations

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Recall@K (in %) of single-target retrieval from ranked candidate lists."
_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `int`): per query, pool indices ranked best first.
    references (`list` of `int`): per query, the index of the ground-truth item.
    k (`list` of `int`, defaults to `[1, 5, 10, 20]`): recall levels; each must be <= the length of every ranking.
Returns:
    `{"R@1": float, "R@5": float, ...}` in percent.
Examples:
    >>> metric = evaluate.load("hysac_hf/evaluation/metrics/recall_at_k")
    >>> metric.compute(predictions=[[3, 1, 2], [0, 2, 1]], references=[1, 1], k=[1, 2, 3])
    {'R@1': 0.0, 'R@2': 50.0, 'R@3': 100.0}
"""
_CITATION = """
@inproceedings{poppi2025hyperbolic,
  title={Hyperbolic Safety-Aware Vision-Language Models},
  author={Poppi, Tobia and Kasarla, Tejaswi and Mettes, Pascal and Baraldi, Lorenzo and Cucchiara, Rita},
  booktitle={CVPR},
  year={2025}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class RecallAtK(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("int64")), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, k=(1, 5, 10, 20)):
        ks = sorted({int(x) for x in k})
        if not ks or ks[0] < 1:
            raise ValueError(f"k must hold positive integers, got {list(k)}")
        if len(predictions) == 0:
            raise ValueError("no queries given")
        shortest = min(len(p) for p in predictions)
        if shortest < ks[-1]:
            raise ValueError(
                f"a ranking has only {shortest} entries but R@{ks[-1]} was asked; pass at least max(k) ranked indices per query"
            )
        import torch

        from hysac_hf.evaluation.retrieval import recall_from_ranks  # the library's one recall implementation

        ranked = np.asarray([list(p[: ks[-1]]) for p in predictions], dtype=np.int64)
        hit_at = ranked == np.asarray(references, dtype=np.int64)[:, None]  # (Q, max k)
        ranks = np.where(hit_at.any(axis=1), hit_at.argmax(axis=1), ks[-1])  # position of the target, or "beyond"
        return recall_from_ranks(torch.from_numpy(ranks), ks)
