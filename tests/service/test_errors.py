"""How errors are logged: expected 503/504 in one line, real failures with their traceback."""

from __future__ import annotations

import logging

import pytest

from service.batching import DeadlineExceeded
from service.errors import error_response


def test_a_missed_deadline_is_one_warning_line(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="service.errors"):
        response = error_response(DeadlineExceeded("deadline passed"))
    assert response.status_code == 504
    (record,) = caplog.records
    assert record.levelno == logging.WARNING and record.exc_info is None
    assert "504 deadline_exceeded" in record.getMessage()


def test_an_unexpected_exception_is_logged_with_its_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    try:
        raise RuntimeError("boom")
    except RuntimeError as exc:
        with caplog.at_level(logging.WARNING, logger="service.errors"):
            response = error_response(exc)
    assert response.status_code == 500
    (record,) = caplog.records
    assert record.levelno == logging.ERROR and record.exc_info is not None
    assert b"boom" not in response.body  # the client gets a generic message
