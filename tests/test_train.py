import pytest
import torch
import torch.nn.functional as F

from loramem.config import LoraSpec, TrainSpec
from loramem.errors import LoramemError
from loramem.train import Example, attached, encode, examples_recalled, pack, recall, shared_prefix, supervised_logits, train
from sample_facts import LINEAR_TO_ZERO

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


@pytest.mark.parametrize("loss_on", ["answer", "all"])
@pytest.mark.parametrize("row_tokens", [1, 1024])
def test_packed_supervised_logits_match_plain_path(tiny, loss_on, row_tokens):
    encoded = encode(tiny.tokenizer, EXAMPLES)
    with attached(tiny.model, LoraSpec(rank=2, layers="all")) as model:
        for name, p in model.named_parameters():  # non-zero adapter so the LoRA path matters
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.5)
        with torch.no_grad():
            batch = pack(encoded, loss_on, row_tokens=row_tokens, pad_id=tiny.tokenizer.pad_token_id)
            torch.testing.assert_close(packed_losses(model, batch), plain_losses(model, tiny.tokenizer, encoded, loss_on),
                                       rtol=1e-4, atol=1e-4)


def test_shared_prefix_is_computed_once(tiny):
    encoded = encode(tiny.tokenizer, EXAMPLES)
    n = shared_prefix(encoded)
    assert n == len(tiny.tokenizer("Question: What is the phone number of").input_ids)  # then " Ann", " Bo", " Carla"
    batch = pack(encoded, "answer", pad_id=tiny.tokenizer.pad_token_id)
    assert batch.input_ids.shape == (1, n + sum(len(e.ids) - n for e in encoded))
    assert pack(encoded, "all").input_ids.shape[1] == sum(len(e.ids) for e in encoded)


def test_bf16_autocast_loss_close_to_fp32(tiny):
    encoded = encode(tiny.tokenizer, EXAMPLES)
    batch = pack(encoded, "answer")
    with attached(tiny.model, LoraSpec(rank=2, layers="all")) as model, torch.no_grad():
        fp32 = F.cross_entropy(supervised_logits(model, batch), batch.labels)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = F.cross_entropy(supervised_logits(model, batch).float(), batch.labels)
    assert abs(fp32.item() - bf16.item()) < 0.05 * fp32.item()


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


def test_recall_zero_for_untrained_adapter(tiny):
    encoded = encode(tiny.tokenizer, EXAMPLES)
    with attached(tiny.model, LoraSpec(rank=2, layers="all")) as model:
        assert recall(model, tiny.tokenizer, encoded) == 0.0
        batch = pack(encoded)
        assert not examples_recalled(supervised_logits(model, batch), batch).any()


def test_attached_restores_base_model(tiny):
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    with attached(tiny.model, LoraSpec(rank=2, layers="all")) as model:
        train(model, tiny.tokenizer, EXAMPLES, TrainSpec(epochs=1, target_recall=None), progress=False)
    after = tiny.model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_no_examples_is_an_error(tiny):
    with attached(tiny.model, LoraSpec(rank=2, layers="all")) as model, pytest.raises(LoramemError, match="no training examples"):
        train(model, tiny.tokenizer, [], TrainSpec())


def test_cached_frozen_layers_match_plain_path(tiny):
    from loramem.train import cache_frozen_layers, first_trainable_layer

    encoded = encode(tiny.tokenizer, EXAMPLES)
    with attached(tiny.model, LoraSpec(rank=2, layers="2-3")) as model:
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.5)
        assert first_trainable_layer(model) == 2
        with torch.no_grad():
            reference = plain_losses(model, tiny.tokenizer, encoded)
            cache_frozen_layers(model, encoded, 2, bf16=False)
            assert encoded[0].hidden.shape == (len(encoded[0].ids), tiny.model.config.hidden_size)
            batch = pack(encoded, "answer")
            # one row: the shared prefix's hidden states once, then each example's own
            n = shared_prefix(encoded)
            expected = torch.cat([encoded[0].hidden[:n]] + [e.hidden[n:] for e in encoded])
            assert torch.equal(batch.hidden, expected[None]) and batch.start_layer == 2
            torch.testing.assert_close(packed_losses(model, batch), reference, rtol=1e-4, atol=1e-4)
    assert len(tiny.model.model.layers) == 4  # the decoder got all its layers back


