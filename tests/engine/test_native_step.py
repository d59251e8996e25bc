"""The compiled decoder layers of the lean decode step (engine/native_step.cpp, built by
engine/native_step.py) against transformers' own forward and the lean step's Python loop:
bitwise the same logits, step after step, for Llama and Qwen2, int4 (fused and dense paths),
bf16 and fp32, through rows leaving and joining; greedy replies through the engine identical;
the backend takes it for every batch size once built; without a compiler, or after a build
killed half-way, the server still decodes (the Python loop) or loads the library.

The build is real (a C++ compiler and ninja: `make test` installs g++; the ninja wheel is in
requirements.txt). It happens once per source and torch version, in ~/.cache/chatvlm/native.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine import native_step, packed
from engine.backend import BatchBackend, EncodedPrompt
from engine.quant import (FP32_KERNEL_ROWS, GEMV_ROWS, INT4_GROUP, Int4WeightOnlyLinear, Int8WeightOnlyLinear,
                          int4_pack, quantize_int4_weight_only, small_rows)
from tests.engine.test_lean_decode import decode_run, engine_replies, prompts, tiny_llama

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def built():
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler: install g++ (make test does as root)")
    assert native_step.wait(540), f"the native decode step did not build: {native_step.error()}"


@pytest.fixture(scope="module", params=["llama", "qwen2", "llama-fp32"])
def int4_model(request, built):
    # fp32: the compiled int4 and int8 kernels (where the CPU has avx2 and fma), in every path.
    arch, _, fp32 = request.param.partition("-")
    model, tokenizer = tiny_llama(arch=arch, dtype=torch.float32 if fp32 else torch.bfloat16)
    quantize_int4_weight_only(model)
    return model, tokenizer


@pytest.mark.parametrize("rows", [1, 3, GEMV_ROWS + 2])
def test_compiled_logits_are_bitwise_the_models(int4_model, rows):
    model, tokenizer = int4_model
    native = decode_run(model, tokenizer, rows, True, native=True)
    python = decode_run(model, tokenizer, rows, True, native=False)
    theirs = decode_run(model, tokenizer, rows, False)
    assert len(native) == len(theirs) == 6
    for a, b, c in zip(native, python, theirs):
        assert a.dtype == c.dtype and torch.equal(a, c) and torch.equal(b, c)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_without_quantization(built, dtype):
    for arch in ("llama", "qwen2"):
        model, tokenizer = tiny_llama(dtype=dtype, arch=arch)
        for a, b in zip(decode_run(model, tokenizer, 5, True, native=True), decode_run(model, tokenizer, 5, False)):
            assert torch.equal(a, b)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_packed_weights_give_the_models_logits(built, arch, monkeypatch):
    # bf16 steps of GEMV_ROWS+1 .. PACKED_ROWS rows read the dense weights reordered for oneDNN
    # (engine/packed.py), q/k/v and gate/up as one matrix each (qwen2: with their biases), and
    # the output head too; past PACKED_ROWS, and with packing off, the plain weights.
    if not packed.available(torch.bfloat16):
        pytest.skip("packed bf16 weights do not give F.linear's values on this CPU")
    model, tokenizer = tiny_llama(arch=arch)
    calls = []
    real = torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(packed, "_linear", lambda x, *a: calls.append(x.shape[0]) or real(x, *a, "none", [], ""))
    theirs = {rows: decode_run(model, tokenizer, rows, False) for rows in (GEMV_ROWS + 2, 9)}
    for rows, expected in theirs.items():
        ours = decode_run(model, tokenizer, rows, True, native=True)
        assert all(torch.equal(a, b) for a, b in zip(ours, expected))
    assert calls and set(calls) <= set(range(GEMV_ROWS + 1, packed.PACKED_ROWS + 1))  # the head, from Python
    attn = model.model.layers[0].self_attn
    assert attn.lean_pk_qkv is not None and (attn.lean_pk_qkv_bias is not None) == (arch == "qwen2")
    calls.clear()
    off = decode_run(model, tokenizer, GEMV_ROWS + 2, True, native=True, packed_decode=False)
    assert calls == [] and all(torch.equal(a, b) for a, b in zip(off, theirs[GEMV_ROWS + 2]))
    # fp32 F.linear is MKL's: packing would change values, so it is never taken.
    assert not packed.available(torch.float32)
    assert not BatchBackend(tiny_llama(dtype=torch.float32)[0], tokenizer, None, threads=1).lean.packed


def test_packed_decode_setting(monkeypatch):
    monkeypatch.setattr(packed, "available", lambda dtype: dtype == torch.bfloat16)
    cpu, big, small = torch.device("cpu"), packed.AUTO_LIMIT_BYTES + 1, 1 << 20
    assert packed.wanted("auto", small, torch.bfloat16, cpu) and not packed.wanted("auto", big, torch.bfloat16, cpu)
    assert packed.wanted(True, big, torch.bfloat16, cpu) and packed.wanted("on", big, torch.bfloat16, cpu)
    assert not packed.wanted(False, small, torch.bfloat16, cpu) and not packed.wanted("off", small, torch.bfloat16, cpu)
    assert not packed.wanted("bogus", big, torch.bfloat16, cpu)  # anything else is auto
    assert not packed.wanted(True, small, torch.float32, cpu) and not packed.wanted(True, small, torch.bfloat16,
                                                                                    torch.device("meta"))


@pytest.mark.parametrize("where", ["head", "layers"])
def test_a_packed_weight_that_gives_other_values_is_not_used(built, where, monkeypatch):
    # Each packed weight is checked against F.linear on itself before use; one that differs
    # (simulated: off by one in the output head, or in the layers' matmuls) switches packing off
    # for the model, and the steps decode from the plain weights, bitwise transformers' still.
    if not packed.available(torch.bfloat16):
        pytest.skip("packed bf16 weights do not give F.linear's values on this CPU")
    model, tokenizer = tiny_llama()
    vocab = model.config.vocab_size
    real = packed._linear

    def off(x, w, b):
        out = real(x, w, b)
        return out + 1 if (out.shape[-1] == vocab) == (where == "head") else out

    monkeypatch.setattr(packed, "_linear", off)
    ours = decode_run(model, tokenizer, GEMV_ROWS + 2, True, native=True)
    monkeypatch.setattr(packed, "_linear", real)
    assert all(torch.equal(a, b) for a, b in zip(ours, decode_run(model, tokenizer, GEMV_ROWS + 2, False)))
    assert not any(name.startswith("lean_pk_") for name in model.model.layers[0].self_attn._buffers)
    assert getattr(model.lm_head, "lean_packed", None) is None


def _awkward(shape, dtype, gen):
    """Values that round often and oddly: wide magnitudes, exact ties in bf16, zeros of both
    signs, subnormals."""
    x = torch.randn(shape, generator=gen) * torch.exp(torch.randn(shape, generator=gen) * 4)
    x.view(-1)[::7] = 0.0
    x.view(-1)[3::11] = -0.0
    x.view(-1)[5::13] = 1e-40
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_fused_element_wise_loops_round_as_aten_does(built, dtype):
    # RMSNorm and the rotary embedding run as element-wise loops in the compiled step; each
    # must round where the ATen operations they replace do (bitwise, on awkward values).
    from engine.lean_decode import _rms_norm, _rotate_half

    gen = torch.Generator().manual_seed(1)
    for rows, width in ((1, 64), (16, 576), (5, 33)):
        h, weight = _awkward((rows, width), dtype, gen), _awkward((width,), dtype, gen)
        for eps in (1e-5, 1e-6):
            norm = torch.nn.Module()
            norm.weight, norm.variance_epsilon = torch.nn.Parameter(weight, requires_grad=False), eps
            assert torch.equal(torch.ops.chatvlm_native.rms_norm(h, weight, eps), _rms_norm(h, norm))
    for rows, heads, dim in ((1, 9, 64), (16, 3, 64), (3, 2, 18)):
        flat = _awkward((rows, heads * dim + 5), dtype, gen)[:, 5:]  # a strided view, as q is
        x = flat.reshape(rows, 1, heads, dim).transpose(1, 2)
        cos, sin = (_awkward((rows, 1, 1, dim), dtype, gen) for _ in range(2))
        assert torch.equal(torch.ops.chatvlm_native.rope(x, cos, sin), (x * cos) + (_rotate_half(x) * sin))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_compiled_argmax_is_torchs(built, dtype):
    # The greedy sampler's argmax (engine/sampling.py): the first largest value, or the first
    # NaN; rows of ties, of -inf only, with +inf, and vocabularies not a multiple of 16.
    gen = torch.Generator().manual_seed(2)
    for trial in range(120):
        rows, vocab = int(torch.randint(1, 20, (), generator=gen)), int(torch.randint(1, 3000, (), generator=gen))
        x = (torch.randn(rows, vocab, generator=gen) * 3).round().to(dtype)
        if trial % 5 == 0:
            x[0, torch.randint(0, vocab, (2,), generator=gen)] = float("nan")
        if trial % 7 == 0:
            x[-1] = float("-inf")
        if trial % 11 == 0:
            x[0, -1] = float("inf")
        assert native_step.argmax_rows(x) == x.argmax(-1).tolist()
    assert native_step.argmax_rows(torch.zeros(2, 5, dtype=torch.float16)) is None  # ATen's, then


def test_the_backend_runs_every_batch_size_compiled(int4_model, monkeypatch):
    model, tokenizer = int4_model
    backend = BatchBackend(model, tokenizer, None, threads=1)
    calls = []
    real = native_step.decode_layers
    monkeypatch.setattr(native_step, "decode_layers", lambda h, *a: calls.append(h.shape[0]) or real(h, *a))
    for rows in (1, GEMV_ROWS, GEMV_ROWS + 3):
        tokens = backend.prefill(prompts(tokenizer, rows)).argmax(-1).tolist()
        backend.decode(tokens)
        backend.keep([])
    assert calls == [1, GEMV_ROWS, GEMV_ROWS + 3]
    # Switched off per model (options.native_decode: false): the Python loop, a few rows only.
    assert not BatchBackend(model, tokenizer, None, threads=1, native=False).lean.compiled(None)


def test_engine_replies_identical_compiled_and_not(int4_model):
    model, tokenizer = int4_model
    compiled = engine_replies(model, tokenizer, 6, 16, native=True)
    plain = engine_replies(model, tokenizer, 6, 16, lean=False)
    assert compiled == plain and all(compiled)


CHILD = """
import sys, torch
sys.path.insert(0, {root!r})
from engine import native_step, packed
from tests.engine.test_lean_decode import decode_run, tiny_llama
ready = native_step.wait(300)
model, tok = tiny_llama()
same = all(torch.equal(a, b) for a, b in zip(decode_run(model, tok, 2, True, native=True), decode_run(model, tok, 2, False)))
print(native_step.status(), same, native_step.error())
"""


def _child(env: dict) -> list[str]:
    out = subprocess.run([sys.executable, "-c", CHILD.format(root=str(ROOT))], env={**os.environ, **env},
                         capture_output=True, text=True, timeout=400, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().splitlines()[-1].split(" ", 2)


def test_without_a_compiler_the_python_loop_decodes(tmp_path):
    status, same, error = _child({"CXX": str(tmp_path / "no-such-compiler"), "CHATVLM_NATIVE_DIR": str(tmp_path)})
    assert status == "unavailable" and same == "True"
    assert "compiler" in error


def test_a_build_killed_half_way_does_not_block_the_next(built, tmp_path):
    # A copy of the built library's folder with the lock file a killed build leaves behind:
    # the builder's lock is an OS lock the kernel released with the process, so the file alone
    # does not make the next process wait.
    name = native_step._library_name()
    shutil.copytree(native_step.build_dir() / name, tmp_path / name)
    (tmp_path / name / "lock").write_text("")
    status, same, _ = _child({"CHATVLM_NATIVE_DIR": str(tmp_path)})
    assert status == "ready" and same == "True"


@pytest.mark.parametrize("running", [None, 200])
def test_a_long_prompt_joining_short_rows_makes_the_cache_ragged(built, monkeypatch, running):
    """Joining at least RAGGED_MIN_PAD padding positions, mostly padding (short rows) or not
    (``running``: rows of 200 positions and one of 300, three quarters real), the cache's
    padding is left unset and each row attends to its own positions: NaN written into the
    padding changes nothing, and the logits match transformers' forward over the zero-padded
    cache (fp32: to rounding; greedy tokens equal)."""
    from engine import backend as backend_module

    monkeypatch.setattr(backend_module, "RAGGED_MIN_PAD", 64)  # the tiny model's context is 512
    model, tokenizer = tiny_llama(dtype=torch.float32)
    ids = tokenizer("the river carries boats past the old mill " * 40)["input_ids"]
    long = EncodedPrompt(ids[:300])
    rows = prompts(tokenizer, 3) if running is None else [EncodedPrompt(ids[i + 1:i + 1 + running]) for i in range(3)]
    runs = []
    for kw in ({"native": True}, {"lean": False}):
        backend = BatchBackend(model, tokenizer, None, threads=1, **kw)
        tokens = backend.prefill(rows).argmax(-1).tolist()
        for _ in range(2):
            tokens = backend.decode(tokens).argmax(-1).tolist()
        tokens = tokens + backend.prefill([long]).argmax(-1).tolist()
        if kw.get("native"):
            assert backend.ragged
            width = backend.mask.shape[1]
            with torch.inference_mode():
                poison_padding(backend, width)
        seen = []
        for _ in range(4):
            logits = backend.decode(tokens)
            seen.append(logits)
            tokens = logits.argmax(-1).tolist()
        backend.keep([])
        assert not backend.ragged
        runs.append(seen)
    for a, b in zip(*runs):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        assert torch.equal(a.argmax(-1), b.argmax(-1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ragged_decode_makes_every_compiled_batch_ragged(built, dtype):
    """With ``ragged_decode`` (the model option, on by default) a batch of short prompts is ragged
    from its first step and stays so through rows leaving and joining: NaN written into the
    padding changes nothing, and the logits are transformers' forward over the zero-padded
    cache to rounding (fp32: with the same greedy tokens)."""
    model, tokenizer = tiny_llama(dtype=dtype)
    runs = []
    for kw in ({"ragged_decode": True}, {"lean": False}):
        backend = BatchBackend(model, tokenizer, None, threads=1, **kw)
        tokens = backend.prefill(prompts(tokenizer, 5)).argmax(-1).tolist()
        assert backend.ragged == bool(kw.get("ragged_decode"))
        seen = []
        for step in range(6):
            if step == 2:
                backend.keep([1, 2, 3, 4])
                tokens = tokens[1:]
            if step == 3:
                tokens = tokens + backend.prefill(prompts(tokenizer, 2)).argmax(-1).tolist()
            if backend.ragged:
                with torch.inference_mode():
                    poison_padding(backend, backend.mask.shape[1])
            logits = backend.decode(tokens)
            seen.append(logits)
            tokens = logits.argmax(-1).tolist()
        assert backend.ragged == bool(kw.get("ragged_decode"))
        backend.keep([])
        runs.append(seen)
    fp32 = dtype == torch.float32
    for a, b in zip(*runs):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, **({"rtol": 1e-4, "atol": 1e-5} if fp32 else {"rtol": 2e-2, "atol": 2e-2}))
        if fp32:  # bf16's rounding may turn a near-tie of the tiny random model either way
            assert torch.equal(a.argmax(-1), b.argmax(-1))


def poison_padding(backend: BatchBackend, width: int) -> None:
    for layer in backend.cache.layers:
        for r, n in enumerate(backend.mask.sum(-1).tolist()):
            layer.keys[r, :, :width - n] = float("nan")
            layer.values[r, :, :width - n] = float("nan")


def test_a_long_prompt_is_staged_into_the_batch_a_few_layers_per_step(built, monkeypatch):
    """While rows decode, a sliced prompt's KV goes into the batch's new buffers a layer or so per
    step, then the running rows' positions go where they sit after the join, planned for a given
    step; the join then copies only what the rows decoded since. The logits after it are the ones
    of a join that copies everything at once, at the same step."""
    staged = join_with_staging(built, monkeypatch)
    assert staged["planned"] and all(0 < done < staged["width"] for done in staged["copied"])
    # One call per layer for the new row, one per layer for the running rows, then any wait
    # for the planned step.
    assert staged["calls"] >= 2 * staged["layers"]


def test_a_staged_join_replans_when_rows_change_and_stays_exact(built, monkeypatch):
    """A row leaving and another joining while the running rows are being copied moves their
    positions: the copies start again for a new step, and the logits stay exact."""
    staged = join_with_staging(built, monkeypatch, swap_row=True)
    assert staged["planned"] and staged["replans"] >= 2


def test_a_staged_join_without_decode_steps_between_still_comes(built, monkeypatch):
    """The planned step never comes if the rows do not decode between calls (the engine always
    does): once everything is copied the row joins anyway, exact."""
    staged = join_with_staging(built, monkeypatch, decoding=False)
    assert not staged["planned"]


def test_a_long_prompt_joining_rows_about_as_long_is_staged_too(built, monkeypatch):
    """Running rows about as long as the prompt leave less padding than RAGGED_MIN_PAD, where a
    join keeps the masked step: a staged join still comes, a few layers per step, and leaves the
    cache ragged, instead of one copy of every row's whole history in one step; exact against
    that copy made ragged at the same step."""
    staged = join_with_staging(built, monkeypatch, running_tokens=256)
    assert staged["planned"] and staged["ragged_before"] is False
    assert all(0 < done < staged["width"] for done in staged["copied"])


def test_a_staged_join_behind_its_plan_is_planned_again_at_the_copies_pace(built, monkeypatch):
    """The running rows' copies are planned at the pace the new row's ran; when they run slower
    (memory new to the process can cost ten times as much), the join is planned again at their
    own pace, early, and still comes as planned instead of copying what is left in one step;
    exact."""
    staged = join_with_staging(built, monkeypatch, slow_rows=True)
    assert staged["behind"] == 1 and staged["planned"]
    assert all(0 < done < staged["width"] for done in staged["copied"])


def test_a_slow_step_does_not_push_the_planned_join_back(built, monkeypatch):
    """After a slow decode step the slice's budget is less (even none), but the staged join is
    still planned at the usual budget's pace: the copies it plans for are not spread over the
    most steps there could be, which would delay the prompt's first token."""
    from engine import backend as backend_module

    monkeypatch.setattr(backend_module, "RAGGED_MIN_PAD", 64)
    model, tokenizer = tiny_llama(dtype=torch.float32)
    ids = tokenizer("the river carries boats past the old mill " * 40)["input_ids"]
    backend = BatchBackend(model, tokenizer, None, threads=1, prefill_chunk=64)
    tokens = backend.prefill(prompts(tokenizer, 3)).argmax(-1).tolist()
    backend.decode(tokens)
    part = backend.begin_prefill(EncodedPrompt(ids[:300]))
    while part.logits is None:  # the whole prompt's layers, as the slices would run them
        part.logits = backend.sliced.advance(part, 64, None)
    # Every call after a step that left no budget; a usual step's budget would copy every layer.
    while part.stage is None or not part.stage.join_width:
        assert not backend._staged(part, -1.0, 1e3)
    width = backend.mask.shape[1]
    assert part.stage.join_width == width + 3  # the copies in one step, planned with twice that


