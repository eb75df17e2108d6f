"""The short cluster soak (bench/cluster_soak.py): three daemons on the cluster bed, 60 s of
seeded faults with every cluster fault once (a host SIGKILLed with its ClickHouse, a host's
network cut, ZooKeeper stopped and meanwhile a host's ClickHouse, two hosts down at once)
beside the one-host soak's faults per host, then every host's rows and their union counted
against the market's truth, and the merged archive checked (each file on every host,
byte-identical, each event once, every row a host stored in it, every cluster hole among its
gaps).  MEXC_CLUSTER_SOAK_SEED picks another seed (default 5)."""
import json
import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOAK = os.path.join(ROOT, "bench", "cluster_soak.py")
CLUSTER_FAULTS = {"kill_host", "cut_host", "zookeeper_outage", "clickhouse_outage",
                  "two_hosts_down"}

pytestmark = pytest.mark.slow


@pytest.mark.timeout(400)
def test_short_cluster_soak_doubles_nothing_and_loses_nothing_a_live_replica_had():
    started = time.monotonic()
    seed = os.environ.get("MEXC_CLUSTER_SOAK_SEED", "5")
    result = subprocess.run([sys.executable, SOAK, "--minutes", "1", "--seed", seed, "--json"],
                            cwd=ROOT, capture_output=True, text=True, timeout=380)
    elapsed = time.monotonic() - started
    out = result.stdout
    print(out, f"\n(cluster soak took {elapsed:.0f}s)")  # shown with -s or on failure
    assert result.returncode == 0, out[-4000:] + "\n--- stderr ---\n" + result.stderr[-4000:]
    check(out)


def check(out: str) -> None:
    """What a passing short run shows, from its output (the text, then the JSON line)."""
    for line in ("doubled: 0", "missing while a replica was live: 0 rows, 0 trades",
                 "RESULT: PASS"):
        assert line in out, line
    report = json.loads(out.strip().splitlines()[-1])
    assert report["passed"] and report["failures"] == []
    # every cluster fault happened, once each, and each loss of a host failed over
    assert {k: report["faults"].get(k) for k in CLUSTER_FAULTS} == dict.fromkeys(CLUSTER_FAULTS, 1)
    assert len(report["faults"]) >= 10
    lost = report["failovers"]
    assert {f["kind"] for f in lost} == {"kill_host", "cut_host", "two_hosts_down"}, lost
    assert all(f["seconds"] is not None and f["seconds"] < 30 for f in lost), lost
    for symbol in report["per_symbol"]:
        assert symbol["trades"] > 2000 and symbol["sent"] > 5000, symbol
        assert symbol["doubled"] == symbol["missing_live"] == symbol["trades_missing_live"] == 0
        assert symbol["holes_without_record"] == symbol["dark_left_unrecorded"] == 0, symbol
    # two hosts down at once left holes (symbols both held), each with its gap record
    assert sum(s["holes"] for s in report["per_symbol"]) >= 1
    # the merged archive: settled, on enough hosts with the same bytes, and exactly the union
    # of the hosts' rows (each event once), every cluster hole among its files' gaps
    archive = report["archive"]
    assert archive["settled_s"] is not None, archive["unsettled"]
    assert archive["files"] >= len(report["per_symbol"]) and archive["not_merged_rows"] == 0
    assert archive["under_replicated"] == archive["differing"] == archive["not_named"] == []
    assert archive["doubled"] == archive["missing"] == archive["extra"] == 0, archive["examples"]
    assert archive["misattributed"] == archive["dead_letters_missing"] == 0, archive["examples"]
    assert archive["rows"] == (sum(s["stored"] for s in report["per_symbol"])
                               + report["dead_letters_stored"])
    assert archive["holes_checked"] == sum(s["holes"] for s in report["per_symbol"])
    assert archive["holes_without_gap"] == 0, archive["examples"]
    assert all(n == 0 for n in archive["verify_problems"].values()), archive["verify_said"]
    for host, symbols in report["per_host"].items():
        assert sum(s["stored"] for s in symbols) > 10_000, host
        assert report["export_once_exits"][host] == report["stop_exits"][host] == 0
