"""Memory policies: which tokens the video memory keeps when it reaches its budget.

Compression methods and the baselines they are measured against share one interface (`Policy.select`),
so the benchmarks loop over `POLICIES`.
"""

from __future__ import annotations

from edge_runtime.policies.base import MemoryFull, Policy, SettingsError
from edge_runtime.policies.full import FullCache
from edge_runtime.policies.infinipot_v import InfiniPotV, TaR, VaN
from edge_runtime.policies.random_tokens import RandomTokens
from edge_runtime.policies.sliding_window import SlidingWindow
from edge_runtime.policies.uniform import Uniform

POLICIES: dict[str, type[Policy]] = {
    cls.name: cls for cls in (FullCache, InfiniPotV, SlidingWindow, Uniform, RandomTokens, TaR, VaN)
}



def make_policy(name: str, alpha: float = 0.5, recent_fraction: float = 0.125, pool: bool = False,
                seed: int = 0, sink_tokens: int = 4) -> Policy:
    """A policy by its name, given the settings that apply to it."""
    if name not in POLICIES:
        raise SettingsError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}")
    cls = POLICIES[name]
    if issubclass(cls, InfiniPotV):
        return cls(alpha=alpha, recent_fraction=recent_fraction, pool=pool)
    if cls is RandomTokens:
        return RandomTokens(seed=seed)
    if cls is SlidingWindow:
        return SlidingWindow(sink_tokens=sink_tokens)
    return cls()


__all__ = ["POLICIES", "FullCache", "InfiniPotV", "MemoryFull", "Policy", "RandomTokens", "SettingsError",
           "SlidingWindow", "TaR", "Uniform", "VaN", "make_policy"]
