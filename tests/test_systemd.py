"""systemd/mexc.service: `systemd-analyze verify` is clean, the settings the daemon relies on are
there, and the directories the unit grants are the ones the config defaults point at.

Needs systemd-analyze (package systemd) but not a running systemd: verify works offline on a file.
"""
import os
import re
import shutil
import subprocess
import sys

import pytest

from core import config
from mexc import cli
from supervisor import arbiter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNIT = os.path.join(ROOT, "systemd", "mexc.service")
INSTALLED_MEXC = "/opt/mexc/.venv/bin/mexc"  # where docs/install.md puts the checkout
MEXC = os.path.join(os.path.dirname(sys.executable), "mexc")
UNIT_SUFFIXES = ("service", "socket", "target", "slice", "mount", "automount", "swap", "path",
                 "timer", "device", "scope")


def parse_unit(text: str) -> dict:
    """Just enough of systemd's unit syntax: {section: {key: [values in order]}}.

    Comments (# ;) and blank lines are skipped, a trailing backslash continues the line, and an
    empty assignment (Key=) resets the list, as systemd does for list settings."""
    sections, current, pending = {}, None, ""
    for raw in text.splitlines():
        line = (pending + " " + raw.strip()) if pending else raw.strip()
        pending = ""
        if not line or line.startswith(("#", ";")):
            continue
        if line.endswith("\\"):
            pending = line[:-1].strip()
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"{line!r} is outside any [Section]"
        assert "=" in line, f"{line!r} is not Key=Value"
        key, value = (part.strip() for part in line.split("=", 1))
        if value:
            current.setdefault(key, []).append(value)
        else:
            current[key] = []
    return sections


def setting(unit: dict, section: str, key: str) -> str:
    """The effective (last) value of a single-valued setting; fails when it is not set."""
    values = unit.get(section, {}).get(key)
    assert values, f"mexc.service: [{section}] {key}= is not set"
    return values[-1]


def seconds(span: str) -> float:
    """systemd time span: "30", "30s", "2min", "1min 30s"."""
    units = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", span):
        assert unit in units, f"time span {span!r}: unit {unit!r} not understood by this test"
        total += float(number) * units[unit]
    return total


@pytest.fixture(scope="module")
def unit() -> dict:
    with open(UNIT) as f:
        return parse_unit(f.read())


def _about_other_unit(line: str, unit_path: str) -> bool:
    """True for a verify line that names another unit or unit file first (`foo.target: ...`,
    `/lib/systemd/system/foo.target:3: ...`).  verify also loads the unit's dependencies
    (network-online.target, multi-user.target) from the host, and what it says about those is
    about this machine's systemd, not about mexc.service."""
    head = line.split(":", 1)[0].strip()
    if head == unit_path or os.path.basename(head) == "mexc.service":
        return False
    return bool(re.fullmatch(r"\S+\.(" + "|".join(UNIT_SUFFIXES) + ")", head))


