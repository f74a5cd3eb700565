"""`alignkit dpo` under torchrun with two CPU processes (gloo): one DDP run, and only the main process
writes the run folder (one summary, one row per log event, world size 2 in the model card)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.distributed.launch import SRC, torchrun

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def refused(cmd: list[str], command: str, env: dict, out: Path, code: int | None = 2, echoed: bool = False) -> str:
    """Run `cmd` (alignkit, or a launcher around it); assert it stopped (with exit `code`; None: any failure) with
    exactly one 'alignkit <command>: ' line on stderr and wrote nothing at `out`; return that line. `echoed`: a
    launcher that repeats its child's stderr in its own error (accelerate >= 1.16's simple launcher raises
    CalledProcessError from RuntimeError(<the child's stderr tail>)) shows that line again: one distinct line."""
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.startswith(f"alignkit {command}: ")]
    n = len(set(lines)) if echoed else len(lines)
    assert (proc.returncode != 0 if code is None else proc.returncode == code) and lines and n == 1, \
        proc.stderr[-3000:]
    assert not out.exists()
    return lines[0]


@pytest.mark.slow
def test_two_process_run_writes_once(tmp_path):
    out = tmp_path / "ddp"
    proc = torchrun(["-m", "alignkit", "-q", "dpo", "--config", str(CONFIGS / "dpo-lora-tiny.yaml"), f"output_dir={out}",
                     "train.max_steps=2", "train.eval_strategy=no"], env={"TMPDIR": str(tmp_path)}, timeout=300)
    assert proc.returncode == 0, proc.failure(3000)
    assert proc.stdout.count("alignkit dpo: done") == 1, proc.stdout
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == [1, 2]  # written once, not once per process
    assert "| `world size` | 2 |" in (out / "README.md").read_text()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("alignkit-tiny-")]  # rank 1's private copy removed


ACCELERATE_LAUNCH = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch"]


def free_port() -> int:
    """A port nothing listens on now: `accelerate launch` with a config file rendezvouses on main_process_port, 29500
    unless given, and a second launch at the same time (a parallel test, another checkout's suite) failed with
    EADDRINUSE."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PORT_TAKEN = ("EADDRINUSE", "address already in use", "Address already in use")


def refused_sft_launch(config: Path, out: Path, tmp_path: Path, **env_extra: str) -> list[str]:
    """`accelerate launch --config_file config -m alignkit sft` (the tiny SFT config, one step) that must fail: the
    `alignkit sft: ` lines of its stderr, after checking it failed with one such line per rank that printed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path), **env_extra,
           "PYTHONPATH": os.pathsep.join(p for p in (SRC, os.environ.get("PYTHONPATH", "")) if p)}
    for _ in range(2):  # a second try only when the rendezvous port was taken between free_port() and the launch
        proc = subprocess.run([*ACCELERATE_LAUNCH, "--main_process_port", str(free_port()), "--config_file",
                               str(config), "-m", "alignkit", "-q", "sft", "--config", str(CONFIGS / "sft-tiny.yaml"),
                               f"output_dir={out}", "train.max_steps=1", "train.eval_strategy=no",
                               "data.eval_fraction=0.0", "data.max_records=4"],
                              env=env, capture_output=True, text=True, timeout=300)
        if not any(m in proc.stderr for m in PORT_TAKEN):
            break
    lines = [line for line in proc.stderr.splitlines() if line.startswith("alignkit sft: ")]
    assert proc.returncode != 0 and 1 <= len(lines) <= 2, proc.stderr[-3000:]  # one per rank that printed
    return lines


@pytest.mark.slow
def test_accelerate_launch_config_starts_two_ranks(tmp_path):
    """The README's `accelerate launch` line for CPU processes (configs/accelerate/ddp-cpu.yaml): two processes
    really join one gloo group. World size 2 is read back from the model card (the Trainer's world size, known
    only once the process group has formed); `accelerate launch --cpu --num_processes 2` is refused (it
    starts one process without an MPI hostfile, see the config file's comment)."""
    out = tmp_path / "acc"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}
    cmd = [*ACCELERATE_LAUNCH, "--main_process_port", str(free_port()), "--config_file",
           str(CONFIGS / "accelerate" / "ddp-cpu.yaml"), "-m", "alignkit", "-q", "sft", "--config",
           str(CONFIGS / "sft-tiny.yaml"), f"output_dir={out}", "train.max_steps=2", "train.eval_strategy=no"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("alignkit sft: done") == 1, proc.stdout
    assert "| `world size` | 2 |" in (out / "README.md").read_text()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]


