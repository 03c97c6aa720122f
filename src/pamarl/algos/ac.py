"""AC: the actor-critic baseline of Yang et al. 2018 -- MF-AC (:mod:`pamarl.algos.mfac`) with a critic
``Q(o, a)`` that does not see the neighbours' mean action; everything else (team-shared networks,
on-policy updates, terminal transitions kept) is the same."""

from __future__ import annotations

from pamarl.algos.mfac import MFAC
from pamarl.algos.registry import register


@register
class AC(MFAC):
    """Actor-critic with team-shared networks, no mean action."""

    name = "ac"
    paper = "Yang et al. 2018 (AC baseline)"
    mean_action = False