def test_systemd_analyze_verify_is_clean(tmp_path):
    analyze = shutil.which("systemd-analyze") or (
        "/usr/bin/systemd-analyze" if os.access("/usr/bin/systemd-analyze", os.X_OK) else None)
    if analyze is None:
        pytest.fail("systemd-analyze is not installed: install systemd "
                    "(apt-get install systemd) to verify systemd/mexc.service", pytrace=False)
    assert os.access(MEXC, os.X_OK), f"{MEXC} missing: install the project (./setup)"

    with open(UNIT) as f:
        text = f.read()
    # verify checks that ExecStart's binary exists; /opt/mexc is only there on an installed
    # host, so point it at the mexc installed next to this Python.
    local = text.replace(f"ExecStart={INSTALLED_MEXC} ", f"ExecStart={MEXC} ")
    assert local != text, f"ExecStart does not start with {INSTALLED_MEXC}"
    # The file name is the unit name: keep it mexc.service.
    path = tmp_path / "mexc.service"
    path.write_text(local)

    # --recursive-errors=no: the exit status covers this unit only (without the option verify
    # exits 0 even on unknown keys); its dependencies come from the host and are filtered below.
    result = subprocess.run([analyze, "verify", "--recursive-errors=no", str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            universal_newlines=True, timeout=60, cwd=str(tmp_path))
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    environment = [line for line in lines if _about_other_unit(line, str(path))]
    ours = [line for line in lines if line not in environment]
    if environment:
        print("ignored (about other units on this host):", *environment, sep="\n  ")
    assert result.returncode == 0 and not ours, (
        f"systemd-analyze verify exit {result.returncode}:\n" + "\n".join(ours or lines))


def test_key_settings(unit):
    service = unit["Service"]
    expected = {
        "Type": "notify",
        "NotifyAccess": "main",
        "KillMode": "mixed",
        "User": "mexc",
        "Group": "mexc",
        "ProtectSystem": "strict",
        "RuntimeDirectory": "mexc",
        "RuntimeDirectoryMode": "0700",
        "StateDirectory": "mexc",
        "Restart": "on-failure",
        "NoNewPrivileges": "yes",
    }
    for key, value in expected.items():
        assert setting(unit, "Service", key) == value, f"{key}= should be {value}"
    assert seconds(setting(unit, "Service", "WatchdogSec")) > 0
    assert str(cli.EX_CONFIG) in setting(unit, "Service", "RestartPreventExitStatus").split(), \
        "exit 78 (bad config) must not be restarted"
    assert setting(unit, "Service", "ExecReload") == "/bin/kill -HUP $MAINPID"
    for family in ("AF_UNIX", "AF_INET", "AF_INET6"):
        assert family in setting(unit, "Service", "RestrictAddressFamilies").split()
    # ClickHouse may JIT-compile: W^X protection would break it.
    assert service.get("MemoryDenyWriteExecute", ["no"])[-1] in ("no", "false", "0")
    assert setting(unit, "Install", "WantedBy") == "multi-user.target"


def test_exec_start_runs_the_daemon_with_the_system_config(unit):
    argv = setting(unit, "Service", "ExecStart").split()
    assert argv[0] == INSTALLED_MEXC
    assert argv[1] == "run"
    assert argv[2:] == ["--config", config.SEARCH_PATHS[0]]  # /etc/mexc/mexc.toml


def test_stop_timeout_covers_the_supervisors_shutdown(unit):
    # SIGTERM: each group of children (collectors, ..., the managed ClickHouse) in turn within
    # its STOP_TIMEOUTS entry.  systemd must not SIGKILL the cgroup before that orderly stop.
    stop = seconds(setting(unit, "Service", "TimeoutStopSec"))
    assert stop > sum(arbiter.STOP_TIMEOUTS.values())
    # Start-up waits for the managed clickhouse-server (up to 60 s) before READY=1.
    assert seconds(setting(unit, "Service", "TimeoutStartSec")) > 60


def test_unit_directories_match_config_defaults(unit):
    defaults = config.parse({})
    state_dir = os.path.join("/var/lib", setting(unit, "Service", "StateDirectory"))
    runtime_dir = os.path.join("/run", setting(unit, "Service", "RuntimeDirectory"))
    assert defaults.paths["state_dir"] == state_dir
    assert defaults.paths["runtime_dir"] == runtime_dir
    # ProtectSystem=strict: everything mexc writes must be under a directory the unit grants.
    writable = [state_dir, runtime_dir] + [
        p for v in unit["Service"].get("ReadWritePaths", []) for p in v.split()]
    for where in (defaults.paths["state_dir"], defaults.spool_dir(), defaults.export["dir"],
                  os.path.join(defaults.paths["state_dir"], "clickhouse")):
        assert any(os.path.commonpath([where, w.lstrip("-")]) == w.lstrip("-")
                   for w in writable), f"{where} is not writable under ProtectSystem=strict"
