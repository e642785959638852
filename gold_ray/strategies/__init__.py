"""Data strategies behind one interface (:class:`Strategy`): ``gold``, ``zerogen``, ``progen``, ``s3``, ``llkd``."""

from __future__ import annotations

from gold_ray.strategies.base import Strategy, StrategyContext, balanced_labels
from gold_ray.strategies.gold import GoldStrategy
from gold_ray.strategies.llkd import LLKDStrategy
from gold_ray.strategies.progen import ProGenStrategy
from gold_ray.strategies.s3 import S3Strategy
from gold_ray.strategies.zerogen import ZeroGenStrategy

STRATEGIES: dict[str, type[Strategy]] = {
    "gold": GoldStrategy,
    "zerogen": ZeroGenStrategy,
    "progen": ProGenStrategy,
    "s3": S3Strategy,
    "llkd": LLKDStrategy,
}


def build_strategy(name: str) -> Strategy:
    """The strategy called ``name``.

    Raises:
        ValueError: ``name`` is not implemented yet; the message lists the ones that are.
    """
    if name not in STRATEGIES:
        raise ValueError(f"strategy.name: {name!r} is not implemented; available: {', '.join(STRATEGIES)}")
    return STRATEGIES[name]()


__all__ = ["STRATEGIES", "Strategy", "StrategyContext", "balanced_labels", "build_strategy"]
