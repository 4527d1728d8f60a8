"""GPU figures at the paper's sizes (random weights): ViT-g/14 frames/s against the GPU's measured matmul
throughput, MA-LMM training samples/s, and batched beam search against one video at a time.

    python tests/perf/bench_gpu.py            # a machine with a CUDA GPU
    python tests/perf/bench_gpu.py --quick    # small shapes, a few repetitions (runs on a CPU too)

Every part runs the project's own code on models built in memory with random weights (nothing is
downloaded; the figures depend on the shapes, not the values):

1. **matmul** – the best of square bf16 and fp16 matrix products (8192³ on a GPU): the measured peak
   the ViT's throughput is compared with.
2. **ViT** – EVA ViT-g/14 as InstructBLIP configures it (1408 wide, 39 layers, 224 px, 257 tokens),
   saved with ``save_pretrained`` and loaded by `extract`'s own `stages.extract.VisionEncoder`
   (fp16 on a GPU, 64 frames a forward pass, features before the post layer norm, copied back to the
   host as float16): frames/s and the model FLOP/s over the measured fp16 matmul FLOP/s.
3. **training** – `MALMM` with InstructBLIP's Q-Former (BERT-base, 12 layers, 32 queries) over
   ViT-g-shaped cached features and a frozen Vicuna-7B-shaped Llama (bf16), one optimiser step as
   `train` takes it (`pipeline.precision` autocast, fused AdamW on the trainable parameter groups,
   ``memory_kv_cache`` as configured by default), at the QA protocol (T = 20, L = 10) and LVU's
   (T = 100, L = 20), batch 8: samples/s and peak GPU memory.
4. **generation** – `MALMM.generate` with the MSRVTT-QA protocol's settings (5 beams, 5 returned,
   up to 10 new tokens, repetition penalty 1.5, T = 20, L = 10), a batch of 16 videos against the same
   16 one at a time: samples/s and generated tokens/s (beam 0), and the ratio.
5. **NCCL** – `stages.train.global_mean` (the loss all-reduce of every training step) under a
   one-rank NCCL process group, and the CPU tensor the loss was reduced as before, which NCCL refuses.

Results: reports/bench/gpu.json and reports/bench/gpu.md (``-quick`` for a quick run).
"""
from __future__ import annotations

import argparse
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import machine, save  # noqa: E402
from bench_extract import vit_flops_per_frame  # noqa: E402

VICUNA_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, max_position_embeddings=2048)
SMALL_LLM = dict(vocab_size=32000, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4)
VIT_G = dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16, image_size=224,
             patch_size=14)


def _sync(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, reps: int, device) -> float:
    """Median seconds of ``reps`` calls after one warm-up."""
    fn()
    _sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _peak_mem(device) -> float | None:
    import torch
    return torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None


