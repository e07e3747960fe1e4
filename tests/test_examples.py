"""The training example, its data hash and the even shards a facts file is written in."""

import hashlib
import json

from loramem.examples import Example, data_hash, even_shards


def test_the_data_hash_is_the_sha256_of_the_examples_in_order():
    examples = [Example("Question: Who? Answer:", " Ann"), Example("", "Lée")]
    assert data_hash(examples) == hashlib.sha256(json.dumps([["Question: Who? Answer:", " Ann"], ["", "Lée"]],
                                                            ensure_ascii=False).encode()).hexdigest()
    assert data_hash(examples[::-1]) != data_hash(examples)


def test_shards_are_consecutive_and_even_with_no_runt():
    examples = [Example("", str(i)) for i in range(9)]
    sizes = [10] * 9
    assert [[int(e.answer) for e in s] for s in even_shards(examples, sizes, 40)] == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert [len(s) for s in even_shards(examples, sizes, 1000)] == [9]
    assert [len(s) for s in even_shards(examples[:3], [10, 50, 10], 20)] == [1, 1, 1]  # the long one stands alone
