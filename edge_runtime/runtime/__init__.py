"""Runtime layer: executes a plan. The loader resolves profile, device, dtype, plan and backend
once; the engine runs requests under the profile's policies; backends place weights."""
