"""Shared test configuration: Hypothesis profiles and small fixtures.

``CI=true`` selects the ``ci`` profile (at least 200 examples for the property
tests); locally the ``dev`` profile keeps the suite quick.
"""

from __future__ import annotations

import os

import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=200,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "dev",
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("ci" if os.environ.get("CI", "").lower() in ("1", "true") else "dev")

torch.set_num_threads(1)
