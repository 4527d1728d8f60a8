"""Ray runtime: the same command runs on an embedded local cluster or an existing one."""
from __future__ import annotations

import logging
import os


def init_ray(address: str | None = None, *, num_cpus: int | None = None) -> dict:
    """Connect to ``address`` / $RAY_ADDRESS, or start an embedded local cluster.

    Returns the cluster's resources. Safe to call twice.
    """
    import ray

    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS") or None
        kwargs = dict(address=address, logging_level=logging.WARNING, log_to_driver=True,
                      # the dashboard serves the State API that Ray Train V2's placement-group
                      # cleaner polls every second (without it, a warning per second)
                      include_dashboard=None,
                      # Ray's own INFO chatter in workers (one line per training step) hides our progress
                      # bars; warnings and errors still reach the driver
                      logging_config=ray.LoggingConfig(log_level="WARNING"))
        if address is None:
            kwargs["num_cpus"] = num_cpus
            # keep the project importable by workers of the embedded cluster
            kwargs["runtime_env"] = {"env_vars": {"PYTHONPATH": _project_root()}}
        ray.init(**kwargs)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # the stages draw their own progress bar
        ctx.print_on_execution_start = False
    return ray.cluster_resources()


def _project_root() -> str:
    from pathlib import Path
    root = str(Path(__file__).resolve().parents[1])
    existing = os.environ.get("PYTHONPATH", "")
    return root + (os.pathsep + existing if existing else "")


def cluster_has_gpus() -> bool:
    import ray
    return ray.cluster_resources().get("GPU", 0) > 0
