"""Unit tests for luigi_celery.redaction: no password, nor a piece of one, in what luigi-celery prints."""

from __future__ import annotations

import pytest
import redis

from luigi_celery.app import check_broker_url
from luigi_celery.errors import BrokerUnavailable, ConfigError
from luigi_celery.redaction import needs_encoding, passwords_in, redact, scrub
from luigi_celery.sender import check_broker
from luigi_celery.store_redis import RedisStore

# --- redact: the URLs luigi-celery shows ---------------------------------------------


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        pytest.param("redis://:p@ssw0rd@host:6379/0", "redis://:****@host:6379/0", id="@"),
        pytest.param("redis://:pa/ss@host:6379/0", "redis://:****@host:6379/0", id="/"),
        pytest.param("amqp://guest:p@ss/word@host:5672//", "amqp://guest:****@host:5672//", id="@ and /"),
        pytest.param("amqp://user:pa:ss@host//", "amqp://user:****@host//", id=":"),
        pytest.param("amqp://user:pa?ss#x@y@host//", "amqp://user:****@host//", id="? # and @"),
        pytest.param("amqp://user:pa;ss@host//", "amqp://user:****@host//", id="; not before a URL"),
        pytest.param("amqp://me@example.com:pass@host//", "amqp://me@example.com:****@host//", id="@ in the user"),
    ],
)
def test_redact_hides_the_whole_password_whatever_it_holds(url: str, shown: str) -> None:
    # Given a URL whose password holds a character that also separates the parts of a URL
    # When it is redacted
    text = redact(url)

    # Then all of the password is gone, and the user, host and path are still there
    assert text == shown


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://127.0.0.1:6379/0?password=hunter22", "redis://127.0.0.1:6379/0?password=****"),
        ("redis://h:6379/0?ssl_cert_reqs=none&password=hun&ter&db=2", "redis://h:6379/0?ssl_cert_reqs=none&password=****&ter&db=2"),
        ("sentinel://h:26379?sentinel_password=hunter22", "sentinel://h:26379?sentinel_password=****"),
        ("http://api/?token=hunter22&x=1", "http://api/?token=****&x=1"),
        ("http://api/?client_secret=hunter22", "http://api/?client_secret=****"),
    ],
)  # fmt: skip
def test_redact_hides_a_password_in_the_query(url: str, shown: str) -> None:
    # Given a URL with a password, secret or token as a query parameter / When it is redacted
    # Then its value is hidden, and the other parameters are not
    assert redact(url) == shown


def test_redact_hides_every_password_of_a_failover_list_even_one_with_a_semicolon() -> None:
    # Given a failover list whose passwords hold ';', '@' and '/'
    url = "amqp://u:se;cret@h1//;amqp://u:s@c/ret@h2//; amqp://u:x@h3//"

    # When it is redacted
    text = redact(url)

    # Then each URL is there, with its password hidden
    assert text == "amqp://u:****@h1//;amqp://u:****@h2//; amqp://u:****@h3//"


def test_an_at_sign_in_the_query_hides_too_much_rather_than_too_little() -> None:
    # Given a URL without a password but with an '@' after the host (ambiguous with a password)
    # When it is redacted / Then what could be a password is hidden
    assert redact("redis://host:6379/0?note=a@b") == "redis://host:****@b"


# --- scrub: text luigi-celery did not write ------------------------------------------


def test_scrub_removes_a_piece_of_the_password_a_library_quotes() -> None:
    # Given kombu's error for a password with a '/' that was not percent-encoded
    url = "redis://:Zq9k/Xv7w@127.0.0.1:6379/0"
    message = "Port could not be cast to integer value as 'Zq9k'"

    # When it is scrubbed
    text = scrub(message, urls=[url])

    # Then the piece of the password is gone
    assert text == "Port could not be cast to integer value as '****'"
    # (but not a piece of one or two characters: it would take letters out of every other word)
    assert scrub("port 'pa' is no number", urls=["redis://:pa/ss@h/0"]) == "port 'pa' is no number"


def test_scrub_removes_the_password_as_given_decoded_and_encoded_and_any_url_quoted() -> None:
    # Given a library's message quoting the password in every form, and a URL of its own
    url = "redis://:hun%2Fter22@h:6379/0"
    message = "auth hun%2Fter22 / hun/ter22 / hun%2Fter22 failed for redis://:other99@h:6379/0."

    # When it is scrubbed
    text = scrub(message, urls=[url])

    # Then no form of either password is left, and the sentence still reads
    assert "hun" not in text and "ter22" not in text and "other99" not in text
    assert text.endswith("failed for redis://:****@h:6379/0.")


