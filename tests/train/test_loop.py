"""The training loop: early stopping, the candidate softmax, the schedule."""

import pytest
import torch
import torch.nn.functional as F

from loramem.config import LoraSpec, TrainSpec
from loramem.errors import LoramemError
from loramem.train import loop
from loramem.train.adapters import attached
from loramem.train.forward import supervised_logits
from loramem.train.loop import StopRule, _loss, _schedule, candidate_vocab, train
from loramem.train.pack import encode, pack
from loramem.train.score import examples_recalled, recall
from sample_facts import LINEAR_TO_ZERO
from train_reference import EXAMPLES

def test_recalled_means_greedy_generation_reproduces_answer(tiny):
    encoded = encode(tiny.tokenizer, EXAMPLES[:2])
    with attached(tiny.model, LoraSpec(rank=8, layers="all")) as model:
        stats = train(model, tiny.tokenizer, EXAMPLES[:2], TrainSpec(lr=1e-2, epochs=60, batch_size=2, **LINEAR_TO_ZERO),
                      progress=False)
        assert stats.recall == 1.0 and stats.epochs < 60  # stopped early at the target
        for ex, e in zip(EXAMPLES[:2], encoded):
            ids = torch.tensor([e.ids[: e.n_prompt]])
            out = model.generate(input_ids=ids, max_new_tokens=e.n_answer, do_sample=False)
            assert tiny.tokenizer.decode(out[0, e.n_prompt :]) == ex.answer


def test_exact_check_runs_when_the_lagging_training_pass_would_reach_the_target_next_epoch(tiny, caplog):
    """The training pass recalled 0 then 1 of 2: one more epoch at that pace reaches the target, so the exact
    check runs then instead of an epoch later."""
    with attached(tiny.model, LoraSpec(rank=8, layers="all")) as model, caplog.at_level("INFO", logger="loramem"):
        train(model, tiny.tokenizer, EXAMPLES[:2], TrainSpec(lr=1e-2, epochs=60, batch_size=2), progress=False)
    messages = [r.getMessage() for r in caplog.records]
    first = next(i for i, m in enumerate(messages) if m.startswith("exact check"))
    assert "recalled in the training pass 1/2" in messages[first - 1]
    assert "recalled in the training pass 0/2" in messages[first - 2]


def test_no_examples_is_an_error(tiny):
    with attached(tiny.model, LoraSpec(rank=2, layers="all")) as model, pytest.raises(LoramemError, match="no training examples"):
        train(model, tiny.tokenizer, [], TrainSpec())


def test_candidate_softmax_is_the_full_softmax_restricted_to_the_candidates(tiny):
    encoded = encode(tiny.tokenizer, EXAMPLES)
    batch, spec = pack(encoded), TrainSpec()
    with attached(tiny.model, LoraSpec(rank=2, layers="all")) as model, torch.no_grad():
        full = supervised_logits(model, batch)
        everything = torch.arange(full.shape[-1])
        torch.testing.assert_close(_loss(model, batch, encoded, spec, everything)[0], _loss(model, batch, encoded, spec)[0])
        vocab = torch.unique(torch.cat([batch.labels, torch.tensor([3, 5, 7])]))
        loss, logits = _loss(model, batch, encoded, spec, vocab)
        torch.testing.assert_close(logits, full[:, vocab])
        torch.testing.assert_close(loss, F.cross_entropy(full[:, vocab], torch.searchsorted(vocab, batch.labels)))
        # recall read through the candidates maps their argmax back to token ids
        assert torch.equal(examples_recalled(logits, batch, vocab),
                           examples_recalled(full.masked_fill(~torch.isin(everything, vocab), -1e9), batch))


def test_candidate_vocab_holds_every_label_and_the_models_top_k(tiny):
    encoded = encode(tiny.tokenizer, EXAMPLES)
    with attached(tiny.model, LoraSpec(rank=2, layers="all")) as model:
        vocab = candidate_vocab(model, tiny.tokenizer, encoded, top_k=3)
        batch = pack(encoded)
        top = supervised_logits(model, batch).topk(3, -1).indices
    assert torch.equal(vocab, torch.unique(torch.cat([batch.labels, top.flatten()])))
    assert torch.isin(batch.labels, vocab).all() and torch.isin(top, vocab).all()


