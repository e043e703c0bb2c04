"""Envoy's rate limit service, called the way Envoy calls it: a real gRPC client
(grpcio, stubs generated from the same protos) against the real `sluice serve`."""

from __future__ import annotations

import time
import uuid

import grpc
import pytest
from google.protobuf import wrappers_pb2

from conftest import ratelimit_pb2, rls_pb2

OK = rls_pb2.RateLimitResponse.OK
OVER_LIMIT = rls_pb2.RateLimitResponse.OVER_LIMIT
MINUTE = rls_pb2.RateLimitResponse.RateLimit.MINUTE
SECOND = rls_pb2.RateLimitResponse.RateLimit.SECOND
DAY = rls_pb2.RateLimitResponse.RateLimit.DAY

# One envoyproxy/ratelimit document, as it would be in its own file, indented under
# `domains:`. Values the tests send are unique per test, so counters never collide.
EDGE = """
envoy:
  listen: 127.0.0.1:GRPC_PORT
  domains:
    - domain: edge
      descriptors:
        - key: remote_address
          rate_limit: {unit: minute, requests_per_unit: 3}
        # Black list IP: the most specific match wins.
        - key: remote_address
          value: 50.0.0.5
          rate_limit: {unit: second, requests_per_unit: 0}
        - key: tight
          rate_limit: {unit: minute, requests_per_unit: 1}
        - key: loose
          rate_limit: {unit: minute, requests_per_unit: 100}
        - key: cost
          rate_limit: {unit: minute, requests_per_unit: 5}
        - key: trial
          shadow_mode: true
          rate_limit: {unit: minute, requests_per_unit: 1, name: trial_limit}
        - key: internal
          rate_limit: {unlimited: true}
        - key: quota
          quota_mode: true
          metadata: {name: service_1}
          rate_limit: {unit: minute, requests_per_unit: 1}
        - key: message_type
          value: marketing
          descriptors:
            - key: to_number
              rate_limit: {unit: day, requests_per_unit: 2}
        - key: to_number
          rate_limit: {unit: day, requests_per_unit: 100}
        # Tokens reported when a stream ends (apply_on_stream_done): work already done.
        - key: tokens
          rate_limit: {unit: hour, requests_per_unit: 1000, debt: true}
        - key: tokens_dropped
          rate_limit: {unit: hour, requests_per_unit: 1000}
"""


def uid() -> str:
    return uuid.uuid4().hex[:12]


def test_ok_until_the_limit_then_over_limit(start_sluice):
    sluice = start_sluice(EDGE)
    ip = f"10.{uid()}"
    remaining = []
    for _ in range(3):
        answer = sluice.call("edge", [("remote_address", ip)])
        assert answer.overall_code == OK
        (status,) = answer.statuses
        assert status.code == OK
        assert status.current_limit.requests_per_unit == 3
        assert status.current_limit.unit == MINUTE
        assert 0 < status.duration_until_reset.ToTimedelta().total_seconds() <= 60
        remaining.append(status.limit_remaining)
    assert remaining == [2, 1, 0]

    answer = sluice.call("edge", [("remote_address", ip)])
    assert answer.overall_code == OVER_LIMIT
    assert answer.statuses[0].code == OVER_LIMIT
    assert answer.statuses[0].limit_remaining == 0
    # Another address has its own counter.
    assert sluice.call("edge", [("remote_address", f"10.{uid()}")]).overall_code == OK

    metrics = sluice.metrics()
    assert 'sluice_envoy_calls_total{code="over_limit"} 1' in metrics
    assert 'sluice_envoy_calls_total{code="ok"} 4' in metrics
    assert 'sluice_decisions_total{limit="envoy.edge.remote_address",outcome="denied"} 1' in metrics