def join_with_staging(built, monkeypatch, swap_row: bool = False, decoding: bool = True,
                      running_tokens: int | None = None, slow_rows: bool = False) -> dict:
    """Join a long prompt into 3 decoding rows with staging (rows decoding once per call, as in
    the engine) and without it (``_staged`` answering True at the same call), and compare the
    logits after the join; ``swap_row``: once the running rows' first layer is copied, one row
    leaves and another joins; ``running_tokens``: the rows' prompts are that long (the join
    without staging is then made ragged too); ``slow_rows``: the steps have time for every
    copy, but one piece a step runs, and the running rows' first piece looks a thousand times
    slower than the new row's did. Returns what the staged join saw."""
    from engine import backend as backend_module
    from engine import long_prompts, sliced_prefill

    # Whole layers, one a call (engine/layer_pieces.py would take several calls a layer, and the
    # rows, decoding once a call, would outgrow the prompt before it joins).
    monkeypatch.setattr(sliced_prefill, "PIECES", False)
    model, tokenizer = tiny_llama(dtype=torch.float32)
    ids = tokenizer("the river carries boats past the old mill " * 40)["input_ids"]
    long = EncodedPrompt(ids[:300])
    running = prompts(tokenizer, 3) if running_tokens is None \
        else [EncodedPrompt(ids[i + 1:i + 1 + running_tokens]) for i in range(3)]
    runs, seen = [], {"layers": model.config.num_hidden_layers, "replans": 0}
    # One layer per call: the new row's, then the running rows' (the first at call layers + 1).
    swap_row_at = model.config.num_hidden_layers + 2 if swap_row else None
    if slow_rows:  # pieces of 16 positions: a layer's running rows take a few
        monkeypatch.setattr(long_prompts, "PIECE_BYTES", 1)
    # Both runs on one thread: bitwise comparable whatever an earlier test's engines left as
    # torch's thread count (run after the engine tests with `-k`, the two runs once had 2 and 1).
    threads = torch.get_num_threads()
    for staged in (True, False):
        torch.set_num_threads(1)
        monkeypatch.setattr(backend_module, "RAGGED_MIN_PAD", 64 if staged or running_tokens is None else 0)
        # The masked step until the join (``ragged_decode`` off), whose joins these tests are about.
        backend = BatchBackend(model, tokenizer, None, threads=1, prefill_chunk=64, ragged_decode=False)
        tokens = backend.prefill(running).argmax(-1).tolist()
        tokens = backend.decode(tokens).argmax(-1).tolist()
        part, calls = backend.begin_prefill(long), [0]
        real_staged, real_finish = backend._staged, backend._finish_part

        def counted(p, budget, cut=None, real=real_staged, staged=staged):
            calls[0] += 1
            if swap_row_at is not None and calls[0] == swap_row_at:
                swap_row()
            if not staged:
                return calls[0] == seen["calls"]
            plan = p.stage.join_width if p.stage is not None else None
            # Whether the join, when staging began, would have been ragged without it.
            seen.setdefault("ragged_before", backend._ragged_join(len(long.input_ids), 1))
            if slow_rows:  # a second's share a step to plan with; one piece a call runs
                budget, cut = -1.0, 0.5
            done = real(p, budget, cut)
            if p.stage is not None and p.stage.join_width != plan:
                seen["replans"] += 1
            if slow_rows and p.stage is not None and p.stage.rows_pieces == 1 and not seen.get("slowed"):
                seen["slowed"], p.stage.rows_seconds = True, 1e3
            seen["behind"] = p.stage.replans if p.stage is not None else seen.get("behind", 0)
            return done

        def swap_row():
            nonlocal tokens
            backend.keep([1, 2])
            tokens = tokens[1:] + backend.prefill(prompts(tokenizer, 1)).argmax(-1).tolist()

        def finish(p, real=real_finish, staged=staged):
            if staged:
                seen.update(planned=p.stage.join_width == backend.mask.shape[1], width=backend.mask.shape[1],
                            copied=list(p.stage.copied), calls=calls[0])
            real(p)

        monkeypatch.setattr(backend, "_staged", counted)
        monkeypatch.setattr(backend, "_finish_part", finish)
        while True:
            # A budget spent at once: one layer (or one copy) per call, the last step as usual.
            backend.last_step = (1e-9, 1e-9)
            logits = backend.prefill_chunk_step(part)
            if logits is not None:
                break
            if decoding:
                tokens = backend.decode(tokens).argmax(-1).tolist()  # the rows decode every step
        assert backend.ragged and backend.batch_size == 4
        tokens = tokens + logits.argmax(-1).tolist()
        out = []
        for _ in range(3):
            step = backend.decode(tokens)
            out.append(step)
            tokens = step.argmax(-1).tolist()
        runs.append(out)
    torch.set_num_threads(threads)
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    return seen


