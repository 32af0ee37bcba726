"""Zoo profiles: model size and training budget (``full`` for the demo, ``quick`` for tests)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ZooProfile:
    """Model size and training budget; ``full`` for the demo, ``quick`` for tests."""

    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    base_steps: int
    base_lr: float
    expert_steps: int
    expert_lr: float
    batch_size: int
    bench_items: int
    replay_fraction: float = 0.4      # share of an expert's batch drawn from the base's mixture
    pretrain_task_fraction: float = 0.6  # share of the base's mixture that is task formats
    pretrain_full_fraction: float = 0.35  # share of those at full difficulty (on what the base may know)
    warmup_steps: int = 30


PROFILES: dict[str, ZooProfile] = {
    "full": ZooProfile(
        hidden_size=128, num_layers=4, num_heads=4, intermediate_size=384,
        base_steps=1500, base_lr=3e-3, expert_steps=250, expert_lr=3e-4,
        batch_size=64, bench_items=600,
    ),
    "quick": ZooProfile(
        hidden_size=64, num_layers=4, num_heads=4, intermediate_size=192,
        base_steps=300, base_lr=4e-3, expert_steps=100, expert_lr=2e-3,
        batch_size=64, bench_items=500,
    ),
}

