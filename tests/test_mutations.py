"""The parity suite can fail, checked in every CI run for the newest porting mistakes of
tests.parity.mutations: each, applied in a fresh process, fails the parity test named for it
with an assertion (a mismatch found), not with an error.

`python -m tests.parity.mutations` runs the whole suite once per mistake and lists every test
that fails (docs/parity.md, "Can it fail?"); that takes about an hour, so it runs by hand. Here each
mistake runs one test that catches it, about 15 s a process: the mistakes of the latest pieces
(recalibration, weight averaging, the NNX twin), whose rows of the hand-run tables were each
measured once. The same tests pass without the mistake in the suite itself.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT
from tests.parity.mutations import ENVIRONMENT_VARIABLE, MUTATIONS, NNX_MUTATIONS, TWIN_VARIABLE

pytestmark = pytest.mark.slow  # a fresh process per mistake

CAUGHT_BY = {  # (twin, mistake) -> a test that catches it
    ("linen", "recalibration_with_training_momentum"):
        "tests/parity/test_recalibration.py::test_jax_recalibration_equals_pytorchs[float64-plain]",
    ("linen", "ema_decay_as_one_minus_decay"):
        "tests/parity/test_averaging.py::test_every_update_matches_averaged_model[float64-ema]",
    ("nnx", "dropout_key_reused"):
        "tests/parity/test_nnx.py::test_dropout_is_element_wise_at_its_rate_and_new_at_every_step",
}


@pytest.mark.parametrize(("twin", "mutation"), sorted(CAUGHT_BY))
def test_the_mistake_fails_its_parity_test_with_a_mismatch(twin, mutation, tmp_path):
    assert mutation in (NNX_MUTATIONS if twin == "nnx" else MUTATIONS)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", CAUGHT_BY[twin, mutation], "-q", "-p", "no:cacheprovider", "--no-header",
         "--basetemp", str(tmp_path / "inner")],
        cwd=REPO_ROOT, env={**os.environ, ENVIRONMENT_VARIABLE: mutation, TWIN_VARIABLE: twin}, capture_output=True,
        text=True, timeout=600,
    )
    summary = result.stdout.strip().splitlines()[-1]
    assert result.returncode == 1 and summary.startswith("1 failed in"), result.stdout[-3000:]
    assert "AssertionError" in result.stdout, result.stdout[-3000:]
