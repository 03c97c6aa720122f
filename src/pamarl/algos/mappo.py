"""MAPPO: PPO with a centralised critic V(s), every agent updated simultaneously.

Yu et al. 2022, "The Surprising Effectiveness of PPO in Cooperative Multi-Agent Games". Each agent
maximises the clipped surrogate ``min(r_i A_i, clip(r_i, 1 - eps, 1 + eps) A_i)`` (their eq. 1) with
advantages from a critic over the global state; the schedule is one phase holding every agent.
"""

from __future__ import annotations

from pamarl.algos.onpolicy import OnPolicyAlgorithm
from pamarl.algos.registry import register


@register
class MAPPO(OnPolicyAlgorithm):
    name = "mappo"
    paper = "Yu et al. 2022, The Surprising Effectiveness of PPO in Cooperative Multi-Agent Games"
