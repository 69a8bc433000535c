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
SPEC_SETTINGS = {"alpha": ("alpha", float), "recent": ("recent_fraction", float), "pool": ("pool", bool),
                 "shared": ("shared", bool)}


def make_policy(name: str, alpha: float = 0.5, recent_fraction: float = 0.125, pool: bool = False,
                seed: int = 0, sink_tokens: int = 4, shared: bool = False) -> Policy:
    """A policy by its name, given the settings that apply to it."""
    if name not in POLICIES:
        raise SettingsError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}")
    cls = POLICIES[name]
    if issubclass(cls, InfiniPotV):
        return cls(alpha=alpha, recent_fraction=recent_fraction, pool=pool, shared=shared)
    if cls is RandomTokens:
        return RandomTokens(seed=seed)
    if cls is SlidingWindow:
        return SlidingWindow(sink_tokens=sink_tokens)
    return cls()


def policy_from_spec(spec: str, seed: int = 0) -> Policy:
    """A policy from a benchmark spec: a name, optionally with InfiniPot-V settings after a colon.

    "infinipot-v", "infinipot-v:alpha=0.9", "infinipot-v:alpha=0.75+recent=0.25+pool" ('+' joins settings, so
    that a comma-separated list of specs stays one).
    """
    name, _, rest = spec.partition(":")
    kwargs: dict = {}
    for item in filter(None, (part.strip() for part in rest.split("+"))):
        key, eq, value = item.partition("=")
        flag = SPEC_SETTINGS.get(key, ("", float))[1] is bool
        if key not in SPEC_SETTINGS or bool(eq) == flag:
            raise SettingsError(f"bad setting {item!r} in policy {spec!r}: use alpha=A, recent=R, pool or shared")
        arg, kind = SPEC_SETTINGS[key]
        try:
            kwargs[arg] = True if kind is bool else kind(value)
        except ValueError:
            raise SettingsError(f"bad value in {item!r} of policy {spec!r}: give a number") from None
    if kwargs and (name not in POLICIES or not issubclass(POLICIES[name], InfiniPotV)):
        raise SettingsError(f"{spec!r}: only InfiniPot-V and its halves (tar, van) take settings")
    return make_policy(name, seed=seed, **kwargs)


__all__ = ["POLICIES", "FullCache", "InfiniPotV", "MemoryFull", "Policy", "RandomTokens", "SettingsError",
           "SlidingWindow", "TaR", "Uniform", "VaN", "make_policy", "policy_from_spec"]
