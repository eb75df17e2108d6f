"""Watching the daemon, beside running it: threads in the supervisor that never touch its
state.  monitor.py samples the status every 2 s; web.py serves the dashboard (dashboard.html),
/api/status and /metrics (metrics.py); alerts.py evaluates the alert rules on each sample.
"""
