"""`hs2p plan`: a run's own state and steps, built abstractly and compiled ahead of time for a target.

Modules: target (chips, slices, the mesh, the verdict), compile (devices, depths, memory and FLOPs
of a compiled step), rm / lm / reinforce (the plan of each kind of run, from its trainer page's
blueprint), tables (the reports as tables). `commands.plan` is the command.
"""
