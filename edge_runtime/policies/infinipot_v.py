"""InfiniPot-V and its two halves (Kim et al., NeurIPS 2025, https://arxiv.org/abs/2506.15745).

Scores per (layer, KV head), never averaged across them:
- TaR (temporal-axis redundancy) on keys: minus the mean cosine of a past token's key to the keys of the
  same patch in the r most recent frames. Keys are compared un-rotated (at position 0): with 1-D RoPE the
  same patch sits at a different position in every frame, and the rotation would hide the redundancy.
- VaN (value norm): the L2 norm of the token's value, optionally averaged over a k x k window of its frame
  (k = 7, 5, 3, 1 from the first to the last quarter of layers).
Selection: the r recent frames always stay; alpha |C| tokens (recent ones included) go to the highest TaR,
the rest of |C| to the highest VaN. Ties go to the older slot. The scoring runs in native code
(native/kv_pass.cpp), since only it reads the keys and values; tests/reference_infinipot_v.py is the NumPy
oracle it is checked against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from edge_runtime import _native
from edge_runtime.policies.base import Policy, SettingsError, recent_frames

if TYPE_CHECKING:
    from edge_runtime.memory import VideoMemory


@dataclass
class InfiniPotV(Policy):
    """TaR + VaN, the paper's method."""

    name = "infinipot-v"
    paper = "https://arxiv.org/abs/2506.15745"
    aliases = {"recent": "recent_fraction"}
    use_tar: ClassVar[bool] = True
    use_van: ClassVar[bool] = True

    alpha: float = 0.5  # share of |C| chosen by TaR; the paper finds 0.4-0.6 best
    recent_fraction: float = 0.125  # r = 0.125 f in the paper; its public code uses 0.25
    pool: bool = False  # spatial pooling of VaN: helps in the paper, off in its reference code
    # One token set for every (layer, head), the slots most (layer, head) choices agree on. Not the paper's (it
    # keeps per-head sets): an ablation of whether per-head sets matter to a model trained on whole memories
    # (results/edge-vlm-v2/recall_120_tuning.json: on edge-vlm v2 they do not).
    shared: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise SettingsError(f"alpha must be in [0, 1], not {self.alpha}")
        if not 0.0 < self.recent_fraction <= 1.0:
            raise SettingsError(f"the recent-frame fraction must be in (0, 1], not {self.recent_fraction}")

    def check(self, memory: VideoMemory, keep: int) -> None:
        if self.pool and memory.records and memory.records[-1].wrapper_tokens:
            raise SettingsError("VaN pooling needs a frame's tokens on its patch grid, and this model wraps each "
                                "frame in text tokens: drop --pool")
        p = memory.tokens_per_frame
        r = min(max(1, round(self.recent_fraction * memory.budget / p)), memory.frames_since_pass)
        protected = math.floor(self.alpha * keep) if self.use_tar and self.use_van else keep
        if protected < r * p:
            raise SettingsError(f"|C| = {keep} tokens with alpha {self.alpha} cannot hold the {r} recent frames "
                                f"({r * p} tokens): raise --alpha or --budget, or lower the recent fraction")

    def choose(self, memory: VideoMemory, keep: int) -> _native.ScoreParams:
        s = _native.ScoreParams()
        s.nx, s.ny = memory.grid
        s.recent_min_frame = recent_frames(memory, self.recent_fraction)
        s.keep, s.alpha, s.pool, s.shared = keep, self.alpha, self.pool, self.shared
        s.use_tar, s.use_van = self.use_tar, self.use_van
        return s


@dataclass
class TaR(InfiniPotV):
    """TaR alone: keep the recent frames and the past tokens least like them (the paper's ablation)."""

    name = "tar"
    use_van = False


@dataclass
class VaN(InfiniPotV):
    """VaN alone: keep the recent frames and the past tokens with the largest value norms (ablation)."""

    name = "van"
    use_tar = False
