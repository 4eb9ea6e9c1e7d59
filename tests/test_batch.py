"""The packed batch: flat token vectors with `cu_seqlens`, per-token fields aligned with the tokens."""

import pytest
import torch

from pipeline.batch import Batch
from pipeline.rollout import Sample


def _samples():
    return [
        Sample([5, 6, 7], [8, 9], [-0.1, -0.2], "stop", 0),
        Sample([4], [1, 2, 3], [-1.0, -2.0, -3.0], "length", 0),
        Sample([3, 3], [7], [-0.5], "stop", 0),
    ]


def test_from_samples_puts_prompt_and_response_back_to_back_with_the_loss_on_the_response():
    b = Batch.from_samples(_samples(), sample_ids=[10, 11, 12], mask_truncated=True)
    assert b.tokens.tolist() == [5, 6, 7, 8, 9, 4, 1, 2, 3, 3, 3, 7]
    assert b.cu_seqlens.tolist() == [0, 5, 9, 12] and b.lengths == [5, 4, 3] and len(b) == 3
    assert b.loss_mask.tolist() == [0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 1]  # the truncated one is filtered
    assert torch.allclose(b.rollout_log_prob[5:9], torch.tensor([0.0, -1.0, -2.0, -3.0]))
    assert b.segments().tolist() == [0] * 5 + [1] * 4 + [2] * 3
    assert b.positions().tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 2]
    assert Batch.from_samples(_samples()).loss_mask[6:9].tolist() == [1, 1, 1]


def test_select_split_and_token_index_keep_every_per_token_field_aligned():
    b = Batch.from_samples(_samples(), sample_ids=[10, 11, 12])
    b = b.replace(advantages=torch.arange(12.0))
    part = b.select([2, 0])
    assert part.tokens.tolist() == [3, 3, 7, 5, 6, 7, 8, 9] and part.sample_ids.tolist() == [12, 10]
    assert part.advantages.tolist() == [9, 10, 11, 0, 1, 2, 3, 4]
    assert torch.equal(b.token_index([2, 0]), torch.tensor([9, 10, 11, 0, 1, 2, 3, 4]))
    assert [len(p) for p in b.split(2)] == [1, 2] and b.split(3)[1].tokens.tolist() == [4, 1, 2, 3]
    with pytest.raises(ValueError, match="cannot split 3 samples into 4"):
        b.split(4)


def test_rows_view_round_trips():
    b = Batch.from_samples(_samples())
    rows = b.to_rows(b.loss_mask)
    assert rows.tolist() == [[0, 0, 0, 1, 1], [0, 1, 1, 1, 0], [0, 0, 1, 0, 0]]
    assert torch.equal(b.from_rows(rows), b.loss_mask)


def test_a_field_of_the_wrong_length_is_refused():
    b = Batch.from_samples(_samples())
    with pytest.raises(ValueError, match=r"Batch.advantages has shape \(3,\), expected \[12\]"):
        b.replace(advantages=torch.zeros(3))
    with pytest.raises(ValueError, match="do not describe"):
        Batch(tokens=torch.zeros(4, dtype=torch.long), cu_seqlens=torch.tensor([0, 3]),
              loss_mask=torch.zeros(4), sample_ids=torch.tensor([0]))  # fmt: skip
