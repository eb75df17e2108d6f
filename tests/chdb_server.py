"""A current ClickHouse (26.x) for tests and benches: PyPI's chdb-core, ClickHouse built as a
library, serving the real native TCP and HTTP protocols on loopback.

It is ManagedClickHouse with another command line: the same config.xml and users.xml mexc
writes for its managed server (so a current release is shown to accept them), read from the
working directory by chdb's clickhouse-local code path, which opens the listeners and then
serves until SIGTERM.  A test server, not a production one: `system` lives in memory and the
`default` database is an Overlay (mexc always creates its own database, which is Atomic).
"""
import sys

from supervisor.clickhouse import ManagedClickHouse

# clickhouse-local's query runs as long as the server should: one row per second, ~3 years.
SERVE = ("import sys, chdb._chdb as chdb; chdb.query('SYSTEM START LISTEN TCP; "
         "SYSTEM START LISTEN HTTP; SELECT sleepEachRow(1) FROM numbers(100000000) "
         "SETTINGS max_block_size = 1 FORMAT Null', 'CSV', path=sys.argv[1])")


def available() -> bool:
    try:
        import chdb  # noqa: F401
    except ImportError:
        return False
    return True


class ChdbClickHouse(ManagedClickHouse):
    """ClickHouse 26.x from chdb-core, with its config, data and logs in `directory`."""

    def command(self, config_path: str) -> list:
        return [sys.executable, "-c", SERVE, self.directory + "/data/"]  # reads ./config.xml


# The servers the tests and the soak run against, by the name tests carry in their ids:
# Debian's 18.16 (apt clickhouse-server; UInt64 time columns, Ordinary databases) and a current
# release (DateTime64 time columns, Atomic databases, EXCHANGE TABLES, Arrow over HTTP).
SERVERS = {"ch18": ManagedClickHouse, "ch26": ChdbClickHouse}
