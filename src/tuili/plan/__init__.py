"""Capacity planner: how much memory, how fast, and how many accelerators for a workload.

It only reads configs and measurements: a model's config.json (shapes.py), the hardware
catalog with a source for every figure (catalog.json, hardware.py), a roofline per engine
step (roofline.py) replayed through tuili's chunked-prefill scheduling (simulate.py), and
efficiency factors that `--calibrate` fits to engine step times measured on this machine
(calibrate.py runs the engine in a subprocess, probe.py). Nothing here imports torch,
tuili.engine or tuili.serve, so a plan answers in well under a second.
"""
from .hardware import Hardware, get as get_hardware
from .planner import Options, Plan, Workload, plan_one
from .shapes import ModelShape, load_shape, shape_from_config

__all__ = ["Hardware", "ModelShape", "Options", "Plan", "Workload", "get_hardware", "load_shape", "plan_one",
           "shape_from_config"]