def test_one_status_per_descriptor_decided_together(start_sluice):
    sluice = start_sluice(EDGE)
    user = uid()
    first = sluice.call("edge", [("tight", user)], [("loose", user)], [("no_rule", "x")])
    assert [s.code for s in first.statuses] == [OK, OK, OK]
    assert first.statuses[1].limit_remaining == 99
    # A descriptor with no matching rule is OK with no limit.
    assert not first.statuses[2].HasField("current_limit")

    second = sluice.call("edge", [("tight", user)], [("loose", user)], [("no_rule", "x")])
    assert second.overall_code == OVER_LIMIT
    assert [s.code for s in second.statuses] == [OVER_LIMIT, OK, OK]
    # Decided atomically: the denied call charged no counter, `loose` still has 99.
    assert second.statuses[1].limit_remaining == 99
    assert second.statuses[0].current_limit.requests_per_unit == 1


def test_shadow_mode_reports_ok_while_counting(start_sluice):
    sluice = start_sluice(EDGE)
    user = uid()
    first = sluice.call("edge", [("trial", user)])
    assert first.statuses[0].limit_remaining == 0
    assert first.statuses[0].current_limit.name == "trial_limit"
    for _ in range(3):
        answer = sluice.call("edge", [("trial", user)], [("loose", user)])
        # Over its limit, but shadow: the descriptor and the call stay OK, as
        # envoyproxy/ratelimit answers.
        assert answer.overall_code == OK
        assert answer.statuses[0].code == OK
        assert answer.statuses[0].limit_remaining == 0
        assert answer.statuses[1].code == OK
    assert (
        'sluice_decisions_total{limit="envoy.edge.trial",outcome="shadow_denied"} 3'
        in sluice.metrics()
    )


def test_quota_mode_allows_over_the_limit_and_does_not_block_others(start_sluice):
    sluice = start_sluice(EDGE)
    user = uid()
    first = sluice.call("edge", [("quota", user)])
    assert first.overall_code == OK
    assert first.statuses[0].limit_remaining == 0
    for _ in range(2):
        answer = sluice.call("edge", [("quota", user)], [("loose", user)])
        # Over its soft quota: envoyproxy/ratelimit's quota mode still allows it.
        assert answer.overall_code == OK
        assert answer.statuses[0].code == OK
        assert answer.statuses[0].current_limit.requests_per_unit == 1
        assert answer.statuses[1].code == OK


def test_dynamic_metadata_carries_quota_mode_violations_and_descriptor_metadata(start_sluice):
    # envoyproxy/ratelimit with RESPONSE_DYNAMIC_METADATA=true: the answer's
    # dynamic_metadata names the domain and descriptors, the quota-mode descriptors
    # that went over (still OK), and the metadata of the descriptors within limits.
    from google.protobuf.json_format import MessageToDict

    sluice = start_sluice(EDGE.replace("  domains:", "  response_dynamic_metadata: true\n  domains:", 1))
    user = uid()
    first = sluice.call("edge", [("quota", user)], [("loose", user)])
    meta = MessageToDict(first.dynamic_metadata)
    assert meta["domain"] == "edge"
    assert meta["descriptors"] == [
        {"entries": [f"quota={user}"]},
        {"entries": [f"loose={user}"]},
    ]
    assert meta["quotaModeEnabled"] is True
    assert "quotaModeViolations" not in meta
    assert meta["metadata"] == {"name": "service_1"}

    second = sluice.call("edge", [("loose", user)], [("quota", user)], hits_addend=2)
    assert second.overall_code == OK, "quota mode still allows"
    meta = MessageToDict(second.dynamic_metadata)
    assert meta["quotaModeViolations"] == [1]
    assert meta["hitsAddend"] == 2
    assert "metadata" not in meta, "metadata only for descriptors within their limits"

    # Off by default, as in envoyproxy/ratelimit.
    plain = start_sluice(EDGE).call("edge", [("quota", user)])
    assert not plain.HasField("dynamic_metadata")


