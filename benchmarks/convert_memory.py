"""Peak memory and wall time of `quanta convert --scheme nf4` against the whole-model route.

Writes a synthetic Llama-3.2-3B-shaped checkpoint (random bf16 weights, ~6.4 GB in 2 GB shards, tied
embeddings, a real config.json), then runs, each in a fresh child process measured with ``os.wait4``:

- streamed: ``python -m quantize_cli convert CKPT --scheme nf4 --device cpu``;
- whole model: ``AutoModelForCausalLM.from_pretrained`` (bf16), then ``quantize`` each block Linear
  weight (dropping the bf16 weight as it goes, the kindest version of this route) and ``save_file``.

Usage: ``python benchmarks/convert_memory.py [--dir DIR] [--keep] [--timeout S] [--routes streamed,whole]``.
Target (DESIGN §5, issue 3): the streamed route's peak RSS under 2.5 GB on CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

# Llama-3.2-3B (meta-llama/Llama-3.2-3B config.json).
HIDDEN, INTER, LAYERS, HEADS, KV_HEADS, VOCAB, HEAD_DIM = 3072, 8192, 28, 24, 8, 128256, 128
SHARD_BYTES = 2 * 10**9


def llama_config(layers: int = LAYERS) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": INTER,
        "num_hidden_layers": layers,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM,
        "vocab_size": VOCAB,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "hidden_act": "silu",
        "tie_word_embeddings": True,
        "bos_token_id": 128000,
        "eos_token_id": 128001,
        "dtype": "bfloat16",
    }


def tensor_shapes(layers: int = LAYERS) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of the checkpoint (no lm_head: tied to the embeddings)."""
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    kv = KV_HEADS * HEAD_DIM
    for i in range(layers):
        p = f"model.layers.{i}"
        shapes.update({
            f"{p}.self_attn.q_proj.weight": (HEADS * HEAD_DIM, HIDDEN),
            f"{p}.self_attn.k_proj.weight": (kv, HIDDEN),
            f"{p}.self_attn.v_proj.weight": (kv, HIDDEN),
            f"{p}.self_attn.o_proj.weight": (HIDDEN, HEADS * HEAD_DIM),
            f"{p}.mlp.gate_proj.weight": (INTER, HIDDEN),
            f"{p}.mlp.up_proj.weight": (INTER, HIDDEN),
            f"{p}.mlp.down_proj.weight": (HIDDEN, INTER),
            f"{p}.input_layernorm.weight": (HIDDEN,),
            f"{p}.post_attention_layernorm.weight": (HIDDEN,),
        })  # fmt: skip
    shapes["model.norm.weight"] = (HIDDEN,)
    return shapes


