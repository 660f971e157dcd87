"""Switch-DiT's diffusion prior loss: a sliding-window prior over (block, expert) columns.

The prior is a DTR-style binary table [T, depth * E]: each timestep switches on a window of
depth * k columns (as many as the top-k gates of all blocks select), and the window slides from the
first columns (t = 0) to the last (t = T - 1) with its start at linspace(0, 1, T) ** alpha times the
free positions. Neighbouring timesteps therefore share most experts and distant ones few.

Which gate column plays which prior column is not fixed: every training step matches them by a
minimum-cost bipartite matching (`match_prior_columns`) of the binary top-k gate map of all
timesteps against the prior, then the loss pulls the gate probabilities of the batch's timesteps
towards the matched prior rows with a Jensen-Shannon divergence (`diffusion_prior_loss`).
"""
from __future__ import annotations

from typing import Optional, Union

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment


def diffusion_prior_mask(num_timesteps: int, depth: int, num_experts: int, k: int,
                         alpha: float = 4.0) -> torch.Tensor:
    """The prior table [num_timesteps, depth * num_experts] float32 of zeros and ones.

    Row t has ones at columns [s_t, s_t + depth * k) with
    s_t = round(linspace(0, 1, T)[t] ** alpha * (depth * num_experts - depth * k)) (numpy's
    linspace and round-half-to-even, as the official implementation).
    """
    for name, value in (("num_timesteps", num_timesteps), ("depth", depth),
                        ("num_experts", num_experts), ("k", k)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if k > num_experts:
        raise ValueError(f"k must be <= num_experts ({num_experts}), got {k}")
    columns, ones = depth * num_experts, depth * k
    start = np.round(np.linspace(0.0, 1.0, num_timesteps) ** alpha * (columns - ones))
    start = start.astype(np.int64)[:, None]
    cols = np.arange(columns)[None, :]
    return torch.from_numpy(((cols >= start) & (cols < start + ones)).astype(np.float32))


def topk_gate_map(gate_table: torch.Tensor, k: int) -> torch.Tensor:
    """Binary top-k map of gate probabilities: [T, depth, E] -> [T, depth * E] float32."""
    ids = torch.topk(gate_table, k, dim=-1).indices
    binary = torch.zeros(gate_table.shape, dtype=torch.float32, device=gate_table.device)
    return binary.scatter_(-1, ids, 1.0).reshape(gate_table.shape[0], -1)


def _check_gate_table(gate_table: torch.Tensor, prior: torch.Tensor) -> None:
    if gate_table.dim() != 3:
        raise ValueError(f"gate_table must be [T, depth, E], got {tuple(gate_table.shape)}")
    steps, depth, experts = gate_table.shape
    if prior.shape != (steps, depth * experts):
        raise ValueError(f"prior must be [T={steps}, depth * E={depth * experts}], "
                         f"got {tuple(prior.shape)}")


@torch.no_grad()
def prior_matching_cost(gate_table: torch.Tensor, prior: torch.Tensor, k: int) -> torch.Tensor:
    """Cost of pairing gate columns with prior columns: [depth * E, depth * E] float32.

    Entry (i, j) is the L1 distance of binary gate column i (block i // E, expert i % E, the top-k
    map of ``gate_table`` [T, depth, E]) and prior column j summed over all T timesteps,
    |G_i| + |P_j| - 2 G_i . P_j: one [DE, T] x [T, DE] GEMM on gate_table's device, exact in float32
    for T < 2**24.
    """
    _check_gate_table(gate_table, prior)
    gates = topk_gate_map(gate_table.detach(), k)
    prior_f = prior.to(device=gates.device, dtype=torch.float32)
    return gates.sum(0)[:, None] + prior_f.sum(0)[None, :] - 2.0 * gates.t() @ prior_f


def solve_prior_matching(cost: torch.Tensor,
                         generator: Optional[torch.Generator] = None) -> np.ndarray:
    """Minimum-cost assignment of a [C, C] CPU cost matrix -> match [C] int64 numpy.

    Rows and columns are shuffled at random before scipy.optimize.linear_sum_assignment so ties
    are broken at random, as the official code does (generator: CPU, default the global one).
    """
    cost_np = cost.numpy().astype(np.float64)
    columns = cost_np.shape[0]
    perm_gate = torch.randperm(columns, generator=generator).numpy()
    perm_prior = torch.randperm(columns, generator=generator).numpy()
    rows, cols = linear_sum_assignment(cost_np[perm_gate][:, perm_prior])
    match = np.empty(columns, dtype=np.int64)
    match[perm_gate[rows]] = perm_prior[cols]
    return match


def match_prior_columns(gate_table: torch.Tensor, prior: torch.Tensor, k: int,
                        generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Bipartite matching of gate columns to prior columns.

    Args:
        gate_table: [T, depth, E] gate probabilities of every timestep (only their top-k is used).
        prior: [T, depth * E] binary prior (`diffusion_prior_mask`).
        k: experts per timestep.
        generator: CPU generator for the tie-breaking shuffle (default: the global one).
    Returns:
        match [depth * E] int64 on prior's device: gate column j (block j // E, expert j % E) is
        paired with prior column match[j].

    `prior_matching_cost` on the device, then `solve_prior_matching` on the host: this waits for
    the device. `PendingPriorMatch` splits the two so the copy overlaps other device work.
    """
    return PendingPriorMatch(gate_table, prior, k).result(generator)


class PendingPriorMatch:
    """The matching of one gate table, started without waiting for the device.

    The constructor queues the cost matrix (`prior_matching_cost`) and its copy into pinned host
    memory on the current stream, and records an event after the copy; `result` waits for that
    event only, not for the whole stream. Started right after the gate table is computed (the
    start of a Switch-DiT forward), the [DE, DE] copy is done long before the prior loss asks for
    it, and the host's linear_sum_assignment runs while the device works through the forward
    already queued (on a 2-core CPU host: 0.15 ms for DE = 36 at S/2 with E = 3, 0.8 ms for DE = 84
    at XL/2, 12 ms for DE = 224 at XL/2 with E = 8). Waiting on the whole stream instead
    (``.cpu()``) would idle the device for the solve and the relaunch of the backward. On a CPU
    device the cost is simply kept.
    """

    def __init__(self, gate_table: torch.Tensor, prior: torch.Tensor, k: int):
        cost = prior_matching_cost(gate_table, prior, k)
        self.device = prior.device
        self._event: Optional[torch.cuda.Event] = None
        if cost.is_cuda:
            self._host_cost = torch.empty(cost.shape, dtype=cost.dtype, pin_memory=True)
            self._host_cost.copy_(cost, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record(torch.cuda.current_stream(cost.device))
        else:
            self._host_cost = cost

    def result(self, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """match [depth * E] int64 on the prior's device (see `match_prior_columns`). May be called
        again: each call solves anew, drawing its tie-breaking shuffle from ``generator``."""
        if self._event is not None:
            self._event.synchronize()
        match = torch.from_numpy(solve_prior_matching(self._host_cost, generator))
        if self.device.type == "cuda":
            # From pinned memory the upload is queued without a stream synchronisation (the
            # caching host allocator keeps the buffer alive until the copy has run).
            return match.pin_memory().to(self.device, non_blocking=True)
        return match.to(self.device)


def jensen_shannon(p: torch.Tensor, q: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Row-wise JS divergence of distributions p, q [B, M] -> [B] (natural log, eps in the logs)."""
    m = (p + q) / 2
    log_m = torch.log(m + eps)
    return ((p * (torch.log(p + eps) - log_m)).sum(1) + (q * (torch.log(q + eps) - log_m)).sum(1)) / 2


def diffusion_prior_loss(gate_probs_all: torch.Tensor, t: torch.Tensor, prior: torch.Tensor, k: int,
                         weight: float = 1.0, generator: Optional[torch.Generator] = None,
                         match: Union[torch.Tensor, "PendingPriorMatch", None] = None,
                         eps: float = 1e-6) -> torch.Tensor:
    """weight * mean_b JSD(gates(t_b) / depth, matched prior row t_b normalised): a scalar.

    Args:
        gate_probs_all: [T, depth, E] gate probabilities of every timestep (differentiable).
        t: [B] int64 timesteps of the batch.
        prior: [T, depth * E] binary prior.  k: experts per timestep.  weight: lambda.
        generator: for the matching's tie-breaking shuffle.
        match: a precomputed `match_prior_columns` result (skips the matching and its host sync),
            or a `PendingPriorMatch` of gate_probs_all (solved here, with ``generator``).
    The gate row of timestep t concatenates all blocks' probabilities and is divided by depth (it
    sums to 1); the prior row, with its columns permuted by the matching, is divided by its sum.
    Gradients reach gate_probs_all only.
    """
    steps, depth, experts = gate_probs_all.shape
    if match is None:
        match = match_prior_columns(gate_probs_all, prior, k, generator)
    elif isinstance(match, PendingPriorMatch):
        match = match.result(generator)
    p = gate_probs_all.float()[t].reshape(t.shape[0], depth * experts) / depth
    q = prior.detach().to(p.device, torch.float32)[t][:, match]
    q = q / q.sum(1, keepdim=True)
    return weight * jensen_shannon(p, q, eps).mean()
