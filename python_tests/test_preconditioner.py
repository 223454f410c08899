"""Feature shards and the ridge-preconditioned step direction (wise_ext/preconditioner.py)."""
import pytest
import torch

from wise_ext import ops
from wise_ext.preconditioner import ridge_preconditioner, second_moment, shard_features, step_direction


def test_shard_features_are_the_shard_mask_over_features():
    keep = shard_features(1000, 0.2, seed=7)
    assert torch.equal(keep, ops.shard_mask((1000,), 0.2, 7))
    assert torch.equal(keep, shard_features(1000, 0.2, seed=7))
    assert not torch.equal(keep, shard_features(1000, 0.2, seed=8))
    assert 150 < int(keep.sum()) < 250


def test_a_shard_is_never_empty():
    for seed in range(50):
        assert shard_features(3, 0.01, seed).any()


def test_ridge_preconditioner_matches_its_formula():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(40, 13, generator=gen)
    moment = second_moment(a)
    torch.testing.assert_close(moment, a.T @ a)
    features = torch.rand(13, generator=gen) < 0.6
    eps = 0.05
    k = moment[features][:, features].double()
    lam = eps * k.diagonal().mean()
    expected = lam * torch.linalg.inv(k + lam * torch.eye(k.shape[0], dtype=torch.float64))
    torch.testing.assert_close(ridge_preconditioner(moment, features, eps), expected.float(), rtol=1e-5, atol=1e-6)


def test_nothing_to_protect_gives_plain_sgd():
    features = torch.ones(5, dtype=torch.bool)
    assert torch.equal(ridge_preconditioner(torch.zeros(5, 5), features, 0.01), torch.eye(5))


@pytest.mark.parametrize("transpose", [False, True])
def test_step_direction_lives_on_the_shard_features(transpose):
    gen = torch.Generator().manual_seed(1)
    grad = torch.randn(6, 9, generator=gen)
    features = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0, 1], dtype=torch.bool)
    a = torch.randn(30, 9, generator=gen)
    precond = ridge_preconditioner(second_moment(a), features, 0.1)
    step = step_direction(grad, features, precond, transpose=False)
    assert torch.equal(step[:, ~features], torch.zeros_like(step[:, ~features]))
    torch.testing.assert_close(step[:, features], grad[:, features] @ precond)
    # GPT-2's Conv1D stores the transpose: the same step, transposed.
    torch.testing.assert_close(step_direction(grad.T.contiguous(), features, precond, transpose=True), step.T)
    assert torch.equal(step_direction(grad, features, None, False)[:, features], grad[:, features])
    # No feature subset (entry shards): the whole gradient, preconditioned over every feature.
    full = ridge_preconditioner(second_moment(a), None, 0.1)
    torch.testing.assert_close(step_direction(grad, None, full, transpose=False), grad @ full)
    torch.testing.assert_close(step_direction(grad.T.contiguous(), None, full, transpose=True), (grad @ full).T)
    assert step_direction(grad, None, None, False) is grad


def test_a_preconditioned_step_spares_the_protected_inputs():
    """One step on an edit's input moves the protected inputs' outputs far less
    relative to the edit's own than plain SGD does: the point of the preconditioner."""
    gen = torch.Generator().manual_seed(2)
    d_in, d_out = 48, 16
    basis = torch.randn(8, d_in, generator=gen)
    protected = torch.randn(200, 8, generator=gen) @ basis        # unrelated texts live in 8 directions
    edit = torch.randn(d_in, generator=gen) + 0.5 * basis[0]      # the edit shares some of them
    grad = torch.outer(torch.randn(d_out, generator=gen), edit)   # dL/dW for one token: delta a^T
    features = torch.ones(d_in, dtype=torch.bool)
    precond = ridge_preconditioner(second_moment(protected) / 200, features, 0.01)

    def spill(step):
        return float((protected @ step.T).norm(dim=1).mean() / (step @ edit).norm())

    plain, ridge = step_direction(grad, features, None, False), step_direction(grad, features, precond, False)
    assert spill(ridge) < 0.05 * spill(plain)
