"""vLLM server mode: `alignkit vllm-serve` in a subprocess (a tiny Llama, head_dim 64), GRPO in this process with
`generation_backend="vllm", vllm_mode="server"` pushing its weights over HTTP after every optimizer step. For a
LoRA policy (first: the server's base must still be the original) and a full policy, checked:
A peft LoRA folder pushed as it is (first, on the original base): the server's greedy tokens equal peft's in
transformers, and a LoRA of a deeper base is refused in one line with nothing written to the server's --workdir.
For GRPO, (a) after a push, the server's greedy tokens equal transformers' greedy tokens for the UPDATED policy (and differ
    from the initial policy's: the push carried new weights);
(b) the mean reward (transformers sampling, fixed seed) rises by more than MIN_GAIN, as it does with the
    colocated engine (test_online.py, same policy, prompts, reward and hyperparameters: grpo_worker.py).
The server's /info counts the pushes (full: weights_version; LoRA: lora_version). The server runs with --api-key
(the trainer sends ALIGNKIT_VLLM_API_KEY); tests/online/test_vllm_server_client.py checks the refusals."""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pytest
import torch

from alignkit.online.vllm_client import API_KEY_ENV

from .conftest import PYTHON, run_env
from .grpo_worker import HEAD_SCALE, LR, PROMPTS, digit_fraction, greedy, mean_reward

