"""Memory policies: which tokens the video memory keeps when it reaches its budget.

Compression methods and the baselines they are measured against share one interface (`Policy.choose`),
and one registry, `POLICIES`, drives the CLI's --policy and the benchmarks' specs. A policy's settings are
its dataclass fields, with their defaults: the one place they are written.
"""

from __future__ import annotations

import dataclasses

from edge_runtime.policies.base import MemoryFull, Policy, SettingsError
from edge_runtime.policies.full import FullCache
from edge_runtime.policies.infinipot_v import InfiniPotV, TaR, VaN
from edge_runtime.policies.random_tokens import RandomTokens
from edge_runtime.policies.sliding_window import SlidingWindow
from edge_runtime.policies.uniform import Uniform

POLICIES: dict[str, type[Policy]] = {
    cls.name: cls for cls in (FullCache, InfiniPotV, SlidingWindow, Uniform, RandomTokens, TaR, VaN)
}


def settings_of(cls: type[Policy]) -> dict[str, dataclasses.Field]:
    """A policy's settings by field name."""
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


def make_policy(name: str, **settings: object) -> Policy:
    """A policy by its name, given settings; those it has no field for are left out (the CLI passes all)."""
    if name not in POLICIES:
        raise SettingsError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}")
    cls = POLICIES[name]
    fields = settings_of(cls)
    return cls(**{k: v for k, v in settings.items() if k in fields and v is not None})


def policy_from_spec(spec: str, seed: int = 0) -> Policy:
    """A policy from a benchmark spec: a name, optionally with settings after a colon.

    "infinipot-v", "infinipot-v:alpha=0.9", "infinipot-v:alpha=0.75+recent=0.25+pool" ('+' joins settings, so
    that a comma-separated list of specs stays one; a bare name sets a yes/no setting).
    """
    name, _, rest = spec.partition(":")
    if name not in POLICIES:
        raise SettingsError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}")
    cls = POLICIES[name]
    tunable = {k: f for k, f in settings_of(cls).items() if k != "seed"}
    words = {**{k: k for k in tunable}, **cls.aliases}
    kinds = {"bool": bool, "int": int, "float": float}  # field types as strings (from __future__ import annotations)
    kwargs: dict = {}
    for item in filter(None, (part.strip() for part in rest.split("+"))):
        if not tunable:
            raise SettingsError(f"{spec!r}: {name} takes no settings; only InfiniPot-V, its halves (tar, van) and "
                                "sliding-window (sink_tokens) do")
        key, eq, value = item.partition("=")
        field = tunable.get(words.get(key, ""))
        kind = kinds.get(str(field.type)) if field is not None else None
        if kind is None or bool(eq) == (kind is bool):
            usage = ", ".join(w if kinds.get(str(tunable[f].type)) is bool else f"{w}=N" for w, f in words.items()
                              if w == min((x for x, y in words.items() if y == f), key=len))
            raise SettingsError(f"bad setting {item!r} in policy {spec!r}: use {usage}")
        try:
            kwargs[field.name] = True if kind is bool else kind(value)
        except ValueError:
            raise SettingsError(f"bad value in {item!r} of policy {spec!r}: give a number") from None
    return make_policy(name, seed=seed, **kwargs)


__all__ = ["POLICIES", "FullCache", "InfiniPotV", "MemoryFull", "Policy", "RandomTokens", "SettingsError",
           "SlidingWindow", "TaR", "Uniform", "VaN", "make_policy", "policy_from_spec", "settings_of"]
