"""The master node: session, generation loop, sampling, orchestration."""
