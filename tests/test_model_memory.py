"""Memory bank compression (MBC) and the memory bank policies (`pipeline/model/memory.py`; the
README's *Architecture* section)."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from pipeline.model.memory import Bank, MemoryState, compress, push


def reference_compress(bank: torch.Tensor, sizes: torch.Tensor):
    """Loop-by-loop statement of the rule, for comparison with the vectorised `compress`."""
    B, T, N, C = bank.shape
    out = torch.empty(B, T - 1, N, C, dtype=torch.float64)
    out_sizes = torch.empty(B, T - 1, N, dtype=torch.float64)
    for b in range(B):
        for i in range(N):
            sims = [float(F.cosine_similarity(bank[b, k, i].double(), bank[b, k + 1, i].double(), dim=0))
                    for k in range(T - 1)]
            k_star = max(range(T - 1), key=lambda k: (sims[k], -k))  # first on ties
            slots = [bank[b, k, i].double() for k in range(T)]
            n = [float(sizes[b, k, i]) for k in range(T)]
            merged = (n[k_star] * slots[k_star] + n[k_star + 1] * slots[k_star + 1]) / (n[k_star] + n[k_star + 1])
            slots[k_star], n[k_star] = merged, n[k_star] + n[k_star + 1]
            del slots[k_star + 1], n[k_star + 1]
            out[b, :, i] = torch.stack(slots)
            out_sizes[b, :, i] = torch.tensor(n)
    return out, out_sizes


def test_hand_computed_example():
    # one batch element, one token, 3 slots of 2-d vectors
    bank = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]], [[0.0, 2.0]]]])  # slots 1 and 2 are parallel
    sizes = torch.tensor([[[1.0], [3.0], [1.0]]])
    out, out_sizes = compress(bank, sizes)
    # k* = 1: (3·[0,1] + 1·[0,2]) / 4 = [0, 1.25]
    assert torch.allclose(out, torch.tensor([[[[1.0, 0.0]], [[0.0, 1.25]]]]))
    assert torch.equal(out_sizes, torch.tensor([[[1.0], [4.0]]]))


def test_weighted_mean_not_plain_mean():
    bank = torch.tensor([[[[1.0, 1.0]], [[2.0, 2.0]], [[-1.0, 5.0]]]])
    sizes = torch.tensor([[[2.0], [1.0], [1.0]]])
    out, out_sizes = compress(bank, sizes)
    assert torch.allclose(out[0, 0, 0], torch.tensor([4.0 / 3, 4.0 / 3]))  # (2·1 + 1·2) / 3
    assert torch.equal(out[0, 1], bank[0, 2])
    assert out_sizes[0, :, 0].tolist() == [3.0, 1.0]


def test_first_maximum_on_ties():
    v = torch.tensor([1.0, 2.0])
    bank = torch.stack([v, v, v, v]).view(1, 4, 1, 2)  # all adjacent similarities are equal
    sizes = torch.tensor([[[1.0], [2.0], [3.0], [4.0]]])
    out, out_sizes = compress(bank, sizes)
    assert out_sizes[0, :, 0].tolist() == [3.0, 3.0, 4.0]  # slots 0 and 1 merged


def test_order_kept_and_per_token_independent():
    torch.manual_seed(0)
    bank = torch.randn(1, 5, 2, 8)
    bank[0, 3, 0] = bank[0, 2, 0] * 2.0  # token 0: merge slots 2, 3
    bank[0, 1, 1] = bank[0, 0, 1] * 0.5  # token 1: merge slots 0, 1
    sizes = torch.ones(1, 5, 2)
    out, out_sizes = compress(bank, sizes)
    for src, dst in ((0, 0), (1, 1), (4, 3)):
        assert torch.equal(out[0, dst, 0], bank[0, src, 0])
    assert torch.allclose(out[0, 2, 0], (bank[0, 2, 0] + bank[0, 3, 0]) / 2)
    for src, dst in ((2, 1), (3, 2), (4, 3)):
        assert torch.equal(out[0, dst, 1], bank[0, src, 1])
    assert out_sizes[0, :, 0].tolist() == [1, 1, 2, 1] and out_sizes[0, :, 1].tolist() == [2, 1, 1, 1]


def test_matches_loop_reference_on_random_banks():
    torch.manual_seed(1)
    bank = torch.randn(3, 6, 5, 7)
    bank[1, 4] = bank[1, 3] * 3  # exact ties with another maximum are also covered
    sizes = torch.randint(1, 5, (3, 6, 5)).float()
    out, out_sizes = compress(bank, sizes)
    ref, ref_sizes = reference_compress(bank, sizes)
    assert torch.allclose(out.double(), ref, atol=1e-6)
    assert torch.equal(out_sizes.double(), ref_sizes)
    assert out.dtype == bank.dtype and out.shape == (3, 5, 5, 7)


def test_pure_function():
    torch.manual_seed(2)
    bank, sizes = torch.randn(2, 4, 3, 5), torch.ones(2, 4, 3)
    b0, s0 = bank.clone(), sizes.clone()
    compress(bank, sizes)
    assert torch.equal(bank, b0) and torch.equal(sizes, s0)


def test_rejects_bad_shapes():
    with pytest.raises(ValueError):
        compress(torch.randn(1, 1, 2, 3), torch.ones(1, 1, 2))
    with pytest.raises(ValueError):
        compress(torch.randn(1, 3, 2, 3), torch.ones(1, 3))


@pytest.mark.parametrize("policy", ["mbc", "fifo"])
def test_push_caps_length_and_sizes_count_frames(policy):
    torch.manual_seed(3)
    L, bank = 4, None
    for t in range(11):
        bank = push(bank, torch.randn(2, 3, 6, requires_grad=True), policy, L)
        assert bank.length == min(t + 1, L)
        assert not bank.slots.requires_grad
        total = bank.sizes.sum(dim=1)  # [B, N]
        if policy == "mbc":  # every frame seen is accounted for, at every token position
            assert torch.equal(total, torch.full_like(total, t + 1))
        else:
            assert torch.equal(total, torch.full_like(total, min(t + 1, L)))


def test_fifo_drops_oldest():
    frames = [torch.full((1, 1, 2), float(t)) for t in range(5)]
    bank = None
    for f in frames:
        bank = push(bank, f, "fifo", 3)
    assert bank.slots[0, :, 0, 0].tolist() == [2.0, 3.0, 4.0]


def test_mbc_bank_is_compress_of_appended():
    torch.manual_seed(4)
    bank = Bank(torch.randn(1, 3, 2, 4), torch.ones(1, 3, 2))
    new = torch.randn(1, 2, 4)
    pushed = push(bank, new, "mbc", 3)
    expect = compress(torch.cat([bank.slots, new[:, None]], 1), torch.ones(1, 4, 2))
    assert torch.equal(pushed.slots, expect[0]) and torch.equal(pushed.sizes, expect[1])


@pytest.mark.parametrize("policy", ["mbc", "fifo"])
def test_cached_projections_follow_the_slots(policy):
    """A bank's cache (keys / values) stays the projection of its slots through appends, FIFO drops
    and MBC merges (merging commutes with an affine map)."""
    torch.manual_seed(5)
    proj = torch.nn.Linear(4, 6)
    bank = None
    with torch.no_grad():
        for t in range(9):
            x = torch.randn(2, 3, 4)
            bank = push(bank, x, policy, 3, cache=torch.cat([proj(x), 2 * x], dim=-1))
            assert bank.cache.shape == (2, bank.length, 3, 10)
            torch.testing.assert_close(bank.cache[..., :6], proj(bank.slots), atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(bank.cache[..., 6:], 2 * bank.slots, atol=1e-6, rtol=1e-5)
        assert bank.sizes.sum().item() == (2 * 3 * 9 if policy == "mbc" else 2 * 3 * 3)
        # an entry without a cache leaves the bank without one (it is recomputed when needed)
        assert push(bank, torch.randn(2, 3, 4), policy, 3).cache is None
    with pytest.raises(ValueError, match="rider"):
        compress(torch.randn(1, 3, 2, 4), torch.ones(1, 3, 2), torch.randn(1, 2, 2, 4))


def test_none_policy_keeps_nothing():
    assert push(None, torch.randn(1, 2, 3), "none", 5) is None
    with pytest.raises(ValueError):
        push(None, torch.randn(1, 2, 3), "lru", 5)


def test_state_is_immutable_value():
    s = MemoryState(torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.long), queries=(None, None))
    s2 = s.evolve(frames_seen=5)
    assert s.frames_seen == 0 and s2.frames_seen == 5 and s2.batch_size == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.frames_seen = 3
    assert s.frames_seen == 0