def test_tokens_reported_when_a_stream_ends_are_booked_past_the_limit(start_sluice):
    # Envoy's AI gateway asks with hits_addend 0 before the call, then reports the
    # tokens with hits_addend when the stream ends. A `debt` rule books them even past
    # the limit, so the next call waits; a plain rule would drop the overage.
    sluice = start_sluice(EDGE)
    user = uid()

    def hits(key, tokens):
        own = ratelimit_pb2.RateLimitDescriptor(
            entries=[ratelimit_pb2.RateLimitDescriptor.Entry(key=key, value=user)],
            hits_addend=wrappers_pb2.UInt64Value(value=tokens),
        )
        return sluice.call("edge", own)

    def before_call(key):
        return hits(key, 0)

    def stream_done(key, tokens):
        return hits(key, tokens)

    for key in ("tokens", "tokens_dropped"):
        assert before_call(key).overall_code == OK
        assert stream_done(key, 700).statuses[0].limit_remaining == 300
        assert before_call(key).overall_code == OK
        stream_done(key, 900)

    owed = before_call("tokens")
    assert owed.overall_code == OVER_LIMIT, "600 tokens over: the next call waits"
    assert owed.statuses[0].limit_remaining == 0
    dropped = before_call("tokens_dropped")
    assert dropped.overall_code == OK, "a plain rule refused the 900 and dropped them"
    assert dropped.statuses[0].limit_remaining == 300


def test_hits_addend_is_the_cost(start_sluice):
    sluice = start_sluice(EDGE)
    key = uid()
    answer = sluice.call("edge", [("cost", key)], hits_addend=3)
    assert answer.statuses[0].limit_remaining == 2
    answer = sluice.call("edge", [("cost", key)], hits_addend=3)
    assert answer.overall_code == OVER_LIMIT
    # 0 (unset) means 1.
    answer = sluice.call("edge", [("cost", key)])
    assert (answer.overall_code, answer.statuses[0].limit_remaining) == (OK, 1)

    # A descriptor's own hits_addend overrides the request's; 0 there checks only.
    own = ratelimit_pb2.RateLimitDescriptor(
        entries=[ratelimit_pb2.RateLimitDescriptor.Entry(key="cost", value=key)],
        hits_addend=wrappers_pb2.UInt64Value(value=0),
    )
    answer = sluice.call("edge", own, hits_addend=4)
    assert (answer.overall_code, answer.statuses[0].limit_remaining) == (OK, 1)
    own.hits_addend.value = 1
    assert sluice.call("edge", own, hits_addend=4).statuses[0].limit_remaining == 0


def test_the_most_specific_rule_wins(start_sluice):
    sluice = start_sluice(EDGE)
    # A value beats the key alone: 50.0.0.5 has requests_per_unit 0.
    blocked = sluice.call("edge", [("remote_address", "50.0.0.5")])
    assert blocked.overall_code == OVER_LIMIT
    assert blocked.statuses[0].current_limit.requests_per_unit == 0
    assert blocked.statuses[0].current_limit.unit == SECOND

    # Nested descriptors match level by level.
    number = uid()
    marketing = [("message_type", "marketing"), ("to_number", number)]
    direct = [("to_number", number)]
    answer = sluice.call("edge", marketing, direct)
    assert [s.current_limit.requests_per_unit for s in answer.statuses] == [2, 100]
    assert all(s.current_limit.unit == DAY for s in answer.statuses)
    sluice.call("edge", marketing)
    assert sluice.call("edge", marketing).overall_code == OVER_LIMIT
    # The placeholder level alone, or a descriptor deeper than the config, has no rule.
    answer = sluice.call(
        "edge", [("message_type", "marketing")], [("remote_address", "1.2.3.4"), ("x", "y")]
    )
    assert answer.overall_code == OK
    assert [s.HasField("current_limit") for s in answer.statuses] == [False, False]

    # Unlimited: OK, everything remaining.
    unlimited = sluice.call("edge", [("internal", "x")]).statuses[0]
    assert (unlimited.code, unlimited.limit_remaining) == (OK, 2**32 - 1)


def test_an_unknown_domain_is_ok_for_every_descriptor(start_sluice):
    sluice = start_sluice(EDGE)
    for _ in range(5):
        answer = sluice.call("nobody", [("remote_address", "10.0.0.1")], [("tight", "a")])
        assert answer.overall_code == OK
        assert [s.code for s in answer.statuses] == [OK, OK]
        assert not any(s.HasField("current_limit") for s in answer.statuses)


