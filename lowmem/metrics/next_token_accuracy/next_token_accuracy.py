"""Next-token accuracy of a causal language model: the share of evaluated tokens whose target
is the model's top-1 prediction.

An `evaluate` metric module, loaded by path (`lowmem.heldout.load_metric`): nothing is fetched
from a hub. Inputs: `predictions`, one 0/1 per evaluated token (1 when the target's logit is
the largest; a tie counts as a hit). Output: `accuracy` and `tokens`.
"""

import datasets
import evaluate


class NextTokenAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__,
            citation="",
            features=datasets.Features({"predictions": datasets.Value("int8")}),
        )

    def _compute(self, predictions):
        if not len(predictions):
            raise ValueError("next_token_accuracy needs at least one token")
        return {"accuracy": sum(predictions) / len(predictions), "tokens": len(predictions)}
