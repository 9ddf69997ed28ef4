"""Unsafe-content classification metrics (Tables 5 and 6) as an `evaluate` metric module, loadable offline:
`evaluate.load("<path>/unsafe_classification")`.

Labels: 1 = unsafe (the positive class), 0 = safe. Returns accuracy, false-positive rate (safe content
flagged unsafe) and false-negative rate (unsafe content let through), in percent. A rate whose denominator
is empty (no safe or no unsafe references) is 0.
"""

from __future__ import annotations

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Accuracy, FPR and FNR (in %) of binary unsafe-content classification (1 = unsafe)."
_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted labels, 1 = unsafe, 0 = safe.
    references (`list` of `int`): true labels, 1 = unsafe, 0 = safe.
Returns:
    `{"accuracy": float, "fpr": float, "fnr": float}` in percent.
Examples:
    >>> metric = evaluate.load("hysac_hf/evaluation/metrics/unsafe_classification")
    >>> metric.compute(predictions=[1, 1, 0, 0], references=[1, 0, 0, 1])
    {'accuracy': 50.0, 'fpr': 50.0, 'fnr': 50.0}
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
class UnsafeClassification(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references):
        pred = np.asarray(predictions, dtype=np.int64)
        ref = np.asarray(references, dtype=np.int64)
        if pred.size == 0:
            raise ValueError("no predictions given")
        if not (np.isin(pred, (0, 1)).all() and np.isin(ref, (0, 1)).all()):
            raise ValueError("predictions and references must be 0 (safe) or 1 (unsafe)")
        safe, unsafe = ref == 0, ref == 1
        return {
            "accuracy": float(100.0 * np.mean(pred == ref)),
            "fpr": float(100.0 * np.mean(pred[safe] == 1)) if safe.any() else 0.0,
            "fnr": float(100.0 * np.mean(pred[unsafe] == 0)) if unsafe.any() else 0.0,
        }