def fast_or_skip() -> None:
    if not native_step.fast_kernels():
        pytest.skip("this CPU lacks avx2 or fma: ATen's int4 and int8 kernels run")


@pytest.mark.parametrize("n,k", [(96, 128), (960, 576), (64, 1536), (48, 64), (112, 64), (16, 32)])
def test_the_fp32_int4_kernel_is_the_matmul_of_the_int4_weights(built, n, k):
    """The compiled fp32 kernel reads ATen's int4 layout, whichever ATen packs on this CPU
    (blocks of 32 outputs for its avx2 kernel, of 64 for its avx512 one; a last narrower block
    in pairs: 96 = 64 + 32 and 112 = 64 + 48 or 3 x 32 + 16): its products are those of the
    weights ATen's own kernel dequantizes, to fp32 rounding, for the two-row and the tiled paths."""
    fast_or_skip()
    assert torch.ops.chatvlm_native.int4_layout() in (32, 64)  # the layout was recognised
    gen = torch.Generator().manual_seed(n + k)
    packed_w, sz, _ = int4_pack(torch.randn(n, k, generator=gen) * 0.05)
    # ATen's dequantization of the same buffers: row i of the identity picks input i.
    dequant = torch.ops.aten._weight_int4pack_mm_for_cpu(torch.eye(k), packed_w, INT4_GROUP, sz).t().double()
    for rows in (1, 2, 3, 4, 5, 16, 33):
        x = torch.randn(rows, k, generator=gen)
        ours = native_step.int4_mm(x, packed_w, INT4_GROUP, sz)
        assert ours.shape == (rows, n) and ours.dtype == torch.float32
        torch.testing.assert_close(ours.double(), x.double() @ dequant.t(), rtol=1e-5, atol=1e-5)
        aten = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed_w, INT4_GROUP, sz)
        torch.testing.assert_close(ours, aten, rtol=1e-5, atol=1e-5)
        # A strided view of the activations reads the same values.
        wide = torch.randn(rows, 2 * k, generator=gen)
        wide[:, ::2] = x
        torch.testing.assert_close(native_step.int4_mm(wide[:, ::2], packed_w, INT4_GROUP, sz), ours, rtol=0, atol=0)


