"""Planning a cluster: what each device can do (profiles), what a placement would
cost (the cost model), and which placement to run (the solver).

Profiles are measured by the node they describe (tpi.planning.device_probe,
tpi.planning.slice_probe) and carried to the master as plain JSON; everything
else here is pure arithmetic over them, so it can be checked by hand. Nothing in
this package talks to another node, reads a model or runs one.
"""
