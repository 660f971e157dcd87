"""route_topk (Triton vs reference) and the routing metadata's invariants, checked exactly."""
import pytest
import torch

from switch_dit_kernels import build_routing_metadata, route_topk
from switch_dit_kernels import reference as ref
from switch_dit_kernels.kernels.topk_softmax import topk_softmax

# (R, E, k): the edge each shape covers.
TOPK_CASES = [
    (1, 3, 1),      # T = 1, k = 1
    (37, 5, 2),     # odd R, prime E
    (24, 7, 7),     # k = E: every expert selected, prime E
    (40, 64, 8),    # many experts, the E64 k8 FFN benchmark's routing
    (130, 8, 2),    # more rows than one program's block (128 at E = 8): a partial last block
]


@pytest.mark.parametrize("num_rows,num_experts,k", TOPK_CASES)
@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_route_topk_triton_matches_reference(num_rows, num_experts, k, renormalize, dtype):
    # Distinct logits per row (spacing 4/E, exact in float16) so the top-k order is unambiguous.
    ranks = torch.stack([torch.randperm(num_experts) for _ in range(num_rows)]).float()
    logits = (ranks * (4.0 / num_experts) - 2.0).to(dtype).requires_grad_(True)
    weights, ids = route_topk(logits, k, renormalize=renormalize, backend="triton")
    ref_weights, ref_ids = ref.route_topk(logits, k, renormalize=renormalize)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int64
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights, ref_weights, rtol=1e-5, atol=1e-6)
    grad = torch.randn_like(weights)
    (got,) = torch.autograd.grad(weights, logits, grad)
    (want,) = torch.autograd.grad(ref_weights, logits, grad)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_topk_softmax_writes_every_output():
    # Poisoned buffers: an unwritten row or slot would keep NaN / -1.
    logits = torch.randn(67, 5)
    weights = torch.full((67, 3), float("nan"))
    ids = torch.full((67, 3), -1, dtype=torch.int64)
    topk_softmax(logits, 3, out=(weights, ids))
    assert not weights.isnan().any() and (ids >= 0).all()


def test_topk_ties_pick_lower_expert():
    # Equal logits: the documented tie rule is "lower expert id first".
    logits = torch.zeros(4, 6)
    _, ids = route_topk(logits, 3, backend="triton")
    assert torch.equal(ids, torch.tensor([[0, 1, 2]] * 4))


def test_topk_strided_logits():
    # A non-contiguous row stride (a column slice of a wider router output).
    wide = torch.randn(33, 12)
    logits = wide[:, 2:9]
    weights, ids = route_topk(logits, 2, backend="triton")
    ref_weights, ref_ids = ref.route_topk(logits, 2)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights, ref_weights)


def _direct_metadata(topk_ids, num_experts):
    """The metadata built the obvious way, with Python loops."""
    pairs = topk_ids.reshape(-1).tolist()
    order = sorted(range(len(pairs)), key=lambda p: (pairs[p], p))
    counts = [pairs.count(e) for e in range(num_experts)]
    offsets = [0]
    for c in counts:
        offsets.append(offsets[-1] + c)
    inverse = [0] * len(order)
    for s, p in enumerate(order):
        inverse[p] = s
    return counts, offsets, order, inverse


# (R, E, k, ids pattern): the edge each covers.
METADATA_CASES = [
    (1, 3, 1, "random"),     # T = 1
    (37, 7, 3, "random"),    # odd R, prime E
    (24, 5, 5, "random"),    # k = E
    (40, 6, 1, "one"),       # every row on one expert, the others empty
    (25, 9, 2, "low"),       # experts 4..8 receive no rows
]


@pytest.mark.parametrize("num_routes,num_experts,k,pattern", METADATA_CASES)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_routing_metadata_invariants(num_routes, num_experts, k, pattern, index_dtype):
    if pattern == "one":
        ids = torch.full((num_routes, k), 2)
    elif pattern == "low":
        ids = torch.stack([torch.randperm(4)[:k] for _ in range(num_routes)])
    else:
        ids = torch.stack([torch.randperm(num_experts)[:k] for _ in range(num_routes)])
    ids = ids.to(index_dtype)
    meta = build_routing_metadata(ids, num_experts, tokens_per_route=3)
    counts, offsets, order, inverse = _direct_metadata(ids, num_experts)
    assert torch.equal(meta.expert_counts, torch.tensor(counts, dtype=torch.int32))
    assert torch.equal(meta.expert_offsets, torch.tensor(offsets, dtype=torch.int32))
    assert torch.equal(meta.sorted_pairs, torch.tensor(order, dtype=torch.int32))
    assert torch.equal(meta.pair_to_sorted, torch.tensor(inverse, dtype=torch.int32))
    assert meta.num_routes == num_routes and meta.num_sorted_rows == num_routes * k * 3
    # Each sorted run of 3 rows reads the 3 rows of its route unit.
    sources = meta.sorted_row_sources().reshape(-1, 3)
    units = torch.tensor(order) // k
    assert torch.equal(sources, units[:, None] * 3 + torch.arange(3))