def test_the_fp32_int8_kernel_is_the_matmul_of_the_int8_weights(built):
    fast_or_skip()
    torch.manual_seed(0)
    layer = Int8WeightOnlyLinear(torch.nn.Linear(576, 200, bias=False), torch.float32)
    dequant = (layer.weight_int8.double() * layer.scales.double()[:, None])
    for rows in (1, 2, 3, 4, 5, 9, 33):
        x = torch.randn(rows, 576)
        ours = native_step.int8_mm(x, layer.weight_int8, layer.scales)
        torch.testing.assert_close(ours.double(), x.double() @ dequant.t(), rtol=1e-5, atol=1e-5)


def test_shapes_and_dtypes_the_kernels_do_not_take_run_atens(built):
    """Inputs not a multiple of 16 (int8), bf16 activations: ATen's kernels, bit for bit (every
    int4 weight ATen packs, N a multiple of 16, runs the compiled kernel)."""
    gen = torch.Generator().manual_seed(1)
    layer = Int8WeightOnlyLinear(torch.nn.Linear(40, 24, bias=False), torch.float32)
    x = torch.randn(2, 40, generator=gen)
    assert torch.equal(native_step.int8_mm(x, layer.weight_int8, layer.scales),
                       torch.ops.aten._weight_int8pack_mm(x, layer.weight_int8, layer.scales))
    packed_b, sz_b, _ = int4_pack(torch.randn(64, 64, generator=gen).bfloat16())
    xb = torch.randn(2, 64, generator=gen).bfloat16()
    assert torch.equal(native_step.int4_mm(xb, packed_b, INT4_GROUP, sz_b),
                       torch.ops.aten._weight_int4pack_mm_for_cpu(xb, packed_b, INT4_GROUP, sz_b))