def test_candidate_softmax_is_the_full_softmax_restricted_to_the_candidates(tiny):
    from loramem.train import _loss

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
    from loramem.train import candidate_vocab

    encoded = encode(tiny.tokenizer, EXAMPLES)
    with attached(tiny.model, LoraSpec(rank=2, layers="all")) as model:
        vocab = candidate_vocab(model, tiny.tokenizer, encoded, top_k=3)
        batch = pack(encoded)
        top = supervised_logits(model, batch).topk(3, -1).indices
    assert torch.equal(vocab, torch.unique(torch.cat([batch.labels, top.flatten()])))
    assert torch.isin(batch.labels, vocab).all() and torch.isin(top, vocab).all()


def test_exact_check_names_the_wrong_examples_and_the_tokens_that_beat_answers(tiny):
    from loramem.train import exact_check

    encoded = encode(tiny.tokenizer, EXAMPLES)
    with attached(tiny.model, LoraSpec(rank=2, layers="all")) as model:
        recalled, intruders = exact_check(model, tiny.tokenizer, encoded)
        batch = pack(encoded)
        predicted = supervised_logits(model, batch).argmax(-1)
    wrong = (predicted != batch.labels) & batch.label_is_answer
    assert recalled.tolist() == [False] * len(EXAMPLES)
    assert intruders == set(predicted[wrong].tolist()) and intruders


def test_candidate_training_stops_only_when_the_whole_vocabulary_agrees(tiny, monkeypatch, caplog):
    """Candidates of only the label tokens, and a planted rival outside them: the digit 5's output row plus an
    offset along the model's hidden state where 5 is the answer, so the rival rises with 5 and wins. The exact
    check must find it, train against it, and report recall over every token."""
    import loramem.train as train_module

    def labels_only(model, tokenizer, encoded, top_k, loss_on="answer"):
        return torch.unique(pack(encoded, loss_on).labels)

    monkeypatch.setattr(train_module, "candidate_vocab", labels_only)
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
    from loramem.train import _schedule

    held = _schedule(TrainSpec(lr_floor=0.1, decay_epochs=2, epochs=5), total_steps=50, steps_per_epoch=10)
    assert held(0) == 1.0 and held(10) == pytest.approx(0.55) and held(20) == held(49) == pytest.approx(0.1)
    plain = _schedule(TrainSpec(epochs=5, **LINEAR_TO_ZERO), 50, 10)  # no floor, no decay_epochs: to zero over every step
    assert plain(0) == 1.0 and plain(25) == pytest.approx(0.5) and plain(50) == 0.0
    cosine = _schedule(TrainSpec(schedule="cosine", lr_floor=0.2), 10, 5)
    assert cosine(0) == 1.0 and cosine(5) == pytest.approx(0.6) and cosine(10) == pytest.approx(0.2)


def test_first_trainable_layer_is_zero_for_all_layers(tiny):
    from loramem.train import first_trainable_layer

    with attached(tiny.model, LoraSpec(rank=2, layers="all")) as model:
        assert first_trainable_layer(model) == 0


@pytest.mark.parametrize("variant", ["rslora", "dora", "pissa"])
def test_peft_variants_train_and_answer(tiny, tmp_path, variant):
    from loramem import Memory

    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    memory = Memory.open(tmp_path / "m", create=True, base=tiny)
    record = memory.write(EXAMPLES[:1], lora=LoraSpec(rank=4, layers="all", **{variant: True}),
                          train_spec=TrainSpec(lr=1e-2, epochs=60, batch_size=1, **LINEAR_TO_ZERO), progress=False)
    assert record.recall == 1.0
    # The base is untouched (PiSSA rewrites it while training) and the saved module applies to it.
    assert all(torch.equal(before[k], v) for k, v in tiny.model.state_dict().items())
    assert memory.ask("What is the phone number of Ann Lee?").text.startswith("603-556-7631")


CONTEXT = "Ann Lee can be reached at 603-556-7631. Bo answers at 705-882-9365."


def test_distill_loss_is_zero_only_when_student_matches_teacher():
    from loramem.train import distill_loss, sparse_logp

    logits = torch.randn(5, 50) * 3
    index, teacher = sparse_logp(logits, None, 8, 2.0)
    assert teacher.exp().sum(-1).allclose(torch.ones(5))  # top 8 and the rest bucket cover everything
    assert distill_loss(logits, index, teacher, 2.0).abs() < 1e-6
    assert distill_loss(logits + torch.randn(5, 50), index, teacher, 2.0) > 1e-3
    tail = logits.clone()
    tail.scatter_(1, index, float("-inf"))  # mass moved only among the tokens outside the teacher's top 8
    outside = tail.argmax(-1, keepdim=True)
    moved = logits.scatter_add(1, outside, torch.full((5, 1), 5.0))
    assert distill_loss(moved, index, teacher, 2.0) > 1e-3  # the rest bucket sees it
    hidden = torch.randn(5, 2, 16)
    assert distill_loss(logits, index, teacher, 2.0, hidden, hidden.clone()).abs() < 1e-6
    assert distill_loss(logits, index, teacher, 2.0, hidden + 0.1, hidden) > 1e-3