def _reset_mem(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


# ----------------------------------------------------------------------------- 1. matmul

def bench_matmul(device, quick: bool) -> dict:
    import torch
    n = 1024 if quick or device.type != "cuda" else 8192
    out = {}
    for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        s = _timed(lambda: a @ b, 3 if quick else 10, device)
        out[name] = 2 * n ** 3 / s
        print(f"matmul {name} {n}³: {out[name] / 1e12:.1f} TFLOP/s", flush=True)
    return {"n": n, "flops": out}


# ----------------------------------------------------------------------------- 2. ViT

def bench_vit(device, quick: bool, peak: dict) -> dict:
    import numpy as np
    import torch
    from transformers import InstructBlipVisionConfig, InstructBlipVisionModel

    from stages.extract import VisionEncoder

    kw = dict(VIT_G, num_hidden_layers=2) if quick else VIT_G
    cfg = InstructBlipVisionConfig(**kw, initializer_range=0.02)
    tmp = Path(tempfile.mkdtemp(prefix="bench-gpu-vit-"))
    try:
        torch.manual_seed(0)
        with torch.device(device):
            model = InstructBlipVisionModel(cfg)
        model.half().save_pretrained(tmp)
        del model
        enc = VisionEncoder(str(tmp), batch_size=64, dtype="float16")  # extract's encoder, as an actor builds it
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    n = 64 if quick else 512
    frames = np.random.default_rng(0).integers(0, 255, (n, cfg.image_size, cfg.image_size, 3), dtype=np.uint8)
    _reset_mem(device)
    s = _timed(lambda: enc.encode(frames), 1 if quick else 5, device)
    fps = n / s

    def encode_as_before():  # the encoder until this benchmark: float32 copied to the host, cast there by numpy
        from pipeline.vision import pixel_values, pre_layernorm_features
        out = []
        with torch.inference_mode():
            for i in range(0, n, enc.batch_size):
                x = pixel_values(torch.from_numpy(np.ascontiguousarray(frames[i:i + enc.batch_size])).to(enc.device))
                h = pre_layernorm_features(enc.model, x.to(next(enc.model.parameters()).dtype))
                out.append(h.float().cpu().numpy().astype(np.float16))
        return np.concatenate(out)

    before = _timed(encode_as_before, 1 if quick else 3, device)
    assert np.array_equal(encode_as_before().view(np.uint16), enc.encode(frames).view(np.uint16))  # same bits
    fl = vit_flops_per_frame(cfg)
    row = {"model": f"EVA ViT-g/14 ({cfg.num_hidden_layers} layers, {cfg.image_size} px)", "frames": n,
           "batch": enc.batch_size, "dtype": str(next(enc.model.parameters()).dtype), "frames_per_s": fps,
           "gflops_per_frame": fl / 1e9, "achieved_tflops": fps * fl / 1e12,
           "of_fp16_matmul": fps * fl / peak["flops"]["fp16"], "peak_mem_gib": _peak_mem(device),
           "frames_per_s_host_cast": n / before, "speedup_over_host_cast": before / s}
    print(f"ViT: {fps:.0f} frames/s, {row['achieved_tflops']:.1f} TFLOP/s = {100 * row['of_fp16_matmul']:.0f} % of "
          f"the fp16 matmul; cast on the host by numpy as before: {n / before:.0f} frames/s", flush=True)
    del enc
    return row


# ----------------------------------------------------------------------------- the model at real size

def build_malmm(device, quick: bool, memory_length: int, max_frames: int):
    """MA-LMM over ViT-g-shaped features: InstructBLIP's Q-Former and a frozen Vicuna-7B-shaped Llama (bf16)."""
    import torch
    from transformers import InstructBlipConfig, LlamaConfig, LlamaForCausalLM

    from pipeline.model.modeling_malmm import MALMM, MALMMConfig
    from pipeline.model.tiny import build_tokenizers, sample_corpus

    torch.manual_seed(0)
    words = [f"w{i}" for i in range(31000)]  # a vocabulary of Vicuna's size, so the LM head is too
    tok, qtok = build_tokenizers(sample_corpus(200), extra_words=words)
    text = LlamaConfig(**{**(SMALL_LLM if quick else VICUNA_7B), "vocab_size": len(tok)},
                       pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    base = InstructBlipConfig(text_config=text.to_dict())  # ViT-g/14 + BERT-base Q-Former shapes, 32 queries
    base.qformer_config.vocab_size = len(qtok)
    if quick:
        base.qformer_config.num_hidden_layers = 2
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # the frozen LLM in bf16, built on the device
    try:
        with torch.device(device):
            llm = LlamaForCausalLM(text)
    finally:
        torch.set_default_dtype(dtype)
    model = MALMM(MALMMConfig(memory="mbc", memory_length=memory_length, max_frames=max_frames,
                              frame_position_init="sinusoidal"), base, llm, tok, qtok)
    return model.to(device), base


def bench_training(device, quick: bool) -> list[dict]:
    import torch

    from pipeline import precision
    from pipeline.optim import adamw, param_groups

    rows = []
    prec = precision.resolve("auto", device)
    settings = [(4, 2)] if quick else [(20, 10), (100, 20)]  # (T, L): the QA protocol's, LVU's
    for frames, L in settings:
        model, base = build_malmm(device, quick, L, frames)
        model.train()
        opt = adamw(param_groups(model, 0.05), 1e-4, fused=device.type == "cuda")
        scaler = precision.grad_scaler(prec, device)
        batch = 2 if quick else 8
        x = torch.randn(batch, frames, 257, base.vision_config.hidden_size, device=device, dtype=torch.float16)
        prompts = ["Question: what is the man doing in the kitchen ? Short answer:"] * batch
        targets = ["cooking"] * batch

        def step():
            with precision.autocast(prec, device):
                loss = model(features=x, prompts=prompts, targets=targets).loss
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)

        _reset_mem(device)
        s = _timed(step, 2 if quick else 10, device)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        rows.append({"T": frames, "L": L, "batch": batch, "precision": prec, "step_s": s, "samples_per_s": batch / s,
                     "trainable_params_m": trainable / 1e6, "peak_mem_gib": _peak_mem(device)})
        print(f"training T={frames} L={L} batch {batch}: {batch / s:.1f} samples/s ({s * 1000:.0f} ms a step)",
              flush=True)
        del model, opt, x
        _reset_mem(device)
    return rows


def bench_generation(device, quick: bool) -> dict:
    import torch

    from pipeline import precision
    from pipeline.benchmarks import protocol

    proto = protocol("msrvtt-qa", "")
    g = proto.generation
    frames, L = (4, 2) if quick else (proto.num_frames, proto.memory_length)
    model, base = build_malmm(device, quick, L, frames)
    model.eval()
    prec = precision.resolve("auto", device)
    batch = 4 if quick else 16
    x = torch.randn(batch, frames, 257, base.vision_config.hidden_size, device=device, dtype=torch.float16)
    prompts = [proto.render_prompt(f"what is the person {i} doing ?") for i in range(batch)]
    counts: dict = {}

    def generate(i0: int, i1: int) -> list[int]:
        with precision.autocast(prec, device):
            _, n = model.generate(x[i0:i1], prompts[i0:i1], num_beams=g.num_beams,
                                  num_return_sequences=g.num_return_sequences, max_new_tokens=g.max_new_tokens,
                                  min_new_tokens=g.min_new_tokens, repetition_penalty=g.repetition_penalty,
                                  length_penalty=g.length_penalty, return_num_tokens=True)
        return [beams[0] for beams in n]

    def batched():
        counts["batched"] = generate(0, batch)

    def one_by_one():
        counts["single"] = [c for i in range(batch) for c in generate(i, i + 1)]

    _reset_mem(device)
    res = {"T": frames, "L": L, "batch": batch, "precision": prec, "num_beams": g.num_beams,
           "max_new_tokens": g.max_new_tokens}
    for name, fn in (("batched", batched), ("single", one_by_one)):
        s = _timed(fn, 1 if quick else 3, device)
        res[name] = {"seconds": s, "samples_per_s": batch / s, "tokens": sum(counts[name]),
                     "tokens_per_s": sum(counts[name]) / s}
        print(f"generation {name}: {batch / s:.1f} samples/s, {sum(counts[name]) / s:.0f} tokens/s", flush=True)
    res["speedup"] = res["batched"]["samples_per_s"] / res["single"]["samples_per_s"]
    res["peak_mem_gib"] = _peak_mem(device)
    del model, x
    _reset_mem(device)
    return res


def check_nccl(device) -> dict:
    import torch
    import torch.distributed as dist

    from stages.train import global_mean

    if device.type != "cuda" or not dist.is_nccl_available():
        return {"skipped": "no CUDA GPU / NCCL"}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    device = torch.device("cuda", torch.cuda.current_device())
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                            device_id=device)
    try:
        mean = global_mean(1.25, device, 1)
        try:
            dist.all_reduce(torch.tensor([1.25], dtype=torch.float64))  # the loss as it was reduced before
            cpu = "accepted"
        except Exception as e:  # NCCL reduces GPU tensors only
            cpu = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
    finally:
        dist.destroy_process_group()
    print(f"NCCL: global_mean on {device} = {mean}; a CPU tensor: {cpu}", flush=True)
    return {"global_mean_on_device": mean, "cpu_tensor": cpu}


