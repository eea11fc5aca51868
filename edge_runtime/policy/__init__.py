"""Policy layer: profiles, their schema, the hardware probe, tiers, dtypes, bandwidth and the
planner. It decides where things go and moves no tensor; it imports no other layer."""