@pytest.mark.parametrize("loss_on", ["answer", "all"])
def test_cached_teacher_targets_equal_a_fresh_plain_forward(tiny, loss_on):
    from loramem.train import sparse_logp, teacher_targets

    spec = TrainSpec(objective="distill", distill_top_k=4, loss_on=loss_on, precision="fp32", distill_layers="0,1")
    encoded = encode(tiny.tokenizer, EXAMPLES + [Example("", "Plain text is distilled at every token.")])
    context_ids = tiny.tokenizer(CONTEXT + "\n\n", add_special_tokens=False).input_ids
    with attached(tiny.model, LoraSpec(rank=2, layers="all")) as model:
        for name, p in model.named_parameters():  # a non-zero adapter, which the teacher must not see
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.5)
        teacher_targets(model, tiny.tokenizer, encoded, CONTEXT, spec, max_labels=30)  # several groups
    for e in encoded:
        ids = torch.tensor([context_ids + e.ids])  # the tiny tokenizer adds no BOS
        first = max(e.n_prompt if loss_on == "answer" else 1, 1)
        out = tiny.model(input_ids=ids, output_hidden_states=True)
        positions = slice(len(context_ids) + first - 1, -1)
        index, logp = sparse_logp(out.logits[0, positions], None, 4, 1.0)
        assert torch.equal(e.teacher.index, index)
        assert e.teacher.logp.allclose(logp, atol=1e-4)
        hidden = torch.stack([out.hidden_states[layer + 1][0, positions] for layer in (0, 1)], 1)
        assert e.teacher.hidden.allclose(hidden, atol=1e-4)


@pytest.mark.parametrize("loss_on", ["answer", "all"])
@pytest.mark.parametrize("cache_rows", [256, 8])  # 8: every example in a row of its own behind the shared prefix
def test_layer_outputs_with_cached_frozen_layers_match_the_full_forward(tiny, loss_on, cache_rows):
    from loramem.train import cache_frozen_layers, supervised_outputs

    last = tiny.model.config.num_hidden_layers - 1
    with attached(tiny.model, LoraSpec(rank=2, layers=str(last))) as model:
        full = pack(encode(tiny.tokenizer, EXAMPLES), loss_on, pad_id=tiny.tokenizer.pad_token_id)
        logits, hidden = supervised_outputs(model, full, (last,))
        encoded = encode(tiny.tokenizer, EXAMPLES)
        cache_frozen_layers(model, encoded, last, bf16=False, row_tokens=cache_rows)
        cached = pack(encoded, loss_on, pad_id=tiny.tokenizer.pad_token_id)
        cached_logits, cached_hidden = supervised_outputs(model, cached, (last,))
        assert cached_logits.allclose(logits, atol=1e-4) and cached_hidden.allclose(hidden, atol=1e-4)
        with pytest.raises(LoramemError, match="before the module's first adapted layer"):
            supervised_outputs(model, cached, (0,))


def test_distill_training_moves_the_student_towards_the_teacher(tiny):
    spec = TrainSpec(objective="distill", lr=1e-2, epochs=30, batch_size=2, target_recall=None, precision="fp32",
                     distill_layers="1")
    encoded_before = encode(tiny.tokenizer, EXAMPLES)
    with attached(tiny.model, LoraSpec(rank=4, layers="all")) as model:
        from loramem.train import distill_loss, teacher_targets

        teacher_targets(model, tiny.tokenizer, encoded_before, CONTEXT, spec)

        def kl() -> float:
            batch = pack(encoded_before, "answer", pad_id=tiny.tokenizer.pad_token_id)
            with torch.no_grad():
                logits = supervised_logits(model, batch)
            return float(distill_loss(logits, torch.cat([e.teacher.index for e in encoded_before]),
                                      torch.cat([e.teacher.logp for e in encoded_before])))  # the KL part

        untrained = kl()
        stats = train(model, tiny.tokenizer, EXAMPLES, spec, progress=False, context=CONTEXT)
        assert kl() < 0.5 * untrained and stats.steps == 60  # final_loss also holds the hidden-state term
    with pytest.raises(LoramemError, match="needs the documents"):
        with attached(tiny.model, LoraSpec(rank=4, layers="all")) as model:
            train(model, tiny.tokenizer, EXAMPLES, spec, progress=False)
    with pytest.raises(LoramemError, match="objective must be"):
        TrainSpec(objective="kd")
