"""The service's names for the decision's heads.

A workspace's `head` is "prototype" (nearest prototype) or "logistic" (the L2-normalised
logistic-regression probe, refitted on the workspace's stored examples); the served decision
(`fewshot.decision.ServedDecision`) calls the latter "probe". Everything that decides goes through
`fewshot.decision.decide`.
"""

from __future__ import annotations

from typing import Literal

from fewshot.decision import Head

ServiceHead = Literal["prototype", "logistic"]
SERVICE_HEADS: tuple[ServiceHead, ...] = ("prototype", "logistic")


def head_of(head: ServiceHead) -> Head:
    """A workspace's head name -> the decision's ("logistic" is the probe)."""
    return "probe" if head == "logistic" else "prototype"


def service_head(head: Head) -> ServiceHead:
    """The decision's head name -> a workspace's."""
    return "logistic" if head == "probe" else "prototype"