@pytest.mark.slow
def test_accelerate_launch_deepspeed_zero3_on_cpu(tmp_path):
    """The README's DeepSpeed line for CPU processes (configs/accelerate/zero3-cpu.yaml): full-finetuning DPO
    on two ranks under ZeRO-3 (the reference a partitioned engine of its own); world size 2 in the model card,
    one summary, and model/ an ordinary safetensors folder that loads without DeepSpeed and differs from the
    base model (the partitions were gathered, not left empty). The config leaves zero3_save_16bit_model unset, so
    DeepSpeed's stage3_gather_16bit_weights_on_model_save is false (accelerate's default): alignkit gathers the
    partitions itself (distributed.full_parameters), so model/ is the full model whatever that setting says."""
    pytest.importorskip("deepspeed")
    import torch

    assert "zero3_save_16bit_model" not in (CONFIGS / "accelerate" / "zero3-cpu.yaml").read_text()

    from alignkit.models.loading import load_model

    out = tmp_path / "z3"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path), "DS_ACCELERATOR": "cpu"}
    cmd = [*ACCELERATE_LAUNCH, "--main_process_port", str(free_port()), "--config_file",
           str(CONFIGS / "accelerate" / "zero3-cpu.yaml"), "-m", "alignkit", "-q", "dpo", "--config",
           str(CONFIGS / "dpo-tiny.yaml"), f"output_dir={out}", "train.max_steps=2", "train.eval_strategy=no"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("alignkit dpo: done") == 1, proc.stdout
    card = (out / "README.md").read_text()
    assert "| `world size` | 2 |" in card and "| `engine` | DEEPSPEED |" in card and "| `mixed precision` | no |" in card
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    assert rows[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # step 1: policy == reference, loss log 2
    assert not list((out / "model").rglob("*.pt"))
    trained = dict(load_model(out / "model").named_parameters())
    base = dict(load_model(out / "base_model").named_parameters())  # the tiny:llama the run started from
    assert trained.keys() == base.keys()
    assert all(p.shape == base[n].shape for n, p in trained.items())  # gathered, not empty partitions
    assert any(not torch.equal(trained[n], base[n]) for n in trained)


@pytest.mark.slow
def test_trainer_fsdp_on_cpu_processes_is_refused_before_writing(tmp_path):
    """`train.fsdp` (the Trainer's FSDP, from the training arguments) under torchrun on CPU processes wrote the run
    folder (config.yaml, base_model/, tensorboard/) and then every rank failed with "unexpected error: ValueError:
    Inconsistent compute device and `device_id`". Now each rank stops with one line naming train.fsdp and the
    launcher config that does run FSDP on CPU processes, and nothing is written."""
    out = tmp_path / "fsdp"
    proc = torchrun(["-m", "alignkit", "-q", "sft", "--config", str(CONFIGS / "sft-tiny.yaml"), f"output_dir={out}",
                     "train.max_steps=1", "train.eval_strategy=no", "data.eval_fraction=0.0", "data.max_records=4",
                     "train.fsdp=full_shard"], env={"TMPDIR": str(tmp_path)}, timeout=300)
    assert proc.returncode != 0 and not proc.timed_out, proc.failure(3000)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("alignkit sft: ")]  # one per rank that
    #   printed before torchrun ended the other
    assert 1 <= len(lines) <= 2 and all(line.startswith("alignkit sft: error: train.fsdp: ") and
                                   "configs/accelerate/fsdp2.yaml" in line for line in lines), proc.failure(3000)
    assert not out.exists()


def test_train_deepspeed_without_a_launcher_is_refused_before_writing(tmp_path):
    """`train.deepspeed=<json>` in a plain `python -m alignkit` process: DeepSpeed, finding no launcher's RANK /
    WORLD_SIZE / MASTER_ADDR / ..., looks for MPI when training begins; without mpi4py the run folder (config.yaml,
    base_model/, tensorboard/) was written and then "error: No module named 'mpi4py'". Now one line naming
    train.deepspeed and the launchers, before anything is written."""
    pytest.importorskip("deepspeed")
    from alignkit.distributed import DEEPSPEED_LAUNCH_ENV, deepspeed_cannot_start

    if not deepspeed_cannot_start():  # mpi4py installed, or a cloud environment: DeepSpeed may start
        pytest.skip("DeepSpeed can start here without a launcher")
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto",
                              "gradient_accumulation_steps": "auto"}))
    env = {k: v for k, v in os.environ.items() if k not in DEEPSPEED_LAUNCH_ENV}
    env.update(PYTHONPATH=os.pathsep.join(p for p in (SRC, os.environ.get("PYTHONPATH", "")) if p), TMPDIR=str(tmp_path))
    out = tmp_path / "ds"
    line = refused([sys.executable, "-m", "alignkit", "-q", "sft", "--config", str(CONFIGS / "sft-tiny.yaml"),
                    f"output_dir={out}", "train.max_steps=1", "train.eval_strategy=no", "data.eval_fraction=0.0",
                    "data.max_records=4", f"train.deepspeed={ds}"], "sft", env, out)
    assert line.startswith("alignkit sft: error: train.deepspeed: DeepSpeed starts only under a launcher") \
        and "torchrun --nproc_per_node N" in line, line


