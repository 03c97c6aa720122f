"""IPPO: independent PPO, each agent with a critic over its own observation.

de Witt et al. 2020, "Is Independent Learning All You Need in the StarCraft Multi-Agent Challenge?".
The same clipped surrogate as MAPPO, but ``V_i`` sees only ``o_i`` (``critic_input = "obs"``).
"""

from __future__ import annotations

from dataclasses import dataclass

from pamarl.algos.onpolicy import OnPolicyAlgorithm, OnPolicyConfig
from pamarl.algos.registry import register


@dataclass
class IPPOConfig(OnPolicyConfig):
    critic_input: str = "obs"
    """What V_i sees: local observations for independent learners."""


@register
class IPPO(OnPolicyAlgorithm):
    name = "ippo"
    Config = IPPOConfig
    paper = "de Witt et al. 2020, Is Independent Learning All You Need in the StarCraft Multi-Agent Challenge?"
