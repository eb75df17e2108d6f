"""etc/prometheus/mexc-rules.yml: valid for Prometheus (promtool, Debian package prometheus,
installed by ./setup --test), symbol_silent fires for a silent symbol in `promtool test rules`, and
every metric it names is one mexc serves."""
import json
import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RULES = os.path.join(ROOT, "etc", "prometheus", "mexc-rules.yml")
RULES_TEST = os.path.join(ROOT, "tests", "prometheus", "mexc-rules-test.yml")


def promtool(*args) -> subprocess.CompletedProcess:
    if shutil.which("promtool") is None:
        pytest.skip("promtool is not installed: run ./setup --test (Debian package prometheus)")
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=60)


def test_rules_pass_promtool_check():
    result = promtool("check", "rules", RULES)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 9 rules found" in result.stdout


def test_symbol_silent_fires_in_promtool_test_rules():
    result = promtool("test", "rules", RULES_TEST)
    assert result.returncode == 0, result.stdout + result.stderr


def test_rules_name_only_metrics_mexc_serves():
    with open(RULES) as f:
        used = set(re.findall(r"\bmexc_[a-z_]+", f.read()))
    with open(os.path.join(ROOT, "supervisor", "monitoring", "metrics.py")) as f:
        served = set(re.findall(r'"(mexc_[a-z_]+)"', f.read()))
    assert used and used <= served, used - served


def test_the_alert_names_are_mexcs_own():
    from supervisor.monitoring import alerts

    with open(RULES) as f:
        names = set(re.findall(r"- alert: (\w+)", f.read()))
    with open(alerts.__file__) as f:
        own = set(re.findall(r'\("([a-z_]+)", (?:"symbol"|"child"|None)', f.read()))
    assert names == own


def test_grafana_dashboard_names_only_metrics_mexc_serves():
    with open(os.path.join(ROOT, "etc", "grafana", "mexc-dashboard.json")) as f:
        dashboard = json.load(f)
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {re.sub(r"_total$", "", name) for e in exprs for name in re.findall(r"\bmexc_[a-z_]+", e)}
    with open(os.path.join(ROOT, "supervisor", "monitoring", "metrics.py")) as f:
        served = set(re.findall(r'"(mexc_[a-z_]+)"', f.read()))
    assert used and used <= served, used - served
