"""``sequence_logps``: per-token values summed per sequence, padded and packed layouts."""

from __future__ import annotations

import pytest
import torch

from drorebel.ops.sequence import sequence_logps

IGNORE = -100


def _loop_padded(values, labels):
    return torch.stack([sum((v for v, y in zip(row, lab) if y != IGNORE), torch.tensor(0.0,
                        dtype=values.dtype)) for row, lab in zip(values, labels)])


def _loop_packed(values, cu, labels=None):
    out = []
    for i in range(len(cu) - 1):
        seg = range(int(cu[i]), int(cu[i + 1]))
        out.append(sum((values[t] for t in seg if labels is None or labels[t] != IGNORE),
                       torch.tensor(0.0, dtype=values.dtype)))
    return torch.stack(out)


def test_hand_worked_padded():
    values = torch.tensor([[-1.0, -2.0, -4.0], [-0.5, -8.0, -16.0]])
    labels = torch.tensor([[IGNORE, 5, 6], [7, IGNORE, IGNORE]])
    assert sequence_logps(values, labels).tolist() == [-6.0, -0.5]
    assert sequence_logps(values).tolist() == [-7.0, -24.5]


def test_padded_matches_loop_and_masks_non_finite():
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(5, 9, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 50, (5, 9), generator=gen)
    labels[torch.rand(5, 9, generator=gen) < 0.4] = IGNORE
    labels[3] = IGNORE  # a fully masked row sums to 0
    labels[4, 1:] = IGNORE  # a one-token response
    values[labels == IGNORE] = float("nan")  # masked garbage must not leak
    expected = _loop_padded(torch.nan_to_num(values), labels)
    torch.testing.assert_close(sequence_logps(values, labels), expected)
    assert sequence_logps(values, labels)[3].item() == 0.0


@pytest.mark.parametrize("cu_dtype", [torch.int32, torch.int64])
def test_packed_matches_loop(cu_dtype):
    gen = torch.Generator().manual_seed(1)
    lengths = [3, 1, 0, 5, 1, 2]  # one-token and empty sequences included
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=cu_dtype)
    total = int(cu[-1]) + 2  # two trailing padding positions belong to no sequence
    values = torch.randn(total, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 9, (total,), generator=gen)
    labels[4] = IGNORE
    got = sequence_logps(values, labels, cu_seqlens=cu)
    torch.testing.assert_close(got, _loop_packed(values, cu, labels))
    torch.testing.assert_close(sequence_logps(values, cu_seqlens=cu), _loop_packed(values, cu))
    assert got[2].item() == 0.0 and got.shape == (len(lengths),)


def test_gradients_flow_to_scored_positions_only():
    values = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[1, IGNORE, 2, 3], [IGNORE, IGNORE, 4, IGNORE]])
    weights = torch.tensor([2.0, -3.0], dtype=torch.float64)
    (sequence_logps(values, labels) * weights).sum().backward()
    expected = (labels != IGNORE).double() * weights[:, None]
    assert torch.equal(values.grad, expected)

    packed = torch.randn(6, dtype=torch.float64, requires_grad=True)
    cu = torch.tensor([0, 2, 5])
    (sequence_logps(packed, cu_seqlens=cu) * weights).sum().backward()
    assert packed.grad.tolist() == [2.0, 2.0, -3.0, -3.0, -3.0, 0.0]


def test_packed_validation():
    with pytest.raises(TypeError, match="cu_seqlens"):
        sequence_logps(torch.zeros(4), cu_seqlens=torch.tensor([0.0, 4.0]))
    with pytest.raises(ValueError, match="cu_seqlens"):
        sequence_logps(torch.zeros(4), cu_seqlens=torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        sequence_logps(torch.zeros(2, 3), torch.zeros(2, 4, dtype=torch.long))
