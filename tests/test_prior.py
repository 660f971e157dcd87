"""Diffusion prior: the sliding-window mask, the bipartite matching and the Jensen-Shannon loss."""
import itertools

import numpy as np
import pytest
import torch
from scipy.spatial.distance import jensenshannon

from switch_dit.prior import (PendingPriorMatch, diffusion_prior_loss, diffusion_prior_mask,
                              jensen_shannon, match_prior_columns, prior_matching_cost,
                              topk_gate_map)


def direct_mask(steps, depth, experts, k, alpha):
    """The prior built row by row from its definition, in plain Python."""
    columns, ones = depth * experts, depth * k
    rows = []
    for i in range(steps):
        position = i / (steps - 1) if steps > 1 else 0.0
        start = round(position ** alpha * (columns - ones))  # round half to even, like numpy
        rows.append([1.0 if start <= c < start + ones else 0.0 for c in range(columns)])
    return torch.tensor(rows)


def test_prior_mask_literal():
    # T = 3, depth 2, E = 2, k = 1, alpha = 1: a window of 2 ones starting at 0, 1, 2.
    expected = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]], dtype=torch.float32)
    assert torch.equal(diffusion_prior_mask(3, 2, 2, 1, alpha=1.0), expected)


@pytest.mark.parametrize("steps,depth,experts,k,alpha", [
    (1000, 28, 3, 2, 4.0),  # the official configuration (DiT-XL depth)
    (37, 5, 7, 3, 4.0),     # odd T, prime E
    (50, 4, 3, 1, 2.0),     # k = 1, another alpha
    (11, 3, 4, 4, 4.0),     # k = E: every column always on
    (1, 2, 3, 2, 4.0),      # T = 1
])
def test_prior_mask_against_direct_construction(steps, depth, experts, k, alpha):
    mask = diffusion_prior_mask(steps, depth, experts, k, alpha)
    assert mask.shape == (steps, depth * experts) and mask.dtype == torch.float32
    assert torch.equal(mask, direct_mask(steps, depth, experts, k, alpha))
    assert (mask.sum(1) == depth * k).all()
    assert mask[0, : depth * k].all() and mask[-1, -depth * k:].all() if steps > 1 else True


def test_prior_mask_bad_arguments():
    with pytest.raises(ValueError, match="k must be"):
        diffusion_prior_mask(10, 2, 3, 4)
    with pytest.raises(ValueError, match="depth"):
        diffusion_prior_mask(10, 0, 3, 2)


def gates_from_prior(prior, depth, experts, k, generator):
    """A gate table whose top-k map is the prior under a hidden column permutation.

    Column e * depth + b goes to block b: any window of depth * k consecutive prior columns then
    holds exactly k columns of each block, so each block's row has k entries of 1 / k.
    """
    perm = torch.empty(depth * experts, dtype=torch.long)
    for b in range(depth):
        cols = torch.arange(experts) * depth + b
        perm[b * experts:(b + 1) * experts] = cols[torch.randperm(experts, generator=generator)]
    gates = (prior[:, perm] / k).reshape(-1, depth, experts)
    return gates, perm


@pytest.mark.parametrize("depth,experts,k", [(4, 3, 2), (3, 5, 1), (2, 2, 2)])  # k = E last
def test_loss_zero_when_gates_equal_matched_prior(depth, experts, k):
    g = torch.Generator().manual_seed(0)
    prior = diffusion_prior_mask(40, depth, experts, k, alpha=4.0)
    gates, _ = gates_from_prior(prior, depth, experts, k, g)
    assert torch.equal(topk_gate_map(gates, k), (gates > 0).float().reshape(40, -1))
    match = match_prior_columns(gates, prior, k, generator=g)
    assert torch.equal(prior[:, match], topk_gate_map(gates, k))  # a zero-cost matching
    t = torch.randint(0, 40, (9,))
    assert diffusion_prior_loss(gates, t, prior, k, generator=g).item() == 0.0


def test_loss_positive_and_gradients_reach_only_gates():
    depth, experts, k, steps = 3, 3, 2, 30
    prior = diffusion_prior_mask(steps, depth, experts, k).requires_grad_(True)
    logits = torch.randn(steps, depth, experts, requires_grad=True)
    gates = torch.softmax(logits, dim=-1)
    t = torch.randint(0, steps, (8,))
    loss = diffusion_prior_loss(gates, t, prior, k, weight=2.0)
    assert loss.dim() == 0 and loss.item() > 0
    loss.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    assert logits.grad[torch.tensor([i for i in range(steps) if i not in t.tolist()],
                                    dtype=torch.long)].abs().sum() == 0  # only the batch's rows
    assert prior.grad is None


