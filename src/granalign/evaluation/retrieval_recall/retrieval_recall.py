"""`evaluate` metric: bidirectional image-text retrieval recall (R@1/5/10, rSum, median/mean rank).

Load it offline with `evaluate.load(granalign.evaluation.RETRIEVAL_METRIC_PATH)`. One example = one
image: its row of scores against every caption, and the caption columns that belong to it.
"""

from __future__ import annotations

import datasets
import evaluate
import numpy as np

from granalign.evaluation.metrics import retrieval_metrics, text_to_image_from_caption_ids

__all__ = ["RetrievalRecall"]

_DESCRIPTION = """\
Bidirectional retrieval metrics from an image-text score matrix (higher = more similar): image->text
R@1/5/10 (an image is correct at K if ANY of its captions is in the top K), text->image R@1/5/10 (per
caption), rsum (sum of the six, percent), and the median/mean 1-based rank of the best positive.
Ties with negatives count pessimistically: a constant score matrix gives R@1 = 0.
"""

_KWARGS_DESCRIPTION = """\
Args:
    predictions: one score row per image, `[N_img][N_txt]` floats (all rows the same length N_txt).
    references: for each image, the caption columns (ints in [0, N_txt)) that belong to it; every
        column must belong to exactly one image, and every image needs at least one caption.
Returns:
    dict with i2t_r1, i2t_r5, i2t_r10, t2i_r1, t2i_r5, t2i_r10, rsum, i2t_medr, i2t_meanr, t2i_medr,
    t2i_meanr (floats), identical to `granalign.evaluation.retrieval_metrics`.
Example:
    >>> metric = evaluate.load(granalign.evaluation.RETRIEVAL_METRIC_PATH)
    >>> metric.compute(predictions=[[0.9, 0.1, 0.2], [0.3, 0.8, 0.7]], references=[[0], [1, 2]])["rsum"]
    600.0
"""

_CITATION = """\
@inproceedings{faghri2018vse,
  title={VSE++: Improving Visual-Semantic Embeddings with Hard Negatives},
  author={Faghri, Fartash and Fleet, David J and Kiros, Jamie Ryan and Fidler, Sanja},
  booktitle={BMVC},
  year={2018}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class RetrievalRecall(evaluate.Metric):
    """Image-text retrieval recall over a score matrix given one image row per example."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("float64")),
                    "references": datasets.Sequence(datasets.Value("int64")),
                }
            ),
        )

    def _compute(self, predictions: list[list[float]], references: list[list[int]]) -> dict[str, float]:
        """Scores `[N_img][N_txt]` and per-image caption columns -> `retrieval_metrics` dict."""
        if not predictions:
            raise ValueError("predictions is empty; expected one score row per image")
        lengths = {len(row) for row in predictions}
        if len(lengths) != 1:
            raise ValueError(
                "every prediction row must score all captions (the same length N_txt), got row lengths "
                f"{sorted(lengths)}"
            )
        scores = np.asarray(predictions, dtype=np.float64)  # [N_img, N_txt]
        text_to_image = text_to_image_from_caption_ids(references, num_texts=scores.shape[1])
        return retrieval_metrics(scores, text_to_image)
