"""The checks of the side-by-side suites' own figures. bench/common.median_ci: the distribution-free interval the
suites print for the median paired ratio (order statistics and coverages worked out by hand from the binomial(n,
1/2) distribution); run_cpu / online_cpu: a ratio only where both sides did the same work, failed repeats counted,
spreads by hand, selections of nothing refused before writing; reft_overhead: an intervention that edits nothing
refused, generations of other lengths too; the A/B scripts (compile_ab, online_gen_ab, serve_load, fused_layer_ab):
no ratio of runs that did other work; fused_layer_ab's re-stated decoder layer computes transformers' (values and
gradients) and refuses where it does not apply."""

import contextlib
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="module")
def common():
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("bench_common", BENCH / "common.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(BENCH))


def test_five_repeats_give_min_and_max(common):
    # k = 1: 1 - 2 * C(5,0) / 32 = 30/32; k = 2 would cover 1 - 2 * (1 + 5) / 32 = 0.625
    assert common.median_ci([2.3, 1.9, 2.1, 1.7, 2.6]) == (1.7, 2.6, 30 / 32)


def test_eleven_repeats_drop_two_from_each_end(common):
    xs = [float(x) for x in (11, 3, 7, 1, 9, 5, 2, 10, 4, 8, 6)]
    # k = 3: 1 - 2 * (1 + 11 + 55) / 2048 = 0.934570...; k = 4: 1 - 2 * 232 / 2048 = 0.7734 < 0.90
    assert common.median_ci(xs) == (3.0, 9.0, 1 - 134 / 2048)
    # at 0.95 only k = 2 qualifies: 1 - 2 * 12 / 2048
    assert common.median_ci(xs, level=0.95) == (2.0, 10.0, 1 - 24 / 2048)


def test_too_few_repeats_give_no_interval(common):
    assert common.median_ci([1.0, 2.0, 3.0, 4.0]) is None  # (min, max) of 4 covers 1 - 2/16 = 0.875
    assert common.paired_summary([1.0, 2.0, 3.0, 4.0]) == "2.50 (1.00-4.00, n=4)"
    assert common.paired_summary([]) == "—"
    assert common.paired_summary([2.0] * 9) == "2.00 (2.00-2.00, n=9; median's CI96.1% 2.00-2.00)"


# ----------------------------------------------------------------------------- same work on both sides (run_cpu, online_cpu)
def _load(name):
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod  # dataclasses look their module up while the class is made
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(BENCH))


@pytest.fixture(scope="module")
def run_cpu():
    return _load("run_cpu")


def _res(library, sps, tokens=8946, loss=6.9579, status="ok", settings=None, effective=None, cpu_s=None):
    """One side's result JSON as the side scripts write it (only the fields the report reads)."""
    if status != "ok":
        return {"library": library, "status": status, "reason": "Traceback ... RuntimeError: boom"}
    return {"library": library, "status": "ok", "samples_per_s": sps, "samples_per_cpu_s": cpu_s or sps,
            "tokens_per_s": tokens * sps / 160, "timed_tokens": tokens, "peak_rss_mb": 500.0, "final_loss": loss,
            "steps": 20, "warmup": 3, "settings": {"batch_size": 8, "padding_free": False, **(settings or {})},
            "effective": effective or {}}


def _row(run_cpu, ak: list[dict], peer: list[dict], setting="default"):
    case = run_cpu.Case("sft", "small", "trl", [])
    case.reps = {("alignkit", setting): ak, ("trl", setting): peer}
    case.runs = {k: run_cpu.median_result(v) for k, v in case.reps.items()}
    (row,) = run_cpu.comparisons([case], (setting,))
    return row, run_cpu.table([row])


def test_same_work_gives_the_ratio(run_cpu):
    row, text = _row(run_cpu, [_res("alignkit", 20.0)], [_res("trl", 10.0)])
    assert row["speed_ratio"] == 2.0 and row["paired_wall"] == [2.0] and row["not_comparable"] == []
    assert "NOT COMPARABLE" not in text and "n/c" not in text


