"""Held-out loss and perplexity of a causal language model from its per-token log-probabilities.

An `evaluate` metric module, loaded by path (`lowmem.heldout.load_metric`): nothing is fetched
from a hub. Inputs: `predictions`, the model's log p(target) of each evaluated token (natural
log, exact softmax over the whole vocabulary). Outputs: `loss`, the mean negative
log-likelihood in nats per token, and `perplexity` = exp(loss); `tokens`, how many were
evaluated.
"""

import math

import datasets
import evaluate


class HeldoutLoss(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__,
            citation="",
            features=datasets.Features({"predictions": datasets.Value("float64")}),
        )

    def _compute(self, predictions):
        if not len(predictions):
            raise ValueError("heldout_loss needs at least one token's log-probability")
        loss = -math.fsum(predictions) / len(predictions)
        return {"loss": loss, "perplexity": math.exp(loss), "tokens": len(predictions)}