def test_bad_calls_are_grpc_errors(start_sluice):
    sluice = start_sluice(EDGE)
    with pytest.raises(grpc.RpcError) as error:
        sluice.call("", [("remote_address", "1")])
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "domain is empty" in error.value.details()
    with pytest.raises(grpc.RpcError) as error:
        sluice.call("edge")
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_response_headers_are_opt_in(start_sluice):
    section = EDGE.replace("  domains:", "  response_headers: true\n  domains:", 1)
    sluice = start_sluice(section)
    user = uid()
    answer = sluice.call("edge", [("loose", user)], [("cost", user)])
    headers = {h.key: h.value for h in answer.response_headers_to_add}
    # The descriptor closest to its limit: `cost`, 4 of 5 left.
    assert headers["X-RateLimit-Limit"] == "5"
    assert headers["X-RateLimit-Remaining"] == "4"
    assert 0 < int(headers["X-RateLimit-Reset"]) <= 60
    plain = start_sluice(EDGE)
    assert list(plain.call("edge", [("loose", user)]).response_headers_to_add) == []


def test_existing_ratelimit_files_load_and_reload(start_sluice):
    ratelimit_file = """# an envoyproxy/ratelimit config file, unchanged
domain: files
descriptors:
  - key: generic_key
    value: api
    rate_limit:
      unit: MINUTE
      requests_per_unit: 1
"""
    section = "envoy:\n  listen: 127.0.0.1:GRPC_PORT\n  config_files: [ratelimit.yaml]\n"
    sluice = start_sluice(section, files={"ratelimit.yaml": ratelimit_file})
    assert sluice.call("files", [("generic_key", "api")]).overall_code == OK
    assert sluice.call("files", [("generic_key", "api")]).overall_code == OVER_LIMIT

    # Editing the file reloads it: a higher limit on the same counter.
    (sluice.dir / "ratelimit.yaml").write_text(
        ratelimit_file.replace("requests_per_unit: 1", "requests_per_unit: 5")
    )
    deadline = time.monotonic() + 15
    while sluice.call("files", [("generic_key", "api")], hits_addend=0).statuses[
        0
    ].current_limit.requests_per_unit != 5:
        assert time.monotonic() < deadline, sluice.log()
        time.sleep(0.2)
    assert sluice.call("files", [("generic_key", "api")]).overall_code == OK


def test_envoys_limit_override_is_honoured_for_a_known_domain(start_sluice):
    sluice = start_sluice(EDGE)
    descriptor = ratelimit_pb2.RateLimitDescriptor(
        entries=[ratelimit_pb2.RateLimitDescriptor.Entry(key="anything", value=uid())],
        limit=ratelimit_pb2.RateLimitDescriptor.RateLimitOverride(
            requests_per_unit=2, unit=2  # envoy.type.v3.RateLimitUnit.MINUTE
        ),
    )
    answers = [sluice.call("edge", descriptor) for _ in range(3)]
    assert [a.overall_code for a in answers] == [OK, OK, OVER_LIMIT]
    assert answers[0].statuses[0].current_limit.requests_per_unit == 2
    assert answers[0].statuses[0].current_limit.unit == MINUTE
    # An unknown domain still answers OK, override or not.
    assert sluice.call("nobody", descriptor).overall_code == OK


def test_descriptors_and_entries_per_call_are_capped(start_sluice):
    sluice = start_sluice(EDGE)
    # At the caps: answered.
    value = uid()
    assert sluice.call("edge", *[[("loose", f"{value}-{i}")] for i in range(64)]).overall_code == OK
    assert sluice.call("edge", [("k", value)] * 32).overall_code == OK
    # Over them: INVALID_ARGUMENT saying the cap and what to do.
    with pytest.raises(grpc.RpcError) as error:
        sluice.call("edge", *[[("loose", f"{value}-{i}")] for i in range(65)])
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "65 descriptors in one call; at most 64" in error.value.details()
    assert "split" in error.value.details()
    with pytest.raises(grpc.RpcError) as error:
        sluice.call("edge", [("remote_address", value)], [("k", value)] * 1000)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "descriptor 1 has 1000 entries; at most 32" in error.value.details()
    # The service still answers.
    assert sluice.call("edge", [("loose", value)]).overall_code == OK


