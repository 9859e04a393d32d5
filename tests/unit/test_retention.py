"""Retention: never below Regulation B's 25 months unless explicitly overridden."""

import pytest
from pydantic import ValidationError

from service.settings import DEFAULT_RETENTION_DAYS, MIN_RETENTION_DAYS, Settings


def test_the_default_is_seven_years() -> None:
    assert Settings().retention_days == DEFAULT_RETENTION_DAYS >= 7 * 365
    assert Settings().retention_override is False


def test_the_minimum_covers_any_25_months() -> None:
    # The longest 25 calendar months: two years with a leap day and a 31-day month.
    assert MIN_RETENTION_DAYS == 731 + 31
    assert Settings(retention_days=MIN_RETENTION_DAYS).retention_days == MIN_RETENTION_DAYS


@pytest.mark.parametrize("days", [1, 30, MIN_RETENTION_DAYS - 1])
def test_shorter_retention_is_refused(days: int) -> None:
    with pytest.raises(ValidationError, match=r"retention_days=\d+ .* retention_override=true"):
        Settings(retention_days=days)


def test_shorter_retention_with_the_override() -> None:
    assert Settings(retention_days=30, retention_override=True).retention_days == 30


def test_the_override_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHAPSTREAM_RETENTION_DAYS", "30")
    with pytest.raises(ValidationError, match="SHAPSTREAM_RETENTION_OVERRIDE"):
        Settings()
    monkeypatch.setenv("SHAPSTREAM_RETENTION_OVERRIDE", "true")
    assert Settings().retention_days == 30
