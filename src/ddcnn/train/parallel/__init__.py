"""The ways of using the processes: sync rules and savers, model-parallel and spatial wrappers, halo exchange."""