def test_different_token_counts_withhold_the_ratio(run_cpu):
    """alignkit trained 8946 tokens, the peer 8000 (10.6 % apart): samples/s do not compare the same work."""
    row, text = _row(run_cpu, [_res("alignkit", 20.0, tokens=8946)], [_res("trl", 10.0, tokens=8000)])
    assert row.get("speed_ratio") is None and row["paired_wall"] == []
    assert row["not_comparable"] == ["timed_tokens 8946 vs 8000 (10.6% apart, over 5%)"]
    assert "n/c" in text and "NOT COMPARABLE sft/small/default" in text
    # share_prompt feeds each pair's prompt once, by design: token counts then differ and are not a mismatch
    row, _ = _row(run_cpu, [_res("alignkit", 20.0, tokens=6000, effective={"share_prompt": True})],
                  [_res("trl", 10.0, tokens=8000)])
    assert row["speed_ratio"] == 2.0


def test_non_finite_or_distant_final_loss_withholds_the_ratio(run_cpu):
    row, _ = _row(run_cpu, [_res("alignkit", 20.0, loss=float("nan"))], [_res("trl", 10.0)])
    assert row.get("speed_ratio") is None and row["not_comparable"] == ["alignkit final loss nan"]
    row, _ = _row(run_cpu, [_res("alignkit", 20.0, loss=6.0)], [_res("trl", 10.0, loss=6.9579)])
    assert row.get("speed_ratio") is None and row["not_comparable"][0].startswith("final loss 6.0000 vs 6.9579")
    # within 5 %: 6.9579 * 0.96 = 6.68
    row, _ = _row(run_cpu, [_res("alignkit", 20.0, loss=6.68)], [_res("trl", 10.0, loss=6.9579)])
    assert row["speed_ratio"] == 2.0


def test_a_setting_asked_and_not_run_withholds_the_ratio(run_cpu):
    """TRL asked --padding-free --precision fp32 and reports padded batches in bf16: a fallback, not its fastest."""
    peer = _res("trl", 10.0, settings={"padding_free": True, "precision": "fp32", "grad_ckpt": "off"},
                effective={"padding_free": False, "bf16": True, "gradient_checkpointing": False})
    row, _ = _row(run_cpu, [_res("alignkit", 20.0)], [peer], setting="fastest")
    assert row.get("speed_ratio") is None
    assert sorted(row["not_comparable"]) == ["trl asked padding_free=True but ran padding_free=False",
                                             "trl asked precision=fp32 but ran bf16=True"]


def test_a_failed_repeat_is_counted_not_dropped(run_cpu):
    """3 repeats, alignkit's second crashed: 2 paired ratios (20/10, 22/10) and the crash named beside them."""
    ak = [_res("alignkit", 20.0), _res("alignkit", 0, status="error"), _res("alignkit", 22.0)]
    row, text = _row(run_cpu, ak, [_res("trl", 10.0)] * 3)
    assert row["paired_wall"] == [2.0, 2.2]
    assert row["failed_runs"] == ["alignkit r1: error: Traceback ... RuntimeError: boom"]
    assert "[2 of 3 pairs; 1 run(s) without a result (alignkit r1: error:" in text
    assert "(n=2, 1 FAILED)" in text  # alignkit's spread over its repeats


def test_online_pairs_check_generated_tokens_and_dpo_loss():
    online = _load("online_cpu")

    def r(lib, gen, loss, **settings):
        return {"library": lib, "status": "ok", "steps": 4, "warmup": 1, "generated_tokens": gen, "final_loss": loss,
                "settings": {"prompts_per_step": 8, "num_samples": 4, "max_new_tokens": 32, **settings},
                "effective": {"share_prompt": True} if lib == "alignkit" else {}}

    assert online.same_work(r("alignkit", 6070, 1e-8), r("trl", 5972, 5e-9), "grpo") == []  # 1.6 % apart
    # 4.6 % short of the budget on one side: 5000 vs 6070 generated is 17.6 % apart (share_prompt is no excuse here)
    assert online.same_work(r("alignkit", 6070, 1e-8), r("trl", 5000, 5e-9), "grpo") == [
        "generated_tokens 6070 vs 5000 (17.6% apart, over 10%)"]
    assert online.same_work(r("alignkit", 3026, 0.6931), r("trl", 3042, 0.9), "online_dpo") == [
        "final loss 0.6931 vs 0.9000 (apart by more than 5% / 0.02)"]
    assert online.same_work(r("alignkit", 3026, 0.6931), r("trl", 3042, 0.6931, num_samples=2), "grpo") == [
        "num_samples 4 vs 2"]


