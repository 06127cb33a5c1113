"""Device-specific speed behind one seam: the `SpeedPlan` of a run, resolved once from (device,
precision, model, config), printed once, applied once (engine/speed/plan.py). The core never
imports this package; it exposes the hooks the plan plugs into."""

from engine.speed import self_check
from engine.speed.plan import SpeedPlan, announce, apply, prepare, resolve

__all__ = ["SpeedPlan", "announce", "apply", "prepare", "resolve", "self_check"]