MIN_GAIN = 0.08
STEPS = 6


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(model folder, server URL, its --workdir): the tiny base saved, `alignkit vllm-serve` started on a free
    port."""
    from alignkit.models.loading import load_model
    from alignkit.models.tiny import save_tiny

    root = tmp_path_factory.mktemp("vllm-serve")
    folder = save_tiny(root / "base", "llama", hidden_size=128, num_heads=2)
    model = load_model(folder)
    with torch.no_grad():
        model.lm_head.weight.mul_(HEAD_SCALE)
    model.save_pretrained(folder)
    log = root / "server.log"
    cmd = [PYTHON, "-m", "alignkit", "vllm-serve", "--model", str(folder), "--port", "0", "--dtype", "float32",
           "--max-model-len", "128", "--enable-lora", "--max-lora-rank", "8", "--api-key", "test-key",
           "--workdir", str(root / "work")]
    os.environ[API_KEY_ENV] = "test-key"  # the trainer's side of --api-key
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=run_env(), stdout=out, stderr=subprocess.STDOUT)
    try:
        t0 = time.time()
        while True:
            m = re.search(r"ready on (http://\S+)", log.read_text())
            if m:
                break
            if proc.poll() is not None or time.time() - t0 > 600:
                raise AssertionError(f"vllm-serve did not start (exit {proc.poll()}):\n{log.read_text()[-4000:]}")
            time.sleep(0.5)
        yield folder, m.group(1), root / "work"
    finally:
        os.environ.pop(API_KEY_ENV, None)
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_a_pushed_peft_lora_gives_pefts_greedy_tokens_and_a_misfit_writes_nothing(served):
    """POST /lora into the real engine (until now only against a fake one: tests/adapters/test_lora_fit.py): a peft
    LoRA (q_proj, v_proj, down_proj; B filled so it changes the tokens) pushed as `lora_blob` sends it; the server's
    greedy tokens with it equal peft's in transformers, and differ from the base's. A LoRA of a 3-layer base (vLLM's
    loader would run its first two layers and skip the third without a word) is answered 400 in one line naming
    POST /lora and a layer-2 tensor, and the server's workdir is byte for byte as before (nothing written)."""
    from peft import LoraConfig, get_peft_model

    from alignkit.models.loading import load_model, load_tokenizer
    from alignkit.models.tiny import save_tiny
    from alignkit.online.vllm_client import VllmServerClient, VllmServerError, lora_blob

    folder, url, workdir = served
    torch.set_num_threads(2)
    client, tok = VllmServerClient(url), load_tokenizer(folder)

    def peft_lora(base):
        torch.manual_seed(1)
        model = get_peft_model(load_model(base), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj",
                                                                                              "down_proj"]))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.3)
        return model.eval()

    deeper = save_tiny(folder.parent / "deeper", "llama", hidden_size=128, num_heads=2, num_layers=3)
    before, version = files_of(workdir), client.info()["lora_version"]
    with pytest.raises(VllmServerError) as e:
        client.push_lora(lora_blob(peft_lora(deeper)))
    msg = str(e.value)
    assert "\n" not in msg and re.fullmatch(
        rf"vLLM server {re.escape(url)}: POST /lora failed with HTTP 400: the pushed LoRA was not served \(nothing was "
        r"written; the policy's base must be this server's --model\): POST /lora: .*base_model\.model\.model\.layers\.2"
        r"\..*", msg), msg
    assert files_of(workdir) == before and client.info()["lora_version"] == version

    policy = peft_lora(folder)
    assert client.push_lora(lora_blob(policy))["lora_version"] == version + 1
    prompts = [tok(p)["input_ids"] for p in PROMPTS[:3]]
    greedy_req = {"n": 1, "max_tokens": 8, "temperature": 0.0, "seed": 0, "stop_token_ids": []}

    def served_tokens(lora: bool) -> list[list[int]]:
        outs = client.generate(prompts, [greedy_req] * len(prompts), lora=lora)["outputs"]
        return [o[0]["token_ids"] for o in outs]

    eos = {tok.eos_token_id, *torch.tensor(policy.generation_config.eos_token_id or []).view(-1).tolist()}

    def cut(ids: list[int]) -> list[int]:  # vLLM ends a response at the model's EOS (kept); peft runs on past it
        return next((ids[:i + 1] for i, t in enumerate(ids) if t in eos), ids)

    with torch.no_grad():
        theirs = [cut(policy.generate(torch.tensor([p]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                                      pad_token_id=0)[0, len(p):].tolist()) for p in prompts]
    assert served_tokens(lora=True) == theirs
    assert served_tokens(lora=False) != theirs  # the adapter changes the tokens: the equality tests the push


@pytest.mark.parametrize("kind", ["lora", "full"])  # this order: the full run replaces the server's base weights
def test_grpo_with_vllm_server(served, kind):
    from alignkit.adapters import AdapterConfig, LoraSettings, apply_adapter
    from alignkit.models.loading import load_model, load_tokenizer
    from alignkit.online.generation import SamplingConfig, generate_responses
    from alignkit.online.grpo import GRPOConfig, GRPOTrainer
    from alignkit.online.vllm_client import VllmServerClient

    folder, url, _ = served
    torch.set_num_threads(2)
    tok = load_tokenizer(folder)
    pushed = VllmServerClient(url).info()  # (the LoRA test before this one pushed too)
    greedy_cfg = SamplingConfig(do_sample=False, max_new_tokens=8)
    torch.manual_seed(0)
    policy = apply_adapter(load_model(folder), AdapterConfig(kind=kind, lora=LoraSettings(r=4, alpha=8.0) if "lora" in kind else LoraSettings()))
    initial = greedy(generate_responses(policy, tok, PROMPTS, greedy_cfg))
    before = mean_reward(policy, tok)
    cfg = GRPOConfig(steps=STEPS, prompts_per_step=4, learning_rate=LR[kind], seed=0, kl_coef=0.0, epochs_per_step=2,
                     sampling=SamplingConfig(num_samples=8, max_new_tokens=3), generation_backend="vllm",
                     vllm_mode="server", vllm_server_url=url, progress_bar=False, report_to="none")
    trainer = GRPOTrainer(policy, tok, PROMPTS, {"type": "function", "fn": digit_fraction}, cfg)
    history = trainer.train()
    after = mean_reward(trainer.policy, tok)
    gen = trainer.vllm_generator
    gen.sync(trainer.policy)  # the weights of the last optimizer step
    served_greedy = greedy(gen.generate(PROMPTS, greedy_cfg, eos_source=trainer.policy))
    hf_greedy = greedy(generate_responses(trainer.policy, tok, PROMPTS, greedy_cfg))
    print(kind, {"before": before, "after": after, "step_rewards": [h["reward"] for h in history],
                 "push_s": gen.sync_seconds, "pushed_MB": gen.pushed_bytes / 1e6})
    assert served_greedy == hf_greedy
    assert hf_greedy != initial, "training did not change the greedy tokens; (a) tests nothing"
    assert before < 0.1 and after - before > MIN_GAIN, (before, after)
    assert gen.version == STEPS + 1  # one push before each step's generation, one after the last step
    info = VllmServerClient(url).info()
    key = {"full": "weights_version", "lora": "lora_version"}[kind]
    assert info[key] == pushed[key] + STEPS + 1, info
    if kind == "lora":
        assert info["weights_version"] == 0  # the base stayed the frozen one
