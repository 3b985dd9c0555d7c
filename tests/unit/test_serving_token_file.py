"""The tokens file of the model server and its limits settings: what is accepted, what is refused and how it is
named."""

from __future__ import annotations

import argparse
import stat

import pytest

from kiln.tasks.serving.limits import FD_RESERVE, ServerLimits, add_limit_arguments, limits_from_args
from kiln.tasks.serving.tokens import (
    KILN_GRANT,
    TokenCheck,
    TokenFileError,
    add_token,
    digest,
    read_tokens,
    revoke_token,
)


def bearer(token: str) -> list[tuple[bytes, bytes]]:
    return [(b"host", b"x"), (b"authorization", f"Bearer {token}".encode())]


def test_an_added_token_is_stored_as_its_digest_in_a_private_file(tmp_path):
    path = tmp_path / "serving" / "tokens.json"

    token = add_token(path, "shop", ["predict"], ["penguins"])

    assert token not in path.read_text()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    grants = read_tokens(path)
    assert list(grants) == [digest(token)]
    assert grants[digest(token)].scopes == {"predict"} and grants[digest(token)].pipelines == {"penguins"}


def test_the_check_knows_the_kiln_token_and_the_scoped_ones(tmp_path):
    path = tmp_path / "tokens.json"
    scoped = add_token(path, "shop", ["predict"], ["penguins"])
    check = TokenCheck("kiln-token", path)

    assert check.grant(bearer("kiln-token")) is KILN_GRANT
    assert check.grant(bearer(scoped)).name == "shop"
    assert check.grant(bearer("guess")) is None
    assert check.grant([(b"authorization", scoped.encode())]) is None  # no "Bearer " prefix
    assert check.grant([]) is None


@pytest.mark.parametrize(("scope", "pipeline", "refused"), [
    ("predict", "penguins", None),
    ("admin", "penguins", "not 'admin'"),
    ("predict", "taxi", "not 'taxi'"),
], ids=["allowed", "wrong_scope", "wrong_pipeline"])
def test_a_grant_names_why_it_refuses(tmp_path, scope, pipeline, refused):
    path = tmp_path / "tokens.json"
    token = add_token(path, "shop", ["predict"], ["penguins"])
    grant = TokenCheck("kiln-token", path).grant(bearer(token))

    reason = grant.refusal(scope, pipeline)

    assert reason is None if refused is None else refused in reason and "'shop'" in reason


def test_every_pipeline_is_a_star(tmp_path):
    path = tmp_path / "tokens.json"
    token = add_token(path, "ops", ["admin", "predict"], ["*"])
    grant = TokenCheck("k", path).grant(bearer(token))

    assert grant.refusal("admin", "anything") is None and grant.refusal("predict", None) is None


def test_a_revoked_token_is_refused_after_a_refresh(tmp_path):
    path = tmp_path / "tokens.json"
    old = add_token(path, "v1", ["predict"], ["*"])
    check = TokenCheck("k", path)
    new = add_token(path, "v2", ["predict"], ["*"])
    check.refresh()
    assert check.grant(bearer(old)) and check.grant(bearer(new))  # both valid during a rotation

    assert revoke_token(path, "v1")
    check.refresh()

    assert check.grant(bearer(old)) is None and check.grant(bearer(new)).name == "v2"
    assert not revoke_token(path, "v1")


@pytest.mark.parametrize(("content", "named"), [
    ("not json", "not valid JSON"),
    ('{"tokens": {}}', '{"tokens": [...]}'),
    ('{"tokens": [{"name": "a b", "sha256": "' + "0" * 64 + '", "scopes": ["predict"], "pipelines": ["*"]}]}',
     "tokens[0].name"),
    ('{"tokens": [{"name": "a", "sha256": "xyz", "scopes": ["predict"], "pipelines": ["*"]}]}', "tokens[0].sha256"),
    ('{"tokens": [{"name": "a", "sha256": "' + "0" * 64 + '", "scopes": ["root"], "pipelines": ["*"]}]}',
     "tokens[0].scopes"),
    ('{"tokens": [{"name": "a", "sha256": "' + "0" * 64 + '", "scopes": ["predict"]}]}', "tokens[0].pipelines"),
    ('{"tokens": [{"name": "a", "sha256": "' + "0" * 64 + '", "scopes": ["predict"], "pipelines": ["*"]},'
     ' {"name": "a", "sha256": "' + "1" * 64 + '", "scopes": ["predict"], "pipelines": ["*"]}]}', "appears twice"),
], ids=["not_json", "not_a_list", "bad_name", "bad_digest", "unknown_scope", "no_pipelines", "duplicate"])
def test_an_invalid_tokens_file_is_refused_naming_the_entry(tmp_path, content, named):
    path = tmp_path / "tokens.json"
    path.write_text(content)

    with pytest.raises(TokenFileError) as refused:
        TokenCheck("k", path)

    assert named in str(refused.value) and str(path) in str(refused.value)


def test_an_invalid_file_seen_later_keeps_the_tokens_read_before(tmp_path):
    path = tmp_path / "tokens.json"
    token = add_token(path, "shop", ["predict"], ["*"])
    check = TokenCheck("k", path)

    path.write_text("{broken")
    check.refresh()

    assert check.grant(bearer(token)).name == "shop"


def test_adding_a_name_twice_is_refused(tmp_path):
    path = tmp_path / "tokens.json"
    add_token(path, "shop", ["predict"], ["*"])

    with pytest.raises(TokenFileError, match="'shop' exists"):
        add_token(path, "shop", ["predict"], ["*"])


def test_the_limits_are_flags_with_their_defaults():
    parser = argparse.ArgumentParser()
    add_limit_arguments(parser)

    assert limits_from_args(parser.parse_args([])) == ServerLimits()
    assert limits_from_args(parser.parse_args(["--max-body-bytes", "1024", "--header-timeout-s", "0.5"])) == \
        ServerLimits(max_body_bytes=1024, header_timeout_s=0.5)


@pytest.mark.parametrize("flag", ["--max-body-bytes", "--body-timeout-s", "--max-connections"])
def test_a_limit_that_is_not_positive_is_refused_naming_its_flag(flag):
    parser = argparse.ArgumentParser()
    add_limit_arguments(parser)

    with pytest.raises(ValueError, match=flag):
        limits_from_args(parser.parse_args([flag, "0"]))


def test_the_connection_cap_leaves_descriptors_for_the_server():
    assert ServerLimits(max_connections=1000).connection_cap(1024) == 1024 - FD_RESERVE
    assert ServerLimits(max_connections=1000).connection_cap(65536) == 1000
    with pytest.raises(ValueError, match="RLIMIT_NOFILE"):
        ServerLimits().connection_cap(FD_RESERVE)
