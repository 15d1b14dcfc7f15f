"""Stand-ins for benchmarks/robustness.py's group stage and task, importable by its worker processes: they record
which process ran them and what they were given."""

import os


def stage(plan, n, seed, out):
    return {"people": n, "seed": seed, "out": out, "pid": os.getpid()}


def task(plan, group, method):
    if method == "fail":
        raise ValueError(f"{method} failed on {group['people']} people")
    return {"method": method, "group": (group["people"], group["seed"]), "pid": os.getpid()}