# ----------------------------------------------------------------------------- report

def markdown(res: dict) -> str:
    m = res["machine"]
    mm = res["matmul"]
    lines = ["# GPU figures at the paper's sizes", "",
             f"`{res['command']}`: {m.get('cuda') or 'no GPU (CPU)'}, torch {m['torch']}. Random weights, the "
             "project's own code (see the script's docstring).", "",
             f"Measured matmul ({mm['n']}³): bf16 {mm['flops']['bf16'] / 1e12:.1f} TFLOP/s, fp16 "
             f"{mm['flops']['fp16'] / 1e12:.1f} TFLOP/s.", "",
             "## ViT frames/s (extract's `VisionEncoder`)", "",
             "| model | dtype | frames a pass | frames/s | GFLOP / frame | achieved TFLOP/s | of fp16 matmul | peak GiB |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    v = res["vit"]
    lines.append(f"| {v['model']} | {v['dtype']} | {v['batch']} | **{v['frames_per_s']:.0f}** | "
                 f"{v['gflops_per_frame']:.1f} | {v['achieved_tflops']:.1f} | **{100 * v['of_fp16_matmul']:.0f} %** | "
                 f"{v['peak_mem_gib'] or 0:.1f} |")
    lines += ["", f"The same frames through the encoder as it was before (float32 copied to the host, cast to float16 "
              f"by numpy): {v['frames_per_s_host_cast']:.0f} frames/s, the same bits; casting by torch on the device "
              f"is **x{v['speedup_over_host_cast']:.1f}**."]
    lines += ["", "## Training samples/s (Q-Former + frozen Vicuna-7B-shaped LLM, one optimiser step)", "",
              "| T | L | batch | precision | ms a step | samples/s | trainable params (M) | peak GiB |",
              "|---:|---:|---:|---|---:|---:|---:|---:|"]
    for r in res["training"]:
        lines.append(f"| {r['T']} | {r['L']} | {r['batch']} | {r['precision']} | {r['step_s'] * 1000:.0f} | "
                     f"**{r['samples_per_s']:.1f}** | {r['trainable_params_m']:.0f} | {r['peak_mem_gib'] or 0:.1f} |")
    g = res["generation"]
    lines += ["", f"## Generation (MSRVTT-QA settings: {g['num_beams']} beams, up to {g['max_new_tokens']} new tokens, "
              f"T = {g['T']}, L = {g['L']}, {g['precision']})", "",
              "| | samples/s | generated tokens/s (beam 0) | tokens |", "|---|---:|---:|---:|"]
    for name, label in (("batched", f"batch of {g['batch']}"), ("single", "one video at a time")):
        lines.append(f"| {label} | {g[name]['samples_per_s']:.1f} | {g[name]['tokens_per_s']:.0f} | "
                     f"{g[name]['tokens']} |")
    lines += ["", f"Batched over one at a time: **x{g['speedup']:.1f}** samples/s (peak {g['peak_mem_gib'] or 0:.1f} GiB).",
              "", "## NCCL", "", f"`stages.train.global_mean` under a one-rank NCCL group: {res['nccl']}."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small shapes, few repetitions (a CPU can run it)")
    ap.add_argument("--out", default=str(ROOT / "reports" / "bench"))
    a = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    t0 = time.perf_counter()
    res = {"command": "python tests/perf/bench_gpu.py" + (" --quick" if a.quick else ""), "machine": machine()}
    res["matmul"] = bench_matmul(device, a.quick)
    res["vit"] = bench_vit(device, a.quick, res["matmul"])
    res["training"] = bench_training(device, a.quick)
    res["generation"] = bench_generation(device, a.quick)
    res["nccl"] = check_nccl(device)
    res["seconds"] = time.perf_counter() - t0
    save("gpu", res, markdown, a.out, quick=a.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
