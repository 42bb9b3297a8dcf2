"""The one resume log (map_rows' chunks, the scoring history's epochs, AutoAttack's passes) and the one chunking rule."""

import os

import numpy as np
import pytest

from jax_advprune import parallel, preemption
from jax_advprune.resume_log import ResumeLog


def test_records_round_trip_and_a_reopened_log_sees_what_was_saved_before_it_opened(tmp_path):
    log = ResumeLog(str(tmp_path / "passes"), "pass_", 3)
    assert log.names == set() and log.consecutive() == 0 and not log.has(0)
    log.save(0, rows=np.arange(3), x=np.ones((3, 2), np.float32))
    log.save(2, rows=np.arange(1), x=np.zeros((1, 2), np.float32))
    assert not log.has(0)  # listed when opened: what a run skips is decided once, alike on every process
    assert log.indices(relist=True) == [0, 2]
    (tmp_path / "passes" / "pass_001.npz.tmp").write_bytes(b"half a record")  # an interrupted atomic write
    again = ResumeLog(str(tmp_path / "passes"), "pass_", 3)
    assert sorted(again.names) == ["pass_000.npz", "pass_002.npz"] and again.consecutive() == 1
    loaded = again.load(0)
    np.testing.assert_array_equal(loaded["rows"], np.arange(3))
    assert loaded["x"].dtype == np.float32 and os.path.basename(again.path(7)) == "pass_007.npz"


def test_a_preemption_notice_stops_after_the_save_and_names_what_is_saved(tmp_path):
    log = ResumeLog(str(tmp_path), "chunk_", 6)
    log.stop_if_preempted("1 chunk")  # no notice: goes on
    preemption._notice.set()
    try:
        with pytest.raises(preemption.Preempted, match=r"1 chunk saved in .*rerun the same command"):
            log.stop_if_preempted("1 chunk")
    finally:
        preemption._notice.clear()


@pytest.mark.parametrize(
    "n,chunk,shrink,sizes",
    [(10, 4, False, [4, 4, 4]), (10, 64, True, [16]), (130, 64, True, [64, 64, 8]), (64, 64, True, [64])],
)
def test_chunks_cover_every_row_once_and_pad_with_row_0(n, chunk, shrink, sizes):
    seen = []
    chunks = list(parallel.padded_chunks(n, chunk, shrink_last=shrink))
    assert [len(rows) for rows, _ in chunks] == sizes
    for rows, valid in chunks:
        assert np.all(rows[~valid] == 0)
        seen.extend(rows[valid])
    assert seen == list(range(n))
