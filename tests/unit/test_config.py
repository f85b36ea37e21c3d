"""Typed settings refuse bad values with a clear message."""

import pytest
from pydantic import ValidationError

from specedge.config import RedisServiceSettings, ServiceSettings


def test_defaults_are_valid():
    s = RedisServiceSettings()
    assert s.nats_url.startswith("nats://") and s.redis_url.startswith("redis://")


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("nats_url", "http://localhost:4222", "expected a nats://"),
        ("redis_url", "localhost:6379", "expected a redis://"),
        ("log_level", "chatty", "log_level"),
    ],
)
def test_bad_values_are_refused(field, value, message):
    with pytest.raises(ValidationError, match=message):
        RedisServiceSettings(**{field: value})


def test_settings_are_frozen_and_closed():
    s = ServiceSettings(log_level="DEBUG")
    assert s.log_level == "debug"
    with pytest.raises(ValidationError):
        s.nats_url = "nats://elsewhere:4222"
    with pytest.raises(ValidationError):
        ServiceSettings(unknown=1)


def test_sentinel_urls_name_the_sentinels_the_service_and_the_db():
    from specedge.state import sentinel_of

    assert sentinel_of("redis://127.0.0.1:6379/0") is None
    assert sentinel_of("redis+sentinel://10.0.0.1:26379,10.0.0.2:26380/specedge/2") == \
        ([("10.0.0.1", 26379), ("10.0.0.2", 26380)], "specedge", 2)
    assert sentinel_of("redis+sentinel://:secret@h:1/main") == ([("h", 1)], "main", 0)
    with pytest.raises(ValueError, match="redis\\+sentinel://HOST:PORT"):
        sentinel_of("redis+sentinel://h:1/")