def test_scrub_removes_the_message_secret_and_leaves_words_that_merely_contain_a_piece() -> None:
    # Given a password whose pieces are English words, and a plain secret
    message = "wrong password for pass/word; key s3cr3t-value"

    # When it is scrubbed
    text = scrub(message, urls=["amqp://u:pass/word@h//"], secrets=["s3cr3t-value"])

    # Then the password and the secret are gone, but the word "password" is still a word
    assert text == "wrong password for ****; key ****"


def test_passwords_in_and_needs_encoding_see_what_kombu_would_split() -> None:
    assert passwords_in("amqp://u:p@ss/word@h//;amqp://u:x@h2//") == ["p@ss/word", "x"]
    assert passwords_in("redis://h/0?password=a%40b") == ["a%40b"]
    assert needs_encoding("amqp://u:p@ss/word@h//") and needs_encoding("amqp://u:a;b@h//")
    assert not needs_encoding("amqp://u:p%40ss%2Fword@h//") and not needs_encoding("redis://h/0")


# --- where a library's words meet a URL ---------------------------------------------


def test_a_password_in_the_query_of_the_broker_url_is_one_clear_error() -> None:
    # Given a broker URL with ?password= (which kombu's parser fails on with a TypeError)
    # When luigi-celery checks it
    with pytest.raises(ConfigError) as raised:
        check_broker_url("redis://127.0.0.1:6379/0?password=hunter22")

    # Then the error says where the password goes, and does not show it
    assert "kombu takes no password from the query" in str(raised.value)
    assert "hunter22" not in str(raised.value)


def test_a_broker_url_kombu_cannot_split_says_to_percent_encode_without_a_piece_of_the_password() -> None:
    with pytest.raises(ConfigError) as raised:
        check_broker_url("redis://:Zq9k/Xv7w@127.0.0.1:6379/0")
    assert "Zq9" not in str(raised.value) and "Xv7" not in str(raised.value)
    assert "must be percent-encoded" in str(raised.value)


def test_a_store_url_redis_cannot_parse_is_a_config_error_without_the_password() -> None:
    with pytest.raises(ConfigError) as raised:
        RedisStore("redis://:Zq9k/Xv7w@127.0.0.1:6379/0")
    assert "Zq9" not in str(raised.value) and "Xv7" not in str(raised.value)


def test_the_stores_ping_scrubs_what_redis_says() -> None:
    # Given a store whose client fails with a message that quotes the URL's password
    store = RedisStore("redis://:hunter22@127.0.0.1:6379/0")

    def fail() -> None:
        raise redis.ConnectionError("AUTH hunter22 refused")

    store._client.ping = fail  # type: ignore[method-assign, assignment]

    # When it is pinged / Then the error does not carry the password
    with pytest.raises(BrokerUnavailable) as raised:
        store.ping()
    assert "hunter22" not in str(raised.value)
    assert "AUTH **** refused" in str(raised.value)


class _FailingConnection:
    def __init__(self, error: Exception) -> None:
        self.error = error
        self.released = False

    def ensure_connection(self, **_: object) -> None:
        raise self.error

    def release(self) -> None:
        self.released = True


class _Conf:
    broker_url = "amqp://guest:Kp@Qw8/Rt5@127.0.0.1:5672//"


class _App:
    conf = _Conf()

    def __init__(self) -> None:
        self.connection = _FailingConnection(OSError("cannot resolve Qw8 (from guest:Kp@Qw8/Rt5)"))

    def connection_for_write(self) -> _FailingConnection:
        return self.connection


def test_check_broker_scrubs_what_kombu_says() -> None:
    # Given a broker whose connection fails with a message that quotes the password and a piece of it
    # When luigi-celery checks the broker
    app = _App()
    with pytest.raises(BrokerUnavailable) as raised:
        check_broker(app, timeout=1)

    # Then neither is in the error, which says what to do
    message = str(raised.value)
    assert "Kp@" not in message and "Qw8" not in message and "Rt5" not in message
    assert message.startswith("cannot reach the broker at amqp://guest:****@127.0.0.1:5672//: cannot resolve ****")
    assert "must be percent-encoded" in message
    # and the connection it opened is let go
    assert app.connection.released