# what each launcher puts in a process's environment (besides the variables of the shell that started it)
LAUNCH_ENVS = {
    "plain python": ({}, None),
    "torchrun, 2 processes": ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                               "MASTER_PORT": "29500"}, None),
    "accelerate launch --num_processes 1": ({"ACCELERATE_USE_CPU": "False"}, None),
    "accelerate launch --cpu --num_processes 2": ({"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1",
                                                   "MASTER_PORT": "29500"}, "started ONE"),
    "accelerate launch --num_processes 2 (no GPU)": ({"ACCELERATE_USE_CPU": "False", "MASTER_ADDR": "127.0.0.1",
                                                      "MASTER_PORT": "29500"}, "started ONE"),
    "accelerate launch --mpirun_hostfile": ({"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1",
                                             "MASTER_PORT": "29500", "PMI_SIZE": "2"}, None),
}


@pytest.mark.parametrize("launcher", LAUNCH_ENVS)
def test_launchers_that_start_other_process_counts_are_told_apart(launcher, monkeypatch):
    """The environments printed by `accelerate launch` 1.x (`prepare_simple_launcher_cmd_env`) and torchrun: only
    accelerate's simple launcher asked for 2 processes (MASTER_ADDR set, no WORLD_SIZE / MPI size) is refused."""
    from alignkit.distributed import DEEPSPEED_LAUNCH_ENV, MPI_SIZE_ENV, check_process_count
    from alignkit.settings import ConfigError

    for key in {*DEEPSPEED_LAUNCH_ENV, *MPI_SIZE_ENV, "ACCELERATE_USE_CPU"}:
        monkeypatch.delenv(key, raising=False)
    env, refused = LAUNCH_ENVS[launcher]
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    world = int(env.get("WORLD_SIZE", env.get("PMI_SIZE", 1)))
    if refused is None:
        check_process_count(world, "SFTTrainer")
    else:
        with pytest.raises(ConfigError, match=refused):
            check_process_count(world, "SFTTrainer")


def test_each_process_training_alone_is_refused(monkeypatch):
    """torchrun started 2 processes and the training arguments count 1 (use_cpu=false on CPU processes)."""
    from alignkit.distributed import check_process_count
    from alignkit.settings import ConfigError

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"^SFTTrainer: the launcher started 2 processes .* counts 1 .*"
                                          r"remove train.use_cpu=false"):
        check_process_count(1, "SFTTrainer")
    check_process_count(2, "SFTTrainer")


@pytest.mark.slow
def test_accelerate_simple_launcher_with_two_processes_is_refused_before_writing(tmp_path):
    """`accelerate launch --cpu --num_processes 2` starts ONE process (accelerate's simple launcher; the README says
    so): that process trained the whole run alone, world size 1 in the card, exit 0. Now one line naming the
    launchers that do start two, and no run folder."""
    out = tmp_path / "one"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path),
           "PYTHONPATH": os.pathsep.join(p for p in (SRC, os.environ.get("PYTHONPATH", "")) if p)}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--cpu", "--num_processes", "2",
           "-m", "alignkit", "-q", "sft", "--config", str(CONFIGS / "sft-tiny.yaml"), f"output_dir={out}",
           "train.max_steps=1", "train.eval_strategy=no", "data.eval_fraction=0.0", "data.max_records=4"]
    line = refused(cmd, "sft", env, out, code=None, echoed=True)  # accelerate launch's own exit code
    assert line.startswith("alignkit sft: error: SFTTrainer: accelerate launch was asked for several processes") \
        and "configs/accelerate/ddp-cpu.yaml" in line, line


