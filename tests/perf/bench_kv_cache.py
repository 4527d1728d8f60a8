"""The memory banks' key/value cache (``MALMMConfig.memory_kv_cache``), on against off, side by side.

    .venv/bin/python tests/perf/bench_kv_cache.py [--quick] [--threads 1]

Without autograd (inference, and the no-grad prefix of a training step) a bank can keep each
slot's attention keys and values from when it was stored, instead of projecting every stored
slot again at every step as the reference code does. It trades those projections for copies of
a cache two to four times the bank's size, so it pays for wide features and not for narrow ones:

1. **Real size, inference**: InstructBLIP's Q-Former (BERT-base, 12 layers, 32 queries) over
   ViT-g/14-shaped features (257 tokens x 1408) with random weights, one video of T = 24 frames,
   ``encode_video`` under ``torch.no_grad``, MBC with L = 10 and L = 20.
2. **Tiny default, training**: the embedded default's shapes (64-wide features, 17 tokens, 4-layer
   Q-Former, 12 queries), a training step (forward + backward) of batch 8, T = 12, L = 8, MBC and FIFO.

On and off alternate run by run in one process (after one warm-up of each), so both see the same
machine; the figure is the ratio of the medians. Results: reports/bench/kv_cache.json and .md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def _alternate(model, fn, reps: int) -> dict:
    times = {True: [], False: []}
    for r in range(reps + 1):
        for cache in (True, False):
            model.config.memory_kv_cache = cache
            t0 = time.perf_counter()
            fn()
            if r:  # the first round warms up
                times[cache].append(time.perf_counter() - t0)
    on, off = statistics.median(times[True]), statistics.median(times[False])
    return {"on_ms": round(on * 1000, 1), "off_ms": round(off * 1000, 1), "speedup": round(off / on, 2)}


def real_size(frames: int, lengths: list[int], reps: int) -> list[dict]:
    import torch
    from transformers import InstructBlipConfig, LlamaConfig, LlamaForCausalLM

    from pipeline.model.modeling_malmm import MALMM, MALMMConfig
    from pipeline.model.tiny import build_tokenizers, sample_corpus

    torch.manual_seed(0)
    tok, qtok = build_tokenizers(sample_corpus(200))
    text = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                       num_attention_heads=2)  # the LLM is not run by encode_video
    base = InstructBlipConfig(text_config=text.to_dict())  # ViT-g/14 + BERT-base Q-Former shapes
    base.qformer_config.vocab_size = len(qtok)
    llm = LlamaForCausalLM(text)
    x = torch.randn(1, frames, 257, base.vision_config.hidden_size)
    rows = []
    for L in lengths:
        model = MALMM(MALMMConfig(memory="mbc", memory_length=L, max_frames=frames), base, llm, tok, qtok).eval()
        with torch.no_grad():
            res = _alternate(model, lambda: model.encode_video(x, ["what is the video about ?"]), reps)
        rows.append({"part": "real-size inference", "memory": "mbc", "L": L, "T": frames, "batch": 1, **res})
        print(rows[-1], flush=True)
    return rows


def tiny_training(reps: int) -> list[dict]:
    import torch

    from pipeline.defaults import ensure_tiny_default
    from pipeline.model.checkpoint import load_malmm
    from pipeline.model.modeling_malmm import MALMMConfig

    rows = []
    x = torch.randn(8, 12, 17, 64)
    prompts, targets = ["what shape was the object coloured red"] * 8, ["circle"] * 8
    for memory in ("mbc", "fifo"):
        model = load_malmm(ensure_tiny_default(), MALMMConfig(memory=memory, memory_length=8, max_frames=12,
                                                              frame_position_init="sinusoidal")).train()

        def step():
            model(features=x, prompts=prompts, targets=targets).loss.backward()
        res = _alternate(model, step, reps)
        rows.append({"part": "tiny default training step", "memory": memory, "L": 8, "T": 12, "batch": 8, **res})
        print(rows[-1], flush=True)
    return rows


def markdown(res: dict) -> str:
    lines = ["# Memory banks' key/value cache: on against off", "",
             f"`{res['command']}` on {res['machine']} ({res['threads']} torch thread(s)); "
             "on and off alternate in one process, medians.", "",
             "| part | memory | L | T | batch | cache on (ms) | off (ms) | speed-up |", "|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['part']} | {r['memory']} | {r['L']} | {r['T']} | {r['batch']} | {r['on_ms']} | "
                     f"{r['off_ms']} | x{r['speedup']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="one length, fewer repetitions")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "reports" / "bench"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    reps = 1 if a.quick else 3
    rows = real_size(8 if a.quick else 24, [4] if a.quick else [10, 20], reps) + tiny_training(3 if a.quick else 20)
    res = {"command": "python tests/perf/bench_kv_cache.py" + (" --quick" if a.quick else ""),
           "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
           "threads": a.threads, "rows": rows}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kv_cache.json").write_text(json.dumps(res, indent=1))
    (out / "kv_cache.md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
