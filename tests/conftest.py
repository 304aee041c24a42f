"""Shared fixtures for the test suite."""

from __future__ import annotations

import os

from hypothesis import settings

# Property tests run a bounded number of examples so the suite stays well
# inside CI's budget on a 2-core machine; P2PBACKUP_HYPOTHESIS=thorough runs more.
settings.register_profile("ci", max_examples=60, deadline=None)
settings.register_profile("thorough", max_examples=1000, deadline=None)
settings.load_profile(os.environ.get("P2PBACKUP_HYPOTHESIS", "ci"))
