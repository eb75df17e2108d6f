"""An upgrade as an operator makes it: the previous release (tag v0.1.0) collects and exports,
is stopped while the market goes on, and this release's daemon takes over the same config,
state, archive and database: it migrates the store at its start and loses nothing."""
import collections
import io
import os
import subprocess
import sys
import tarfile
import time

import pytest

from core import store
from core.channels import deal_without_id
from core.store import UNKNOWN_DATABASE, UNKNOWN_TABLE, Refused
from core.clock import EventClock
from mexc.simulator import MexcSimulator
from tests.conftest import MEXC, Proc, wait_for
from tests.test_exporter import files_rows, stored

# The previous release, v0.1.0, by its commit: a clone of main always has it, where a tag
# may not have come along (CI clones the submitted main)
PREVIOUS = "ecd6fd1646d85c015fabe4097adea06e4519a15c"
# `python -c` puts the working directory (this release's tree) first on sys.path: the
# previous release's tree takes its place
MAIN = "import sys; sys.path[0] = {tree!r}; from mexc.cli import main; sys.exit(main())"


def previous_release(directory) -> str:
    """The previous release's tree, from this clone's history; run by this release's .venv (its
    Python packages are the same)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run(["git", "-C", root, "archive", PREVIOUS], capture_output=True,
                            timeout=60)
    if result.returncode != 0:
        pytest.fail(f"no commit {PREVIOUS} (v0.1.0) in this clone "
                    f"({result.stderr.decode().strip()}): a shallow clone? git fetch --unshallow",
                    pytrace=False)
    tarfile.open(fileobj=io.BytesIO(result.stdout)).extractall(directory)
    return str(directory)


def exported_hours(env) -> dict:
    """{hour: file} from export_log; {} before the daemon made its tables."""
    try:
        with env.store() as session:
            return {hour: path for hour, path, _rows, _sha in session.logged_exports("BTC_USDT")}
    except Refused as e:
        if e.code in (UNKNOWN_TABLE, UNKNOWN_DATABASE):
            return {}
        raise


def without_trade_id(row):
    ts, mt, m = row
    return ts, mt, deal_without_id(m) if mt == "d" else m


def everything(env):
    return files_rows(env) + stored(env) + stored(env, "btc_previous")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_upgrade_from_the_previous_release_while_rows_flow_loses_nothing(env, tmp_path):
    old_tree = previous_release(tmp_path / "previous")
    anchor = int(time.time() * 1000)
    clock = EventClock(speed=600, anchor_ms=anchor)  # an hour in 6 s
    with MexcSimulator(rate=40, event_clock=clock.now_ms) as sim:
        config = env.write_config(sim.url, export={"clock_speed": 600.0, "clock_anchor_ms": anchor,
                                                  "delay": 5.0},
                                  supervisor={"heartbeat_timeout": 10.0})
        old = Proc([sys.executable, "-c", MAIN.format(tree=old_tree), "run", "--config", config],
                   tmp_path / "previous.log")
        env.procs.append(old)
        wait_for(lambda: exported_hours(env), 90, "an hour exported by 0.1.0")
        assert "supervisor mexc 0.1.0 starting" in old.log()
        assert old.stop(20) == 0  # the market goes on
        kept, hours = everything(env), exported_hours(env)
        with env.store() as session:
            assert session.schema_version() == 1  # 0.1.0 recorded none

        new = env.mexc("run", "--config", config, name="daemon")
        wait_for(lambda: f"brought from schema 1 to {store.SCHEMA_VERSION}" in new.log(), 30, "the store migrated")
        wait_for(lambda: len(exported_hours(env)) > len(hours), 90,
                 "an hour exported by this release")
        sim.stop_data()
        result = subprocess.run([MEXC, "export", "--once", "--config", config],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        # 0.1.0 stored trades without their id, as REST backfill does: a trade is compared
        # without it (stored twice, once with and once without, it would count twice)
        sent = {without_trade_id(row) for row in sim.expected_rows("BTC_USDT")}
        backfilled = {t.rest_row for t in sim.trades("BTC_USDT")}
        after = everything(env)
        assert max(collections.Counter(map(without_trade_id, after.elements())).values()) == 1, \
            "rows doubled"
        assert not kept - after, "rows the previous release stored are gone"
        assert set(map(without_trade_id, after)) <= sent | backfilled and len(after) > len(kept)
        assert set(hours) <= set(exported_hours(env))
        with env.store() as session:
            assert session.schema_version() == store.SCHEMA_VERSION
        verify = subprocess.run([MEXC, "verify", "--config", config], capture_output=True,
                                text=True, timeout=60)
        assert verify.returncode == 0, verify.stdout + verify.stderr
        assert new.stop(20) == 0
        assert "Traceback" not in old.log() + new.log()