def test_reft_overhead_refuses_to_time_an_intervention_that_edits_nothing():
    """bench/reft_overhead.py times 'reft' against 'plain': a ReFT model whose intervention changes no logit (here the
    plain model itself stands in for it) would time no edit, so the script stops before timing."""
    import torch

    from alignkit.interventions.attach import get_reft_model
    from alignkit.interventions.config import ReftConfig

    ro = _load("reft_overhead")
    plain = ro.build_model()
    reft = get_reft_model(ro.build_model(), ReftConfig.uniform([2], "loreft", low_rank_dimension=4)).eval()
    ids = torch.randint(3, ro.VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    mask, loc = torch.ones_like(ids), torch.full((2, 1, 1), 15)
    assert ro.check_edit(plain, reft, ids, mask, loc) > 0

    class NoEdit(torch.nn.Module):  # takes the locations and ignores them
        def forward(self, intervention_locations=None, **kw):
            return plain(**kw)

    with pytest.raises(SystemExit, match="changed no logit"):
        ro.check_edit(plain, NoEdit(), ids, mask, loc)


def test_median_result_by_hand(run_cpu):
    """Repeats at 10, 20 and 12 samples/s, one more that crashed: medians 12 samples/s (tokens/s 12 x 8946 / 160 =
    670.95), spread (20 - 10) / 12 = 0.8333, the crash counted."""
    rs = [_res("alignkit", 10.0), _res("alignkit", 0, status="error"), _res("alignkit", 20.0), _res("alignkit", 12.0)]
    out = run_cpu.median_result(rs)
    assert out["samples_per_s"] == 12.0 and out["tokens_per_s"] == pytest.approx(670.95)
    assert out["spread"] == pytest.approx(10 / 12)
    assert out["repeats"] == {"samples_per_s": [10.0, 20.0, 12.0], "peak_rss_mb": [500.0] * 3, "failed": 1}
    assert run_cpu.side_spread(out) == "83% (n=3, 1 FAILED)"


def test_run_cpu_refuses_a_selection_of_nothing_before_writing(run_cpu, tmp_path):
    """--only with a typo selected no comparison: the old script wrote an empty table, a results JSON and a chart."""
    with pytest.raises(SystemExit, match=r"select no comparison; --only matches part of one of: .*sft/small/"):
        run_cpu.main(["--only", "smal/l1", "--results", str(tmp_path)])
    assert list(tmp_path.iterdir()) == []


def test_online_cpu_refuses_nothing_to_run_before_writing(tmp_path):
    online = _load("online_cpu")
    for argv in (["--methods"], ["--sides"], ["--repeats", "0"]):
        with pytest.raises(SystemExit, match="online_cpu.py: nothing to run"):
            online.main([*argv, "--results", str(tmp_path)])
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- the A/B scripts: the same work too
def test_compile_ab_pairs_only_runs_of_the_same_work(common):
    """compile_ab printed compiled/eager steps/s whatever the runs did: a compiled run whose losses went elsewhere (or
    NaN), that timed other tokens, or that compiled nothing. Such a pair now gives no ratio."""
    ab = _load("compile_ab")

    def run(library, losses, tokens=4000, layers=4):
        return {"library": library, "status": "ok", "steps": 2, "warmup": 2, "settings": {"batch_size": 8},
                "timed_tokens": tokens, "final_loss": losses[-1], "losses": losses,
                "compiled_layers": layers if library == "compiled" else 0, "steps_per_s": 10.0}

    eager = run("eager", [6.93, 6.92, 6.91, 6.90])
    assert ab.same_work(eager, run("compiled", [6.93, 6.92, 6.91, 6.9000004])) == []  # float noise only
    assert ab.same_work(eager, run("compiled", [6.93, 6.92, 6.95, 6.90])) == ["losses apart at step(s) [3]"]
    assert ab.same_work(eager, run("compiled", [6.93, 6.92, 6.91, float("nan")])) == [
        "compiled final loss nan", "losses apart at step(s) [4]"]
    assert ab.same_work(eager, run("compiled", [6.93, 6.92, 6.91, 6.90], tokens=3990)) == [
        "timed_tokens 4000 vs 3990 (0.2% apart, over 0%)"]
    assert ab.same_work(eager, run("compiled", [6.93, 6.92, 6.91, 6.90], layers=0)) == [
        "the compiled run compiled no layer"]
    kept, excluded, failed = common.pair_repeats(
        [eager, eager], [run("compiled", eager["losses"]), run("compiled", [6.93, 6.92, 6.95, 6.90])],
        check=ab.same_work)
    assert len(kept) == 1 and excluded == ["r1: losses apart at step(s) [3]"] and failed == []


def test_generations_of_other_lengths_are_not_the_same_work(common):
    """online_gen_ab compared CPU per call of generate and the inverse-CDF variants, whose draws differ: with stop
    tokens 376 vs 292 tokens were generated (rows ending elsewhere). A ratio needs rows of the same lengths."""
    assert common.generation_mismatch([[1, 2, 3], [4, 5]], [[7, 8, 9], [1, 1]]) == ""  # other tokens, same work
    assert common.generation_mismatch([[1, 2, 3], [4, 5]], [[7, 8], [1, 1]]) == (
        "5 vs 4 tokens generated (1 of 2 rows of other lengths)")
    assert common.generation_mismatch([[1]], [[1], [2]]) == "1 vs 2 rows"


def test_serve_load_ratios_need_the_same_work():
    """serve_load's tok/s ratios counted only the requests that succeeded, and runs cut by --time-cap or whose
    requests ended early: such a round is now left out of the ratio and named."""
    sl = _load("serve_load")

    def run(sc, **kw):
        return {"scenario": sc, "clients": 8, "asked": 32, "requests": 32, "errors": 0, "short": 0, **kw}

    assert sl.same_work(run("reft4"), run("one")) == []
    assert sl.same_work(run("reft4", errors=3), run("one", requests=20, short=1)) == [
        "reft4 x8: 3 of 32 requests failed", "one x8: 20 of 32 requests sent before --time-cap",
        "one x8: 1 request(s) ended before max_tokens"]
    summary = sl.summarize([{"ok": True, "ttft": 0.1, "latency": 0.5, "tokens": 4},
                            {"ok": True, "ttft": 0.1, "latency": 0.5, "tokens": 2},
                            {"ok": False, "ttft": 0.0, "latency": 0.0, "tokens": 0}], 2.0, 4, 4)
    assert (summary["asked"], summary["requests"], summary["errors"], summary["short"]) == (4, 3, 1, 1)
    assert summary["out_tok_per_s"] == 3.0  # (4 + 2) / 2 s


def test_reft_overhead_refuses_generations_of_other_lengths():
    import torch

    ro = _load("reft_overhead")
    full = torch.zeros(ro.BATCH, ro.SEQ + ro.NEW, dtype=torch.long)
    ro.check_same_generation({"plain": full, "reft": full})
    with pytest.raises(SystemExit, match="NOT COMPARABLE"):
        ro.check_same_generation({"plain": full, "reft": full[:, :-1]})


# ----------------------------------------------------------------------------- attention_ab: the layouts it times agree
def test_attention_ab_variants_compute_causal_attention_per_sequence():
    """bench/attention_ab.py times layouts of the same attention; each must be causal attention over each sequence
    alone with GQA (query head h reads key/value head h // 2). Checked against that written out per head, in float64."""
    ab = _load("attention_ab")
    lens, q, k, v = ab.make_batches(1, seed=3)[0]
    want, s = [], 0
    for n in lens:
        for h in range(ab.H):
            qh, kh, vh = (x[0, i, s:s + n].double() for x, i in ((q, h), (k, h // 2), (v, h // 2)))
            att = (qh @ kh.T) / ab.D ** 0.5 + torch.full((n, n), float("-inf"), dtype=torch.float64).triu(1)
            want.append(att.softmax(-1) @ vh)
        s += n
    ref = torch.stack([torch.cat(want[h::ab.H]) for h in range(ab.H)])  # (H, S, D)
    for name, fn in ab.VARIANTS.items():
        torch.testing.assert_close(fn(lens, q, k, v)[0].double(), ref, rtol=1e-5, atol=1e-5, msg=name)


# ----------------------------------------------------------------------------- fused_layer_ab: the layer it times
def _fused_ab_model(arch, rope=False):
    from transformers import AutoModelForCausalLM

    from alignkit.models.tiny import tiny_config

    cfg = tiny_config(arch, vocab_size=211, num_layers=2)
    if rope:  # linear rope scaling: positions halved (cos / sin come from the model's own rotary module)
        cfg.rope_parameters = {**cfg.rope_parameters, "rope_type": "linear", "factor": 2.0}
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").train()


def _fused_ab_layouts():
    from alignkit.models import varlen

    g = torch.Generator().manual_seed(3)
    padded = torch.randint(5, 200, (3, 9), generator=g)
    padded[1, 6:] = 0
    padded[2, 4:] = 0
    lengths = [5, 3, 6]
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    return {"padded": {"input_ids": padded, "attention_mask": (padded != 0).long()},
            "varlen": {"input_ids": torch.randint(5, 200, (1, 14), generator=g), "position_ids": pos,
                       varlen.LAYOUT_KEY: varlen.varlen_layout(lengths)}}


@pytest.mark.parametrize("arch,rope", [("llama", False), ("qwen2", False), ("llama", True)])
def test_fused_layer_ab_layer_is_transformers_layer(arch, rope):
    """bench/fused_layer_ab.py times a re-stated decoder layer; it must compute transformers' layer: the logits and
    the gradients of every parameter and of the input embeddings equal the model's own (llama; qwen2, whose q/k/v
    have biases; linear rope scaling), on padded rows with their mask and on one packed varlen row, with every
    lever on and with none. Tolerance: float32 rounding of other op orders (1e-5 of the largest value)."""
    from alignkit.models import varlen

    ab = _load("fused_layer_ab")
    lm = _fused_ab_model(arch, rope)
    assert lm.model.layers[0].self_attn.q_proj.bias is not None or arch != "qwen2"
    varlen.register()
    for layout, kw in _fused_ab_layouts().items():
        kw = {**kw, "use_cache": False}
        emb = lm.model.embed_tokens(kw.pop("input_ids")).detach()

        def run(levers):
            lm.zero_grad(set_to_none=True)
            x = emb.clone().requires_grad_()
            with contextlib.ExitStack() as stack:
                if varlen.LAYOUT_KEY in kw:
                    stack.enter_context(varlen.varlen_attention(lm))
                if levers is not None:
                    stack.enter_context(ab.fused(lm, kw, levers))
                logits = lm(inputs_embeds=x, **kw).logits
            (logits * torch.linspace(-1, 1, logits.shape[-1])).sum().backward()
            grads = {n: p.grad.clone() for n, p in lm.named_parameters() if p.grad is not None}
            return logits.detach(), x.grad, grads

        want, want_dx, want_g = run(None)
        for levers in ((), ab.LEVERS):
            got, got_dx, got_g = run(levers)
            what = f"{arch} rope={rope} {layout} levers={levers}"
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()), msg=what)
            assert got_g.keys() == want_g.keys() and len(want_g) == len(list(lm.parameters())) - 1, what  # no embed
            for n, g in [("inputs_embeds", want_dx), *want_g.items()]:
                d = float(((got_dx if n == "inputs_embeds" else got_g[n]) - g).abs().max())
                assert d <= 1e-5 * float(g.abs().max()), f"{what}: gradient of {n} apart by {d:.2e}"
        assert all("forward" not in x.__dict__ for x in lm.model.layers)  # restored


def test_fused_layer_ab_refuses_where_the_layer_is_not_transformers_own():
    """A hook inside a layer (a ReFT intervention, offload) or another attention: the script would time another
    computation, so `fused` refuses instead of measuring it."""
    ab = _load("fused_layer_ab")
    lm = _fused_ab_model("llama")
    kw = {"use_cache": False}
    assert ab.unusable_reason(lm, kw) is None
    handle = lm.model.layers[1].mlp.register_forward_hook(lambda *a: None)
    with pytest.raises(RuntimeError, match="a hook on LlamaMLP in a decoder layer"):
        with ab.fused(lm, kw):
            pass
    handle.remove()
    assert "KV cache" in ab.unusable_reason(lm, {})
    lm.config._attn_implementation = "eager"
    assert "attention implementation 'eager'" in ab.unusable_reason(lm, kw)


def test_fused_layer_ab_runs_tiny_and_stops_on_other_work(tmp_path, monkeypatch):
    """The script end to end on 2 batches of the suite's small SFT data (every variant timed, paired ratios per
    variant), and its same-work check: a SiLU backward that is off by 1 % stops it before any timing."""
    ab = _load("fused_layer_ab")
    summary = ab.main(["--rounds", "1", "--batches", "2", "--run-dir", str(tmp_path)])
    assert set(summary["ratios"]) == set(ab.VARIANTS) and summary["ratios"]["transformers"] == [1.0]
    assert summary["max_rel_loss_difference"] < 1e-5
    wrong = ab.SiluMul.backward
    monkeypatch.setattr(ab.SiluMul, "backward", staticmethod(lambda ctx, g: tuple(1.01 * x for x in wrong(ctx, g))))
    with pytest.raises(SystemExit, match="fused\\+silu is not transformers' step .*gradient of model.layers"):
        ab.main(["--rounds", "1", "--batches", "2", "--run-dir", str(tmp_path)])


# ----------------------------------------------------------------------------- online_cpu --vllm (bench/online_vllm.py)
def _rows(*specs):
    """Fake samples: (number of tokens, finish reason, last token) per row; ids distinct per row unless `same`."""
    from types import SimpleNamespace

    out = []
    for i, (n, reason, last) in enumerate(specs):
        ids = [10 + i] * (n - 1) + [last] if n else []
        out.append(SimpleNamespace(response_ids=ids, finish_reason=reason))
    return out


def test_generation_tally_by_hand():
    """max_new_tokens 4, EOS id 2: a row of 4 at 'length', a row of 3 ending with 2 at 'eos' are real; a row of 2
    at 'length' (cut short, no end token), a row of 3 'eos' whose last id is not an end token, and a row of 5 are not."""
    ov = _load("online_vllm")
    tally = ov.GenerationTally(4, {2})
    tally.add(_rows((4, "length", 7), (3, "eos", 2)))
    r = {"library": "alignkit", "generation_backend": "vllm", "final_loss": 0.0, "generated_tokens": 7,
         "generation": tally.result()}
    assert r["generation"] == {"rows": 2, "rows_at_max_new_tokens": 1, "rows_ended_eos": 1, "rows_short_without_eos": 0,
                               "rows_over_max_new_tokens": 0, "distinct_rows": 2, "max_new_tokens": 4}
    assert ov.generation_problems(r) == []
    tally.add(_rows((2, "length", 7), (3, "eos", 9), (5, "length", 7)))
    r["generation"] = tally.result()
    assert ov.tally_problems(r) == [
        "alignkit/vllm: 2 of 5 rows ended before max_new_tokens (4) without an end token",
        "alignkit/vllm: 1 of 5 rows longer than max_new_tokens"]
    r.update(final_loss=float("nan"), generated_tokens=0)
    assert ov.generation_problems(r)[:2] == ["alignkit/vllm: final loss nan", "alignkit/vllm: no tokens generated in "
                                             "the timed steps"]


def test_generation_tally_flags_copies():
    """4 rows, 1 distinct: under half of them differ (sampled at temperature 1 from a random model, all would)."""
    from types import SimpleNamespace

    ov = _load("online_vllm")
    tally = ov.GenerationTally(3, {2})
    tally.add([SimpleNamespace(response_ids=[5, 6, 7], finish_reason="length") for _ in range(4)])
    assert ov.tally_problems({"library": "alignkit", "generation": tally.result()}) == [
        "alignkit/transformers: only 1 distinct rows of 4 (sampled at temperature 1)"]


def test_online_vllm_pair_with_cut_rows_gets_no_ratio():
    """vLLM / transformers generation: the same work by every other measure, but the vLLM side's rows stopped
    early without an end token: the pair is named, not paired."""
    online = _load("online_cpu")
    gen = lambda short: {"rows": 96, "rows_at_max_new_tokens": 96 - short, "rows_ended_eos": 0,  # noqa: E731
                         "rows_short_without_eos": short, "rows_over_max_new_tokens": 0, "distinct_rows": 96,
                         "max_new_tokens": 32}
    base = {"library": "alignkit", "status": "ok", "steps": 6, "warmup": 1, "final_loss": 0.0, "cpu_seconds": 2.0,
            "steps_per_s": 1.0, "generated_tokens_per_s": 900.0,
            "settings": {"prompts_per_step": 8, "num_samples": 4, "max_new_tokens": 32}, "effective": {}}
    hf = dict(base, generated_tokens=6144, generation=gen(0))
    good = dict(base, generated_tokens=6100, generation_backend="vllm", generation=gen(0), cpu_seconds=1.0)
    cut = dict(good, generation=gen(12))
    assert online.same_work(good, hf, "grpo") == []
    runs = {("grpo", "alignkit", "vllm"): [good, cut], ("grpo", "alignkit", "hd64"): [hf, hf]}
    row, line = online.table_row("grpo", ("alignkit", "vllm"), ("alignkit", "hd64"), runs)
    assert row["cpu_ratios"] == [2.0]  # hf 2.0 CPU s / vLLM 1.0 CPU s, repeat 0 only
    assert row["not_comparable"] == ["r1: alignkit/vllm: 12 of 96 rows ended before max_new_tokens (32) without an "
                                     "end token"]
    assert "GENERATIONS NOT REAL: alignkit-vllm r1: alignkit/vllm: 12 of 96 rows" in line


def test_online_cpu_vllm_sides_need_the_flag_and_a_warmup(tmp_path):
    online = _load("online_cpu")
    with pytest.raises(SystemExit, match="--sides alignkit-vllm: the vLLM rows' sides run with --vllm; add it"):
        online.main(["--sides", "alignkit-vllm", "--results", str(tmp_path)])
    with pytest.raises(SystemExit, match="--vllm with --warmup 0: the engine starts in the first generation call"):
        online.main(["--vllm", "--warmup", "0", "--results", str(tmp_path)])
    assert list(tmp_path.iterdir()) == []
    args, order = online.parse(["--vllm", "--sides", "alignkit-vllm", "trl-hd64"])
    assert order == [("alignkit", "vllm"), ("trl", "hd64")]
    py, spec, extra, env = online.side_setup("alignkit", "vllm", args, {"small": "s", "small_hd64": "h"})
    assert spec == "h" and extra == ["--generation-backend", "vllm"] and env["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert env["PYTHONPATH"].split(":")[0] == str(BENCH.parent / "src")


def test_small_hd64_scenario_has_head_dim_64(common):
    """vLLM's CPU attention needs head_dim >= 64: hidden 128 over 2 heads; 1 KV head; otherwise the "small" model."""
    m = common.SCENARIOS["small_hd64"]["model"]
    assert m["hidden_size"] // m["num_attention_heads"] == 64 and m["num_key_value_heads"] == 1
    assert {k: v for k, v in m.items() if k not in ("num_attention_heads", "num_key_value_heads")} == {
        k: v for k, v in common.SCENARIOS["small"]["model"].items() if k not in ("num_attention_heads",
                                                                                    "num_key_value_heads")}