def test_loss_matches_hand_computation():
    depth, experts, k, steps = 2, 3, 1, 6
    prior = diffusion_prior_mask(steps, depth, experts, k, alpha=1.0)
    gates = torch.softmax(torch.randn(steps, depth, experts, dtype=torch.float64), -1)
    t = torch.tensor([0, 5, 2])
    match = match_prior_columns(gates, prior, k)
    loss = diffusion_prior_loss(gates, t, prior, k, weight=0.7, match=match)  # eps = 1e-6
    expected = 0.0
    for ti in t.tolist():
        p = (gates[ti].reshape(-1) / depth).numpy()
        q = prior[ti, match].double().numpy()
        expected += jensenshannon(p, q / q.sum()) ** 2  # scipy returns the square root (nats)
    assert loss.item() == pytest.approx(0.7 * expected / 3, rel=1e-4)


def test_jensen_shannon_symmetric_bounded():
    p = torch.softmax(torch.randn(5, 7, dtype=torch.float64), -1)
    q = torch.softmax(torch.randn(5, 7, dtype=torch.float64), -1)
    torch.testing.assert_close(jensen_shannon(p, q, 0.0), jensen_shannon(q, p, 0.0))
    assert (jensen_shannon(p, q) <= np.log(2)).all() and (jensen_shannon(p, p) == 0).all()


@pytest.mark.parametrize("depth,experts,k,steps", [(2, 2, 1, 9), (1, 5, 2, 7), (2, 3, 2, 13)])
def test_matching_is_minimum_cost(depth, experts, k, steps):
    # Brute force over all column assignments (4!, 5!, 6!).
    prior = diffusion_prior_mask(steps, depth, experts, k, alpha=2.0)
    gates = torch.softmax(torch.randn(steps, depth, experts), -1)
    binary = topk_gate_map(gates, k)
    cost = lambda m: (binary - prior[:, list(m)]).abs().sum().item()
    best = min(cost(m) for m in itertools.permutations(range(depth * experts)))
    match = match_prior_columns(gates, prior, k)
    assert sorted(match.tolist()) == list(range(depth * experts))
    assert cost(match.tolist()) == best


def test_matching_breaks_ties_at_random():
    # k = E: the prior is all ones and every assignment costs the same.
    prior = diffusion_prior_mask(5, 2, 3, 3)
    gates = torch.softmax(torch.randn(5, 2, 3), -1)
    first = match_prior_columns(gates, prior, 3, generator=torch.Generator().manual_seed(1))
    again = match_prior_columns(gates, prior, 3, generator=torch.Generator().manual_seed(1))
    other = match_prior_columns(gates, prior, 3, generator=torch.Generator().manual_seed(2))
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_matching_bad_shapes():
    prior = diffusion_prior_mask(5, 2, 3, 2)
    with pytest.raises(ValueError, match="prior must be"):
        match_prior_columns(torch.rand(5, 3, 3), prior, 2)
    with pytest.raises(ValueError, match="gate_table must be"):
        match_prior_columns(torch.rand(5, 6), prior, 2)


@pytest.mark.parametrize("depth,experts,k,steps", [
    (3, 4, 2, 17),  # odd T
    (2, 5, 5, 6),   # k = E: every cost equal (all ties)
    (1, 3, 1, 1),   # T = 1, depth 1
])
def test_matching_cost_is_column_l1_distance(depth, experts, k, steps):
    prior = diffusion_prior_mask(steps, depth, experts, k, alpha=2.0)
    gates = torch.softmax(torch.randn(steps, depth, experts), -1)
    binary = topk_gate_map(gates, k)
    direct = (binary[:, :, None] - prior[:, None, :]).abs().sum(0)  # [DE, DE], column by column
    assert torch.equal(prior_matching_cost(gates, prior, k), direct)


def test_pending_match_equals_direct_matching_and_can_be_solved_again():
    depth, experts, k, steps = 4, 3, 2, 50
    prior = diffusion_prior_mask(steps, depth, experts, k)
    gates = torch.softmax(torch.randn(steps, depth, experts), -1)
    pending = PendingPriorMatch(gates, prior, k)
    for seed in (0, 1):  # each result() draws its own tie-breaking shuffle
        expected = match_prior_columns(gates, prior, k, generator=torch.Generator().manual_seed(seed))
        got = pending.result(torch.Generator().manual_seed(seed))
        assert got.dtype == torch.int64 and torch.equal(got, expected)
    t = torch.randint(0, steps, (7,))
    torch.testing.assert_close(
        diffusion_prior_loss(gates, t, prior, k, match=pending, generator=torch.Generator().manual_seed(3)),
        diffusion_prior_loss(gates, t, prior, k, generator=torch.Generator().manual_seed(3)),
        rtol=0, atol=0)


@pytest.mark.gpu
def test_pending_match_on_cuda_equals_cpu_matching():
    # The pinned-memory copy and event path; the matching itself is the CPU one.
    depth, experts, k, steps = 12, 3, 2, 1000  # S/2's prior
    prior = diffusion_prior_mask(steps, depth, experts, k)
    gates = torch.softmax(torch.randn(steps, depth, experts), -1)
    expected = match_prior_columns(gates, prior, k, generator=torch.Generator().manual_seed(0))
    pending = PendingPriorMatch(gates.cuda(), prior.cuda(), k)
    got = pending.result(torch.Generator().manual_seed(0))
    assert got.is_cuda and torch.equal(got.cpu(), expected)
