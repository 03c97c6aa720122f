"""HAA2C: heterogeneous-agent advantage actor-critic, one agent after another.

Zhong et al. 2024, "Heterogeneous-Agent Reinforcement Learning" (JMLR), section 3.5: HAA2C is the
instance of Heterogeneous-Agent Mirror Learning with a zero drift functional, agents updated in a
random order, each ascending the plain (unclipped) sequential surrogate of their Proposition 11 / eq. 10::

    L_{i_m}(theta) = E[ M_{i_1:m}(s, a) * pi_{i_m}^theta(a_{i_m} | o) / pi_{i_m}^old(a_{i_m} | o) * A(s, a) ]

with ``M`` the product of the ratios of the agents updated before it (the schedule's factor ``F``).
As in HARL's ``haa2c.py``, the actor loss is ``-L - c_ent * H(pi_{i_m})``, minimised with Adam for
``epochs`` passes (HARL's ``a2c_epoch``, default 5) of ``minibatches`` minibatches with gradient-norm
clipping. At the first gradient step the ratio is 1 and this is exactly the A2C policy gradient
``E[F * A * grad log pi]``; later passes reweight by the ratio because the batch is off-policy by then.

The schedule comes from :class:`~pamarl.algos.happo.SequentialMixin`; only the surrogate is HAA2C's.
"""

from __future__ import annotations

import torch

from pamarl.algos.common import masked_mean
from pamarl.algos.happo import SequentialMixin
from pamarl.algos.onpolicy import OnPolicyAlgorithm
from pamarl.algos.registry import register


def a2c_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, factor: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample and agent ``F * r * A`` with ``r = exp(logp - old_logp)`` (no clipping); returns (objective, r).

    Shapes: ``logp``, ``old_logp``, ``adv`` ``[B, k]``; ``factor`` ``[B]``.
    """
    ratio = torch.exp(logp - old_logp)
    return factor.unsqueeze(-1) * ratio * adv, ratio


def a2c_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, factor: torch.Tensor,
             entropy: torch.Tensor, mask: torch.Tensor, entropy_coef: float) -> torch.Tensor:
    """Per-agent HAA2C actor loss ``[k]``: ``-mean(F r A) - c_ent * mean(H)`` over the active samples."""
    obj, _ = a2c_surrogate(logp, old_logp, adv, factor)
    return -masked_mean(obj, mask) - entropy_coef * masked_mean(entropy, mask)


@register
class HAA2C(SequentialMixin, OnPolicyAlgorithm):
    """Sequential schedule + unclipped factor-weighted advantage actor-critic step.

    The base class's gradient step rule (:meth:`OnPolicyAlgorithm.actor_step`: epochs, minibatches,
    entropy bonus, per-agent gradient clipping and optimiser) is reused; its loss per agent is then
    exactly :func:`a2c_loss`. The logged ``clipfrac`` is only the share of ratios that left ``1 +- clip``
    (a drift diagnostic: nothing is clipped).
    """

    name = "haa2c"
    paper = "Zhong et al. 2024, Heterogeneous-Agent Reinforcement Learning (JMLR), HAA2C"

    def surrogate(self, logp: torch.Tensor, old: torch.Tensor, adv: torch.Tensor, factor: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        return a2c_surrogate(logp, old, adv, factor)
