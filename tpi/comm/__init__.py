"""Master <-> worker communication: wire format, links, auth, the star allreduce."""
