"""What the benchmark scripts share: the machine they ran on, and writing their results."""
from __future__ import annotations

import json
import os
import platform
from pathlib import Path


def machine() -> dict:
    import torch
    return {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "load_avg_start": os.getloadavg()}


def save(name: str, res: dict, markdown, out: str | Path, quick: bool = False) -> str:
    """Write ``{name}.json`` and ``{name}.md`` (``-quick`` for smoke runs) under ``out``; print the table."""
    res["machine"]["load_avg_end"] = os.getloadavg()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = "-quick" if quick else ""
    (out / f"{name}{suffix}.json").write_text(json.dumps(res, indent=1, default=str))
    md = markdown(res)
    (out / f"{name}{suffix}.md").write_text(md)
    print()
    print(md)
    return md