def test_fp32_layers_read_their_dense_weight_until_the_kernels_are_loaded(built, monkeypatch):
    """ATen's fp32 int4 kernel is scalar (5-10x slower than the dense GEMM), so before the compiled
    kernels are loaded, or where they cannot run, an fp32 int4 layer reads its dense weight."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 96)
    packed_w, sz, _ = int4_pack(linear.weight)
    layer = Int4WeightOnlyLinear(linear, packed_w, sz)
    x = torch.randn(2, 64)
    monkeypatch.setattr(native_step, "fast_kernels", lambda: False)
    assert small_rows(torch.float32) == 0 and small_rows(torch.bfloat16) == GEMV_ROWS
    assert torch.equal(layer(x), linear(x))
    monkeypatch.undo()
    fast_or_skip()
    assert small_rows(torch.float32) == FP32_KERNEL_ROWS
    expected = native_step.int4_mm(x, packed_w, INT4_GROUP, sz) + linear.bias
    assert torch.equal(layer(x), expected) and not torch.equal(layer(x), linear(x))


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="one core")
def test_the_compiled_kernels_run_on_torchs_threads(built):
    """ATen's parallel_for is an OpenMP pragma in its headers: built without -fopenmp, the int4
    and int8 kernels would run on one thread (half the speed on two cores, silently)."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert torch.ops.chatvlm_native.parallel_workers(64) == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim,n_rep", [(16, 2), (64, 3), (128, 1)])
