"""The default tier's time limit (tests/tiers.py) fails a slow unmarked test and leaves the full tier's alone."""

import subprocess
import sys

from tests.conftest import REPO

SLOW_AND_FAST = """
import time
import pytest

def test_slow_in_the_default_tier():
    time.sleep(1.0)

@pytest.mark.integration
def test_slow_in_the_full_tier():
    time.sleep(1.0)

def test_fast():
    pass
"""


def test_a_default_tier_test_over_the_limit_fails_and_says_what_to_do(tmp_path):
    (tmp_path / "test_probe.py").write_text(SLOW_AND_FAST)
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "tests.tiers", "-p", "no:cacheprovider", "-o", "addopts=", "-q",
         "-rf", str(tmp_path / "test_probe.py")],
        cwd=REPO, capture_output=True, text=True, env={"TRANSFER_DEFAULT_TIER_SECONDS": "0.5", "PATH": ""},
    )  # fmt: skip
    assert run.returncode == 1, run.stdout + run.stderr
    assert "1 failed, 2 passed" in run.stdout
    assert (
        "test_slow_in_the_default_tier took" in run.stdout
        and "mark it @pytest.mark.integration (make test-all)" in run.stdout
    )
