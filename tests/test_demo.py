"""`mexc demo`, the README's quick-start command, as a user runs it: the whole pipeline
against a local simulator, no config, no network; it stops by itself with --duration."""
import re
import shutil
import subprocess

import pytest

from tests.conftest import MEXC

pytestmark = pytest.mark.slow


@pytest.mark.timeout(180)
def test_demo_stores_rows_for_every_symbol_and_stops_cleanly():
    result = subprocess.run([MEXC, "demo", "--duration", "20"], capture_output=True, text=True,
                            timeout=170)
    out = result.stdout
    directory = re.search(r"daemon log (/\S+)/mexc\.log", out)
    try:
        assert result.returncode == 0, out[-3000:] + result.stderr[-2000:]
        assert "collector-btc" in out and "running" in out  # the status table was shown
        assert out.count("\033[H\033[J") >= 2  # redrawn in place, not scrolled
        assert re.search(r"dashboard http://127\.0\.0\.1:\d+/", out)
        stored = dict((table, int(n.replace(",", ""))) for table, n in
                      re.findall(r"(\w+_current) ([\d,]+)", out.split("Rows stored:")[1]))
        assert set(stored) == {"btc_current", "eth_current", "sol_current"}
        assert all(n > 100 for n in stored.values()), stored
        assert "daemon exit code 0" in out and "Traceback" not in out + result.stderr
    finally:
        if directory:
            shutil.rmtree(directory.group(1), ignore_errors=True)