def test_the_ragged_attention_kernel_is_sdpa_from_each_rows_first_position(built, dtype, head_dim, n_rep):
    """Each row attends from its own first position, over a slice of wider cache buffers (as the
    ragged cache holds them): the values of SDPA called once per row, to rounding, whatever the
    row's length (one position, a block, several blocks) and its padding (NaN, never read)."""
    fast_or_skip()
    torch.manual_seed(0)
    kv_heads, used, width = 2, 700, 800
    starts = [0, 699, 300, 444, 640, 1]
    rows = len(starts)
    kbuf = torch.randn(rows, kv_heads, width, head_dim, dtype=dtype)
    vbuf = torch.randn(rows, kv_heads, width, head_dim, dtype=dtype)
    for r, s in enumerate(starts):
        kbuf[r, :, :s] = float("nan")
        vbuf[r, :, :s] = float("nan")
    q = torch.randn(rows, 1, kv_heads * n_rep, head_dim, dtype=dtype).transpose(1, 2) * 3
    keys, values = kbuf[:, :, :used], vbuf[:, :, :used]
    scaling = head_dim ** -0.5
    ours = torch.ops.chatvlm_native.attend_from(q, keys, values, starts, n_rep, scaling)
    assert ours is not None and ours.dtype == dtype and ours.shape == (rows, kv_heads * n_rep, 1, head_dim)
    expected = torch.cat([torch.nn.functional.scaled_dot_product_attention(
        q[r:r + 1].double(), keys[r:r + 1, :, s:].double(), values[r:r + 1, :, s:].double(), scale=scaling,
        enable_gqa=n_rep > 1) for r, s in enumerate(starts)])
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}
    torch.testing.assert_close(ours.double(), expected, **tol)
    # A row's values do not depend on the rows beside it.
    alone = torch.ops.chatvlm_native.attend_from(q[2:3], keys[2:3], values[2:3], starts[2:3], n_rep, scaling)
    assert torch.equal(alone, ours[2:3])


def test_the_ragged_attention_kernel_leaves_what_it_does_not_take_to_sdpa(built):
    q = torch.randn(1, 2, 1, 24)  # a head size it is not built for
    kv = torch.randn(1, 2, 10, 24)
    assert torch.ops.chatvlm_native.attend_from(q, kv, kv, [0], 1, 0.2) is None
    q = torch.randn(1, 2, 1, 64)
    kv = torch.randn(1, 2, 10, 64)
    assert torch.ops.chatvlm_native.attend_from(q, kv, kv, [10], 1, 0.1) is None  # no position left
    assert torch.ops.chatvlm_native.attend_from(q.half(), kv.half(), kv.half(), [0], 1, 0.1) is None