@pytest.mark.slow
def test_use_cpu_false_under_torchrun_is_refused_before_writing(tmp_path):
    """`train.use_cpu=false` under torchrun on CPU processes: transformers then ran each rank alone (world size 1,
    the same whole run twice, rank 0 writing), exit 0. Now every rank stops with one line naming train.use_cpu,
    and nothing is written."""
    out = tmp_path / "alone"
    proc = torchrun(["-m", "alignkit", "-q", "sft", "--config", str(CONFIGS / "sft-tiny.yaml"), f"output_dir={out}",
                     "train.max_steps=1", "train.eval_strategy=no", "data.eval_fraction=0.0", "data.max_records=4",
                     "train.use_cpu=false"], env={"TMPDIR": str(tmp_path)}, timeout=300)
    assert proc.returncode != 0 and not proc.timed_out, proc.failure(3000)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("alignkit sft: ")]
    assert 1 <= len(lines) <= 2 and all(line.startswith("alignkit sft: error: SFTTrainer: the launcher started 2 "
                                                        "processes") and "train.use_cpu=false" in line
                                        for line in lines), proc.failure(3000)
    assert not out.exists()


def test_online_loop_under_accelerate_mixed_precision_is_refused_before_writing(tmp_path):
    """An accelerate launch with mixed_precision bf16 (a config file's, --mixed_precision, or `accelerate config`'s
    default) reaches the online loop as ACCELERATE_MIXED_PRECISION: accelerate wrapped the policy's forward in bf16
    autocast, and the first generation stopped with 'unexpected error: RuntimeError: Expected query, key, and value
    to have the same dtype' after the run folder was written. Now one line naming mixed_precision, nothing written.
    (The offline trainers apply it: the model card records it.)"""
    out = tmp_path / "mp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path), "ACCELERATE_MIXED_PRECISION": "bf16",
           "PYTHONPATH": os.pathsep.join(p for p in (SRC, os.environ.get("PYTHONPATH", "")) if p)}
    line = refused([sys.executable, "-m", "alignkit", "-q", "grpo", "--config", str(CONFIGS / "grpo-tiny.yaml"),
                    f"output_dir={out}", "train.max_steps=1"], "grpo", env, out)
    assert line.startswith("alignkit grpo: error: GRPOTrainer: accelerate's mixed_precision is 'bf16'") \
        and "--mixed_precision no" in line, line


@pytest.mark.parametrize("env, refused_version", [({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, "1"),
                                                   ({"ACCELERATE_USE_FSDP": "true"}, "1"),  # accelerate's default
                                                   ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, None),
                                                   ({}, None)])
