"""Teacher-forced scoring: recall and the exact check."""

from loramem.config import LoraSpec
from loramem.train.adapters import attached
from loramem.train.forward import supervised_logits
from loramem.train.pack import encode, pack
from loramem.train.score import examples_recalled, exact_check, recall
from train_reference import EXAMPLES

def test_recall_zero_for_untrained_adapter(tiny):
    encoded = encode(tiny.tokenizer, EXAMPLES)
    with attached(tiny.model, LoraSpec(rank=2, layers="all")) as model:
        assert recall(model, tiny.tokenizer, encoded) == 0.0
        batch = pack(encoded)
        assert not examples_recalled(supervised_logits(model, batch), batch).any()


def test_exact_check_names_the_wrong_examples_and_the_tokens_that_beat_answers(tiny):
    encoded = encode(tiny.tokenizer, EXAMPLES)
    with attached(tiny.model, LoraSpec(rank=2, layers="all")) as model:
        recalled, intruders = exact_check(model, tiny.tokenizer, encoded)
        batch = pack(encoded)
        predicted = supervised_logits(model, batch).argmax(-1)
    wrong = (predicted != batch.labels) & batch.label_is_recalled  # the answers and their EOS
    assert recalled.tolist() == [False] * len(EXAMPLES)
    assert intruders == set(predicted[wrong].tolist()) and intruders
