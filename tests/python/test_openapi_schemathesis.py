"""schemathesis against the live server's own /openapi.json: every documented operation, a
bounded number of generated requests each. Checks: no 5xx, responses conform to the
documented schemas and status codes, content types match."""

import json

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

#: Generated requests per operation (bounded: the suite runs on 2 cores in CI).
MAX_EXAMPLES = 30

#: How many generated requests were sent, printed at the end of the session.
SENT = {"count": 0}


@schemathesis.deserializer("application/x-ndjson")
def ndjson_last_object(ctx, response):
    """An NDJSON reply is validated through every line; its last object stands for it."""
    lines = [json.loads(line) for line in response.content.decode().splitlines() if line.strip()]
    if not lines:
        raise ValueError("empty NDJSON body")
    return lines[-1]


@pytest.fixture(scope="session")
def api_schema(server_url):
    return schemathesis.openapi.from_url(server_url + "/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_every_operation_conforms(case):
    SENT["count"] += 1
    case.call_and_validate(
        checks=[not_a_server_error, response_schema_conformance, status_code_conformance, content_type_conformance]
    )


def test_report_count():
    """Runs last in this module: tells how many generated requests the property test sent."""
    print(f"\nschemathesis sent {SENT['count']} generated requests")
