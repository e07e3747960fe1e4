"""The forward over packed batches, with the frozen layers before the module cached."""

import pytest
import torch

from loramem.config import LoraSpec
from loramem.errors import LoramemError
from loramem.train.adapters import attached
from loramem.train.forward import cache_frozen_layers, first_trainable_layer, supervised_outputs
from loramem.train.pack import encode, pack, shared_prefix
from train_reference import EXAMPLES, packed_losses, plain_losses

def test_cached_frozen_layers_match_plain_path(tiny):
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


def test_first_trainable_layer_is_zero_for_all_layers(tiny):
    with attached(tiny.model, LoraSpec(rank=2, layers="all")) as model:
        assert first_trainable_layer(model) == 0


@pytest.mark.parametrize("loss_on", ["answer", "all"])
@pytest.mark.parametrize("cache_rows", [256, 8])  # 8: every example in a row of its own behind the shared prefix
def test_layer_outputs_with_cached_frozen_layers_match_the_full_forward(tiny, loss_on, cache_rows):
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
