"""The mexc bus: ZeroMQ messages between the supervisor, its children and mexc status."""
