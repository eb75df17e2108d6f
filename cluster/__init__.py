"""Several hosts, one archive: what mexc keeps in ZooKeeper (docs/cluster.md).

A part beside bus/: it imports only core/.  The supervisor uses it for membership and symbol
assignment, the exporter for the one-exporter-per-hour lock and the hour copies.  Without a
`[cluster] host`, nothing here runs.
"""
