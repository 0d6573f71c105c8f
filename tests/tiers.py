"""The two test tiers stay apart: a default-tier test (not marked integration, slow or gpu) that takes longer than
DEFAULT_TIER_SECONDS, its setup included, fails with a line that says to speed it up or move it to the full tier.
`make test` is the tier a developer runs after every change; it only stays fast while nothing slow creeps in."""

from __future__ import annotations

import os

import pytest

DEFAULT_TIER_SECONDS = float(os.environ.get("TRANSFER_DEFAULT_TIER_SECONDS", "20"))
FULL_TIER_MARKERS = ("integration", "slow", "gpu")
SETUP_SECONDS = pytest.StashKey[float]()


def in_default_tier(item: pytest.Item) -> bool:
    return not any(item.get_closest_marker(name) for name in FULL_TIER_MARKERS)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    if call.when == "setup":
        item.stash[SETUP_SECONDS] = call.duration  # a module fixture's setup counts for its first test
    elif call.when == "call" and report.passed and in_default_tier(item):
        took = call.duration + item.stash.get(SETUP_SECONDS, 0.0)
        if took > DEFAULT_TIER_SECONDS:
            report.outcome = "failed"
            report.longrepr = (
                f"{item.nodeid} took {took:.1f} s (setup included), over the default tier's "
                f"{DEFAULT_TIER_SECONDS:g} s: make it faster, or mark it @pytest.mark.integration (make test-all)"
            )
