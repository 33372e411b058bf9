r"""Training objectives, each written once. All return per-point values (N,) in nats.

Shapes: ``log_joint`` is :math:`\log \pi_k + \log p_k(x)`, (N, K); ``log_q`` is
:math:`\log q(k \mid x)`, (N, K); ``y`` holds labels in [-1, K) with -1 = unlabelled.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["elbo", "labelled_loss", "marginal_nll", "mixture_loss", "unlabelled_loss"]


def elbo(log_joint: Tensor, log_q: Tensor) -> Tensor:
    r"""ELBO per point, summed exactly over K (no sampling).

    .. math:: \sum_k q(k|x) [\log \pi_k + \log p_k(x)] - \sum_k q(k|x) \log q(k|x)

    (model term minus guide term). It equals log p(x) when q is the exact posterior.
    Components with q(k|x) = 0 contribute 0, also where log p_k(x) = -inf (the
    inputs are masked, not the products, so that gradients stay finite too).
    """
    q = log_q.exp()
    used = q > 0
    log_joint = torch.where(used, log_joint, 0.0)
    log_q = torch.where(used, log_q, 0.0)
    return (q * log_joint).sum(-1) - (q * log_q).sum(-1)


def labelled_loss(log_joint: Tensor, log_q: Tensor, y: Tensor, alpha: float) -> Tensor:
    r"""Loss of labelled points: :math:`-(\log \pi_y + \log p_y(x)) + \alpha\,\mathrm{CE}(q, y)`.

    The cross-entropy :math:`-\log q(y|x)` is *minimised* (one public
    implementation flips its sign, which trains q away from the labels).
    """
    index = y.clamp_min(0)[:, None]
    return -log_joint.gather(1, index)[:, 0] - alpha * log_q.gather(1, index)[:, 0]


def marginal_nll(log_joint: Tensor) -> Tensor:
    """Exact negative log-likelihood -log p(x) = -logsumexp_k log_joint (soft EM)."""
    return -torch.logsumexp(log_joint, dim=-1)


def unlabelled_loss(log_joint: Tensor, log_q: Tensor, *, alpha: float, objective: str) -> Tensor:
    """Loss of unlabelled points:

    * ``"elbo"``: -ELBO (q trained through the bound);
    * ``"marginal"``: -log p(x), plus alpha * CE(q, exact posterior) so that the
      amortised q still learns (the posterior is detached: it is a target only).
    """
    if objective == "elbo":
        return -elbo(log_joint, log_q)
    if objective != "marginal":  # a string compare: free, also under torch.compile
        raise ValueError(f"objective must be 'elbo' or 'marginal', got {objective!r}")
    target = torch.softmax(log_joint.detach(), dim=-1)
    return marginal_nll(log_joint) - alpha * (target * log_q).sum(-1)


def mixture_loss(
    log_joint: Tensor,
    log_q: Tensor,
    y: Tensor,
    *,
    alpha: float,
    objective: str = "elbo",
    log_q_unlabelled: Tensor | None = None,
) -> Tensor:
    """Per-point loss of a (semi-)supervised mixture: :func:`labelled_loss` where y >= 0,
    else :func:`unlabelled_loss` with ``log_q_unlabelled`` (default ``log_q``).

    Both branches run on every row; the unlabelled one sees log_joint = 0 on labelled
    rows, so that a log p_k(x) = -inf there cannot send 0 * inf = NaN gradients to q
    through the branch that is not taken.
    """
    # alpha < 0 would maximise the cross-entropy (a sign bug of one public implementation). Checked
    # eagerly only: under torch.compile a symbolic float's check breaks the graph.
    if not torch.compiler.is_compiling() and not alpha >= 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    is_labelled = y >= 0
    labelled = labelled_loss(log_joint, log_q, y, alpha)
    unlabelled = unlabelled_loss(
        torch.where(is_labelled[:, None], 0.0, log_joint),
        log_q if log_q_unlabelled is None else log_q_unlabelled,
        alpha=alpha,
        objective=objective,
    )
    return torch.where(is_labelled, labelled, unlabelled)