def test_fsdp1_is_refused_on_a_machine_without_gpus(env, refused_version, monkeypatch):
    import torch

    from alignkit.distributed import refuse_fsdp1_on_cpu
    from alignkit.settings import ConfigError

    if torch.cuda.is_available():
        pytest.skip("FSDP1 runs on GPUs")
    for key in ("ACCELERATE_USE_FSDP", "FSDP_VERSION", "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    if refused_version is None:
        refuse_fsdp1_on_cpu()
    else:
        with pytest.raises(ConfigError, match=rf"asks for FSDP version {refused_version} .*set fsdp_version: 2"):
            refuse_fsdp1_on_cpu()


@pytest.mark.slow
def test_accelerate_fsdp1_config_on_cpu_processes_is_refused_in_one_line(tmp_path):
    """An accelerate FSDP config with fsdp_version: 1 (or none: accelerate's default) on CPU processes: every rank
    stopped with 'unexpected error: RuntimeError: There are currently no available devices found, must be one of
    XPU, CUDA, ...' (accelerate's FSDP1 plugin). Now the one line says which setting and the fix; nothing written."""
    config = tmp_path / "fsdp1.yaml"
    config.write_text((CONFIGS / "accelerate" / "fsdp2.yaml").read_text().replace("fsdp_version: 2", "fsdp_version: 1"))
    out = tmp_path / "fsdp1"
    lines = refused_sft_launch(config, out, tmp_path)
    refusal = "alignkit sft: error: the accelerate config asks for FSDP version 1"
    assert all(line.startswith(refusal) for line in lines), lines  # (CI once saw another line: now shown)
    assert not out.exists()


def test_several_gpus_without_a_launcher_are_refused_before_writing(tmp_path, monkeypatch, capsys):
    """A plain `alignkit sft` in a process that sees several GPUs: transformers' Trainer (n_gpu > 1, parallel_mode
    NOT_DISTRIBUTED) wrapped the model in torch.nn.DataParallel, per_device_train_batch_size on each GPU, so another
    effective batch than the config's, without a word. Now one line naming the launchers and CUDA_VISIBLE_DEVICES=0,
    nothing written. The GPUs are faked: transformers counts them with torch.cuda.device_count (no CUDA here, so
    the device stays the CPU)."""
    import torch
    from transformers.training_args import ParallelMode, TrainingArguments

    from alignkit.cli import main

    if torch.cuda.is_available():
        pytest.skip("the fake GPU count is for a machine without CUDA")
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_CPU"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    args = TrainingArguments(str(tmp_path / "unused"), report_to="none")
    assert (args.n_gpu, args.parallel_mode) == (3, ParallelMode.NOT_DISTRIBUTED)  # what makes the Trainer wrap
    out = tmp_path / "dp"
    code = main(["-q", "sft", "--config", str(CONFIGS / "sft-tiny.yaml"), f"output_dir={out}", "train.max_steps=1",
                 "train.eval_strategy=no", "data.eval_fraction=0.0", "data.max_records=4"])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("alignkit sft: ")]
    assert code == 2 and len(lines) == 1 and not out.exists(), lines
    assert lines[0].startswith("alignkit sft: error: this process sees 3 GPUs and was started without a launcher") \
        and "torch.nn.DataParallel" in lines[0] and "3x the batch" in lines[0] \
        and "torchrun --nproc_per_node 3" in lines[0] and "CUDA_VISIBLE_DEVICES=0" in lines[0], lines


@pytest.mark.slow
def test_accelerate_deepspeed_parameter_offload_under_zero2_is_refused_in_one_line(tmp_path):
    """An accelerate DeepSpeed config with zero_stage 2 and offload_param_device cpu: accelerate passes offload_param
    into the DeepSpeed config, which DeepSpeed's stage-2 engine never reads, so the run trained with the parameters
    where they were, without a word (tests/compat A21). Now every rank stops at the trainer's construction with the
    one line naming the key, the stage and the fix; no run folder is written."""
    pytest.importorskip("deepspeed")
    config = tmp_path / "zero2-offload.yaml"
    config.write_text((CONFIGS / "accelerate" / "zero2-cpu.yaml").read_text().replace(
        "offload_param_device: none", "offload_param_device: cpu"))
    out = tmp_path / "z2"
    lines = refused_sft_launch(config, out, tmp_path, DS_ACCELERATOR="cpu")
    assert all(line.startswith("alignkit sft: error: the accelerate config's deepspeed_config: zero_optimization."
                               "offload_param.device is cpu under zero_optimization.stage 2, where DeepSpeed offloads "
                               "no parameters") and line.endswith("(accelerate config: offload_param_device: none)")
               for line in lines), lines
    assert not out.exists()


@pytest.mark.parametrize("command", ["sft", "grpo"])
def test_fsdp1_on_cpu_is_refused_before_the_data_or_any_rendezvous(command, tmp_path, capsys, monkeypatch):
    """The refusal came from the trainer, after the data, the model and the processes' rendezvous (a wait on the
    other rank): each process now refuses alone at the start, so a rank that is slower than the first to fail cannot
    be caught waiting (CI once saw a second, different line from test_accelerate_fsdp1_config_on_cpu_processes_...)."""
    import torch

    import alignkit.cli.online as online_cli
    import alignkit.cli.train as train_cli
    from alignkit.cli import main

    if torch.cuda.is_available():
        pytest.skip("FSDP1 runs on GPUs")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")

    def no_data(*a, **k):
        raise AssertionError("the data was read before the FSDP1 refusal")

    monkeypatch.setattr(train_cli, "load_data", no_data)
    monkeypatch.setattr(online_cli, "read_prompt_splits", no_data)
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["-q", command, "--config", str(CONFIGS / f"{command}-tiny.yaml"), f"output_dir={out}"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith(f"alignkit {command}: error: the accelerate config asks for FSDP "
                                               "version 1"), err
    assert not out.exists()