def write_checkpoint(root: Path, layers: int = LAYERS) -> int:
    """Random bf16 weights (std 0.02, norms 1) in ~2 GB shards with an index; returns tensor bytes."""
    from safetensors.torch import save_file

    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(llama_config(layers), indent=2))
    gen = torch.Generator().manual_seed(0)
    shards: list[dict[str, tuple[int, ...]]] = [{}]
    used = 0
    for name, shape in tensor_shapes(layers).items():
        size = 2 * int(torch.tensor(shape).prod()) if shape else 2
        if shards[-1] and used + size > SHARD_BYTES:
            shards.append({})
            used = 0
        shards[-1][name] = shape
        used += size
    weight_map, total = {}, 0
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, shape in shard.items():
            if len(shape) == 1:
                tensors[name] = torch.ones(shape, dtype=torch.bfloat16)
            else:
                tensors[name] = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
            weight_map[name] = fname
            total += tensors[name].numel() * 2
        save_file(tensors, root / fname, metadata={"format": "pt"})
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (root / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return total


def whole_model_route(ckpt: str, out: str) -> None:
    """The route `quanta convert` replaces: load the whole model, quantize each block Linear, save."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from quantize_cli import quantize
    from quantize_cli.format import state_to_tensors

    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16)
    tensors: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            tensors.update(state_to_tensors(f"{name}.weight", quantize(module.weight.data, "nf4", 64)))
            module.weight = torch.nn.Parameter(torch.empty(0, dtype=torch.bfloat16), requires_grad=False)
    for name, t in model.state_dict().items():
        if t.numel() and name not in tensors and name != "lm_head.weight":
            tensors[name] = t.contiguous()
    Path(out).mkdir()
    save_file(tensors, Path(out) / "model.safetensors", metadata={"format": "pt"})


def same_tensors(work: Path) -> bool:
    """Whether a few quantized tensors of the two outputs are identical (both are plain ``quantize``)."""
    from safetensors import safe_open

    index = json.loads((work / "streamed-nf4" / "model.safetensors.index.json").read_text())["weight_map"]
    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.13.mlp.down_proj.weight_scale",
             "model.layers.27.mlp.up_proj.weight"]  # fmt: skip
    with safe_open(work / "whole-nf4" / "model.safetensors", framework="pt") as whole:
        for name in names:
            with safe_open(work / "streamed-nf4" / index[name], framework="pt") as streamed:
                if not torch.equal(streamed.get_tensor(name), whole.get_tensor(name)):
                    return False
    return True


def measure(cmd: list[str], timeout: float) -> tuple[float, float, int]:
    """(peak RSS in GiB, wall seconds, exit code) of ``cmd`` run as a child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = start + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.perf_counter() > deadline:
            proc.kill()
            pid, status, usage = os.wait4(proc.pid, 0)
            break
        time.sleep(0.2)
    wall = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        print(f"  {cmd[2:4]} exited {code}: {proc.stderr.read().decode()[-500:] if proc.stderr else ''}")
    return usage.ru_maxrss / 1024**2, wall, code  # ru_maxrss is in KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=None, help="Work folder (default: a temp dir in /tmp).")
    parser.add_argument("--keep", action="store_true", help="Keep the checkpoint and outputs.")
    parser.add_argument("--timeout", type=float, default=1800, help="Seconds per route.")
    parser.add_argument("--routes", default="streamed,whole", help="Comma-separated: streamed, whole.")
    parser.add_argument("--whole-model-child", nargs=2, metavar=("CKPT", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.whole_model_child:
        whole_model_route(*args.whole_model_child)
        return
    work = args.dir or Path(tempfile.mkdtemp(prefix="quanta-convert-memory-"))
    ckpt = work / "llama-3.2-3b-synthetic"
    try:
        if not (ckpt / "model.safetensors.index.json").is_file():
            t = time.perf_counter()
            total = write_checkpoint(ckpt)
            print(f"wrote {total / 1e9:.2f} GB checkpoint to {ckpt} in {time.perf_counter() - t:.0f} s")
        files = sorted(ckpt.glob("*.safetensors"))
        print(f"checkpoint: {len(files)} shards, {sum(f.stat().st_size for f in files) / 1e9:.2f} GB on disk")
        print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}")
        routes = {
            "streamed": [sys.executable, "-m", "quantize_cli", "convert", str(ckpt), "--scheme", "nf4",
                         "--device", "cpu", "--out", str(work / "streamed-nf4")],
            "whole": [sys.executable, __file__, "--whole-model-child", str(ckpt), str(work / "whole-nf4")],
        }  # fmt: skip
        print("| route | peak RSS (GiB) | wall (s) | exit |")
        print("|---|---|---|---|")
        for name in args.routes.split(","):
            shutil.rmtree(work / f"{name}-nf4", ignore_errors=True)
            rss, wall, code = measure(routes[name], args.timeout)
            label = "quanta convert (streamed)" if name == "streamed" else "from_pretrained + quantize + save"
            print(f"| {label} | {rss:.2f} | {wall:.0f} | {code} |", flush=True)
        if {"streamed", "whole"} <= set(args.routes.split(",")):
            print(f"same nf4 tensors from both routes (3 sampled): {same_tensors(work)}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
