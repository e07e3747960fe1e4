"""What the train/ tests share: three phone-book facts, a context that holds two of them, and the plain path
(each example alone, full-vocabulary logits) that the packed one is checked against."""

import torch
import torch.nn.functional as F

from loramem.examples import Example
from loramem.train.forward import supervised_logits

EXAMPLES = [
    Example("Question: What is the phone number of Ann Lee? Answer:", " 603-556-7631"),
    Example("Question: What is the phone number of Bo? Answer:", " 705-882-9365"),
    Example("Question: What is the phone number of Carla Maria Diaz? Answer:", " 212-555-0101"),
]


def plain_losses(model, tokenizer, encoded, loss_on="answer"):
    """Reference: each example alone, full-vocabulary logits at every position, per-example mean loss."""
    out = []
    for e in encoded:
        ids = torch.tensor([e.ids])
        logits = model(input_ids=ids).logits[0, :-1]
        targets = ids[0, 1:].clone()
        first = e.n_prompt if loss_on == "answer" else 1
        targets[: first - 1] = -100
        out.append(F.cross_entropy(logits, targets, reduction="sum"))
    return torch.stack(out)


def packed_losses(model, batch):
    logits = supervised_logits(model, batch)
    per_token = F.cross_entropy(logits, batch.labels, reduction="none")
    return torch.zeros(batch.n_examples).index_add_(0, batch.label_example, per_token)


CONTEXT = "Ann Lee can be reached at 603-556-7631. Bo answers at 705-882-9365."