def test_candidate_training_stops_only_when_the_whole_vocabulary_agrees(tiny, monkeypatch, caplog):
    """Candidates of only the label tokens, and a planted rival outside them: the digit 5's output row plus an
    offset along the model's hidden state where 5 is the answer, so the rival rises with 5 and wins. The exact
    check must find it, train against it, and report recall over every token."""
    def labels_only(model, tokenizer, encoded, top_k, loss_on="answer"):
        return torch.unique(pack(encoded, loss_on).labels)

    monkeypatch.setattr(loop, "candidate_vocab", labels_only)
    encoded = encode(tiny.tokenizer, EXAMPLES[:2])
    labels = labels_only(None, None, encoded, 1)
    five = tiny.tokenizer("5", add_special_tokens=False).input_ids[0]
    rival = next(t for t in range(100, 1000) if t not in labels and all(t not in e.ids for e in encoded))
    head = tiny.model.get_output_embeddings().weight
    kept = head[rival].clone()
    with torch.no_grad():
        seen = []
        hook = tiny.model.get_output_embeddings().register_forward_hook(lambda m, args, out: seen.append(args[0]))
        batch = pack(encoded)
        supervised_logits(tiny.model, batch)
        hook.remove()
        offset = seen[0][batch.labels == five].mean(0)
        head[rival] = head[five] + 0.3 * head[five].norm() * offset / offset.norm()
    try:
        with attached(tiny.model, LoraSpec(rank=8, layers="all")) as model, caplog.at_level("INFO", logger="loramem"):
            stats = train(model, tiny.tokenizer, EXAMPLES[:2], TrainSpec(lr=1e-2, epochs=60, batch_size=2, candidates=1),
                          progress=False)
            exact = recall(model, tiny.tokenizer, encoded)
    finally:
        with torch.no_grad():
            head[rival] = kept
    assert stats.recall == exact == 1.0
    assert stats.softmax_tokens > len(labels)  # the check added what beat an answer
    messages = [r.getMessage() for r in caplog.records]
    found = next(i for i, m in enumerate(messages) if "beating answers" in m)
    assert "training pass 1/2" in [m for m in messages[:found] if m.startswith("epoch")][-1]  # found at half the target


def test_schedule_decays_over_decay_epochs_then_holds_at_the_floor():
    held = _schedule(TrainSpec(lr_floor=0.1, decay_epochs=2, epochs=5), total_steps=50, steps_per_epoch=10)
    assert held(0) == 1.0 and held(10) == pytest.approx(0.55) and held(20) == held(49) == pytest.approx(0.1)
    plain = _schedule(TrainSpec(epochs=5, **LINEAR_TO_ZERO), 50, 10)  # no floor, no decay_epochs: to zero over every step
    assert plain(0) == 1.0 and plain(25) == pytest.approx(0.5) and plain(50) == 0.0
    cosine = _schedule(TrainSpec(schedule="cosine", lr_floor=0.2), 10, 5)
    assert cosine(0) == 1.0 and cosine(5) == pytest.approx(0.6) and cosine(10) == pytest.approx(0.2)


def test_the_stop_rule_checks_when_the_lagging_pass_reaches_or_would_reach_the_target():
    rule = StopRule(target=1.0, candidates=False)
    assert [rule.wants_check(share) for share in (0.0, 0.25, 0.5, 0.75)] == [False, False, False, True]  # 0.75 + 0.25
    assert not StopRule(target=None, candidates=False).wants_check(1.0)  # no target: no check, the whole budget
    assert rule.reached(1.0) and not rule.reached(0.99) and not StopRule(None, False).reached(1.0)


def test_with_candidates_the_rule_checks_once_at_half_the_target():
    rule = StopRule(target=0.8, candidates=True)
    assert [rule.wants_check(share) for share in (0.3, 0.4, 0.45, 0.5)] == [False, True, False, False]
    assert rule.scouted and rule.last_share == 0.5
