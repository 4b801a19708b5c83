"""The reliability checks of ``benchmarks/reliability.py`` at small sizes: hostile requests, concurrent
clients, ``kill -9`` of an ingest, a full disk, corrupted records and a Redis Cluster node killed and restarted
empty under load (the single-Redis outage under load is ``test_documents_outage.py``'s)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.redis_cluster import skip_without_cluster_tools
from tests.redis_server import redis_url  # noqa: F401 - fixture
from tests.server.test_app import running_server

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import reliability  # noqa: E402


@pytest.fixture(scope="module")
def lm():
    return reliability.load_model("smollm2-135m")


def test_hostile_requests_get_no_5xx_and_concurrent_clients_get_their_alone_answers():
    with running_server() as s:
        hostile = reliability.check_hostile(s.url, 100, seed=3)
        assert hostile["errors_5xx"] == 0, hostile["server_errors"]
        assert hostile["healthy_after"] and sum(hostile["statuses"].values()) == 100
        assert {"400", "404", "405"} <= set(hostile["statuses"])
        concurrent = reliability.check_concurrent(s.url, clients=4, per_client=3)
        assert (concurrent["requests"], concurrent["errors"], concurrent["differ_from_alone"]) == (12, 0, 0)
        assert "Traceback" not in s.log()


def test_kill_9_of_an_ingest_leaves_no_partial_record(tmp_path):
    result = reliability.check_kill_ingest(tmp_path, kills=2, seed=1, facts=0)
    assert (result["partial_records"], result["records_differ"]) == (0, 0)
    assert result["reference_records"] > 10


def test_a_full_disk_warns_and_changes_no_answer(lm, tmp_path):
    result = reliability.check_disk_full(lm, tmp_path, n=0)
    assert (result["answers_differ"], result["corrupt"]) == (0, 0)
    assert result["writes_failed"] > 0 and result["warnings"]


@pytest.mark.redis
def test_every_corrupted_record_is_recomputed(lm, tmp_path, redis_url):  # noqa: F811
    result = reliability.check_corruption(lm, tmp_path, redis_url, n=0)
    assert result["wrong_answers"] == 0
    for name, row in result["tiers"].items():
        assert 0 < row["found_corrupt"] <= row["records_damaged"], name


def test_a_cluster_node_killed_and_restarted_empty_under_load_loses_no_request_and_no_document(tmp_path):
    skip_without_cluster_tools()
    result = reliability.check_cluster_outage(tmp_path, clients=2, seconds=8, seed=2)
    assert result["requests"] > 0, result
    assert (result["not_answered"], result["documents_lost"], result["tier_reconnected"]) == (0, 0, True), result
    # the killed node held a document: its reads went to the server's own copy, then it was written back
    assert result["fallbacks"] > 0 and result["writebacks"] > 0, result