def test_top_keys_count_envoy_descriptors(start_sluice):
    # Top keys (issue 18) are recorded where every front door decides: the Envoy
    # service's descriptors show up in GET /v1/admin/top like HTTP keys.
    import json
    import urllib.request

    token = "envoy-test-admin-token-0123"
    sluice = start_sluice(f"admin: {{token: {token}}}\n" + EDGE)
    busy, quiet = f"10.{uid()}", f"10.{uid()}"
    for _ in range(5):
        sluice.call("edge", [("remote_address", busy)])
    sluice.call("edge", [("remote_address", quiet)])

    def top(by: str) -> list:
        request = urllib.request.Request(
            f"http://127.0.0.1:{sluice.http_port}/v1/admin/top"
            f"?limit=envoy.edge.remote_address&by={by}",
            headers={"Authorization": f"Bearer {token}"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            (limit,) = json.loads(response.read())["limits"]
        return [(k["key"], k["count"]) for k in limit["keys"]]

    spend = top("spend")
    assert busy in spend[0][0] and spend[0][1] == 3, spend
    assert quiet in spend[1][0] and spend[1][1] == 1, spend
    denials = top("denials")
    assert len(denials) == 1 and busy in denials[0][0] and denials[0][1] == 2, denials


def test_block_and_allow_entries_match_descriptor_entries_and_the_remote_address(start_sluice):
    # Runtime entries (issue 20) on the Envoy service: a subject is a descriptor entry
    # written `key=value`, and an address entry matches Envoy's `remote_address`.
    import json
    import urllib.request

    token = "envoy-test-admin-token-0123"
    sluice = start_sluice(f"admin: {{token: {token}}}\n" + EDGE)

    def entry(body: dict) -> None:
        request = urllib.request.Request(
            f"http://127.0.0.1:{sluice.http_port}/v1/admin/entries",
            data=json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 200

    abuser, vip, other = uid(), uid(), uid()
    entry({"kind": "block", "subject": f"user_id={abuser}", "reason": "abuse"})
    entry({"kind": "allow", "subject": f"user_id={vip}"})
    entry({"kind": "block", "ip": "198.51.100.0/24", "reason": "scraper"})
    time.sleep(0.2)  # the instance that wrote them refreshes at once; be generous

    # A blocked subject: OVER_LIMIT with the JSON body, even on a descriptor no rule
    # counts (user_id is not in the domain).
    blocked = sluice.call("edge", [("user_id", abuser)], [("loose", uid())])
    assert blocked.overall_code == OVER_LIMIT
    assert all(s.code == OVER_LIMIT for s in blocked.statuses)
    assert json.loads(blocked.raw_body)["reason"] == "abuse"

    # A blocked address range, through the remote_address descriptor.
    by_address = sluice.call("edge", [("remote_address", "198.51.100.9")])
    assert by_address.overall_code == OVER_LIMIT
    assert json.loads(by_address.raw_body)["reason"] == "scraper"

    # An allowed subject goes past every rule, even the one allowing 1 a minute.
    tight = uid()
    for _ in range(3):
        passed = sluice.call("edge", [("user_id", vip)], [("tight", tight)])
        assert passed.overall_code == OK
        assert [s.code for s in passed.statuses] == [OK, OK]

    # Everyone else is decided by the rules.
    first = sluice.call("edge", [("user_id", other)], [("tight", tight + "x")])
    second = sluice.call("edge", [("user_id", other)], [("tight", tight + "x")])
    assert first.overall_code == OK and not first.raw_body
    assert second.overall_code == OVER_LIMIT and not second.raw_body
