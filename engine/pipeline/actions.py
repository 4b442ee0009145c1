"""The schedule IR: one `Action` per step of a pipeline rank, and its text form.

The model is cut into S = pp * v *stages* (global virtual-stage index s = 0..S-1); stage s lives
on rank s % pp as that rank's local chunk s // pp (round-robin placement, Narayanan et al. 2021,
https://arxiv.org/abs/2104.04473). An action names a stage, a `Kind` and a micro-batch:

  compute  F (forward), B (full backward), or for zero-bubble schedules I (backward for the input)
           and W (backward for the weights) as separate actions (Qi et al. 2023,
           https://arxiv.org/abs/2401.10241);
  p2p      SF / RF (send / receive a stage's output activation), SB / RB (send / receive the
           gradient of a stage's input). `stage` is always a stage owned by the acting rank:
           SF(s, mb) pairs with RF(s + 1, mb), SB(s, mb) pairs with RB(s - 1, mb).

The text form puts the stage first, as torch.distributed.pipelining's `_Action` does: "1F3" is
stage 1's forward of micro-batch 3, "0SF2" stage 0 sending micro-batch 2's activation.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Container, Sequence


class Kind(StrEnum):
    """What an action does. A StrEnum, so a kind compares, sorts and prints as its letters."""
    F = "F"
    B = "B"
    I = "I"     # noqa: E741 (the paper's name)
    W = "W"
    SF = "SF"
    RF = "RF"
    SB = "SB"
    RB = "RB"

    @property
    def is_compute(self) -> bool:
        return len(self) == 1

    @property
    def is_send(self) -> bool:
        return self in (Kind.SF, Kind.SB)

    @property
    def is_recv(self) -> bool:
        return self in (Kind.RF, Kind.RB)


COMPUTE = tuple(k for k in Kind if k.is_compute)
P2P = tuple(k for k in Kind if not k.is_compute)
FORWARD_ONLY = (Kind.F, Kind.SF, Kind.RF)     # what evaluation keeps of a list
_PEER = {Kind.SF: (+1, Kind.RF), Kind.RF: (-1, Kind.SF), Kind.SB: (-1, Kind.RB), Kind.RB: (+1, Kind.SB)}


@dataclass(frozen=True, order=True)
class Action:
    """One step of one rank: global virtual `stage`, `kind`, micro-batch `mb` (text "1F3")."""
    stage: int
    kind: Kind
    mb: int

    def __post_init__(self):
        if self.kind not in Kind.__members__:
            raise ValueError(f"unknown action kind {self.kind!r}; expected one of {', '.join(Kind)}")
        object.__setattr__(self, "kind", Kind(self.kind))

    def __str__(self) -> str:
        return f"{self.stage}{self.kind}{self.mb}"

    def __repr__(self) -> str:
        return f"Action({str(self)!r})"

    @property
    def is_compute(self) -> bool:
        return self.kind.is_compute

    @property
    def is_p2p(self) -> bool:
        return not self.kind.is_compute

    @property
    def peer_stage(self) -> int:
        """The stage on the other end of a p2p action."""
        return self.stage + _PEER[self.kind][0]

    def partner(self) -> Action:
        """The matching p2p action on the peer rank."""
        return Action(self.peer_stage, _PEER[self.kind][1], self.mb)


def parse_action(text: str) -> Action:
    """Inverse of str(Action): "1F3" -> Action(1, "F", 3)."""
    match = re.fullmatch(r"(\d+)([A-Z]+)(\d+)", text)
    if not match:
        raise ValueError(f"cannot parse action {text!r}; expected <stage><kind><micro-batch>, e.g. '1F3'")
    return Action(int(match[1]), match[2], int(match[3]))


def format_actions(actions: Sequence[Sequence[Action]], *, compute_only: bool = False) -> str:
    """One line per rank, e.g. "rank 0: 0F0 0SF0 0F1 ...", for humans and test failures."""
    lines = []
    for r, acts in enumerate(actions):
        shown = [a for a in acts if a.is_compute or not compute_only]
        lines.append(f"rank {r}: " + " ".join(str(a) for a in shown))
    return "\n".join(lines)


def split_backwards(actions) -> frozenset[tuple[int, int]]:
    """The (stage, micro-batch) pairs whose backward is split into I + W (every other backward is
    one B). Most schedules use one form throughout; DualPipeV mixes them."""
    return frozenset((a.stage, a.mb) for acts in actions for a in acts if a.kind in (Kind.I, Kind.W))


def backward_kind(split: bool | Container[tuple[int, int]], stage: int, mb: int) -> Kind:
    """I when that backward is split (``split`` True for all, or the set of split pairs), else B."""
    return Kind.I if (split is True or (not isinstance(split, bool) and (stage, mb) in split)) else Kind.B


def deps(a: Action, n_stages: int, split: bool | Container[tuple[int, int]]) -> list[Action]:
    """Compute actions that must finish before compute action `a` (possibly on other ranks);
    `split`: which backwards are I + W (zero-bubble) rather than B — True for all, False for none,
    or the set of (stage, micro-batch) pairs (`split_backwards`)."""
    if a.kind == Kind.F:
        return [Action(a.stage - 1, Kind.F, a.mb)] if a.stage > 0 else []
    if a.kind in (Kind.B, Kind.I):
        out = [Action(a.stage, Kind.F, a.mb)]
        if a.stage < n_stages - 1:
            out.append(Action(a.stage + 1, backward_kind(split, a.stage + 1, a.mb), a.mb))
        return out
    return [Action(a.stage, Kind.I, a.mb)]    # W
