"""A soak that stays in the suite: the realtime graph on the real ComfyUI server, 2,000 executions back to back, its
frame from Load Image; and 1,000 with the frame from Stream Frame Input, new frames posted all along by a thread (as
the node's camera posts them), each execution waiting for a new one.

Asserted: no execution fails, and the server's resident memory does not grow with the executions (the
least-squares slope over the samples after the first window stays under a bound far below what a leak of
one frame per execution would give: a 64x64 float32 frame is 48 KB, so 48 MB per 1,000 executions).
The GPU version (10,000 executions with compile) is ``scripts/soak.py`` on the GPU machine (BENCHMARKS.md).
"""

from __future__ import annotations

import logging
import os

import pytest
from comfy_harness import ComfyServer
from soak import soak
from stream_helpers import E2E_MODEL, E2E_TAESD, first_cache_mode

pytestmark = [pytest.mark.e2e, pytest.mark.parametrize("comfy_server", [first_cache_mode()], indirect=True)]

EXECUTIONS = int(os.environ.get("STREAMRT_SOAK_EXECUTIONS", "2000"))
POSTED_EXECUTIONS = EXECUTIONS // 2
#: MB of server RSS per 1,000 executions (measured slope on this machine: well under 1)
RSS_SLOPE_BOUND = 4.0

logger = logging.getLogger(__name__)


@pytest.mark.parametrize("posted", [False, True], ids=["load-image", "posted-frames"])
def test_realtime_soak(comfy_server: ComfyServer, e2e_tiny_models, posted: bool):
    executions = POSTED_EXECUTIONS if posted else EXECUTIONS
    result = soak(comfy_server, executions=executions, model=E2E_MODEL, taesd=E2E_TAESD, acceleration="auto",
                  window=250, posted=posted, log=logger.info)
    slope = result.slope_mb_per_1000()
    logger.info("soak: %d executions in %.1f s (%.1f/s), RSS slope %s MB per 1,000, samples %s",
                result.executions, result.seconds, result.executions_per_second, slope, result.samples)
    assert result.executions == executions
    assert not result.failures, result.failures[:5]
    if posted:  # the frames kept coming, and every post was taken
        assert result.poster.posted > executions / 4 and not result.poster.errors, result.poster.errors[:5]
    assert slope is not None and slope < RSS_SLOPE_BOUND, (slope, result.samples)
