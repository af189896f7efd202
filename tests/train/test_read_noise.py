"""dsjax.train.read_noise drops a failed restore's stray asyncio records, and only those."""

import logging

import pytest

from dsjax.train import read_noise


class _Collect(logging.Handler):
  def __init__(self):
    super().__init__()
    self.messages = []

  def emit(self, record):
    self.messages.append(record.getMessage())


@pytest.fixture
def asyncio_records():
  logger = logging.getLogger("asyncio")
  handler = _Collect()
  logger.addHandler(handler)
  read_noise._state["failure_until"] = 0.0
  yield logger, handler.messages
  logger.removeHandler(handler)
  read_noise._state["failure_until"] = 0.0


def _failed_restore():
  with pytest.raises(ValueError):
    with read_noise.quiet_failed_reads():
      raise ValueError("OUT_OF_RANGE: truncated file")


def test_records_outside_any_restore_are_kept(asyncio_records):
  logger, messages = asyncio_records
  logger.error("Future exception was never retrieved")
  with read_noise.quiet_failed_reads():
    pass
  logger.error("Future exception was never retrieved")
  assert len(messages) == 2


def test_fallback_restore_keeps_the_failed_ones_window(asyncio_records):
  # The failing restore of the newest step, then the successful one of an older step: the
  # first one's abandoned futures are collected (and logged) after the second returned.
  logger, messages = asyncio_records
  _failed_restore()
  with read_noise.quiet_failed_reads():
    pass
  logger.error("Future exception was never retrieved")
  logger.error("Task was destroyed but it is pending!")
  assert messages == ["Task was destroyed but it is pending!"]
