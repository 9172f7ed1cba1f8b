"""Decode on CPU against the memory's read bandwidth, with cold weights as in a real model's decode step.

    python benchmarks/decode_cpu.py                          # fp32, T = 1, 4, 16; H=1024, 64x352 + 2 shared, K=6
    python benchmarks/decode_cpu.py --dtype bfloat16
    python benchmarks/decode_cpu.py --beside-load        # the same beside another 2-thread PyTorch process
    python benchmarks/decode_cpu.py --crossover --tokens 8,12,16   # decode op against blocks op, same layers
    python benchmarks/decode_cpu.py --compile            # also the ext layers under torch.compile(fullgraph=True)
    python benchmarks/decode_cpu.py --split --tokens 1   # where a step's time goes: the op, + router, + plan, layer
    python benchmarks/decode_cpu.py --prefill --dtype bfloat16   # T = 512, 2048 against a dense FFN of equal FLOPs

A decode step reads every layer's weights once and nothing stays in the L3 (32-300 MiB) between two visits of a layer,
so each contender here cycles through ``--layers`` copies of its weights (together several times the L3), one
forward per copy, on a fresh input each call (fresh routing). What a call must read: the router, the shared
experts and every routed expert some token picked (``distinct experts × expert bytes``). Contenders, interleaved
round by round under inference mode, median of the rounds:

* ``ext``: the layer, backend "ext" (the weight-streaming op ``expert_gemv`` up to
  ``backends.decode_tokens(dtype)`` tokens, the sorted-block op ``expert_blocks`` above); with ``--compile`` also
  ``ext, compiled``: the same layers under ``torch.compile(fullgraph=True)`` (the same ops; the router, plan and
  bookkeeping around them compiled: less Python per step);
* ``torch``: the layer, backend "torch";
* ``hf grouped_mm``: transformers' own DeepSeek-V3 block of the same shape (sigmoid routing without groups),
  ``experts_implementation="grouped_mm"``, when transformers is installed;
* ``dense``: a SwiGLU FFN that reads as many bytes: width (shared + distinct routed experts) · I.

The read bandwidth is measured in the same run: the best of several sums over a 1 GiB buffer. Each contender's
GB/s is the bytes it must read over its time; the fraction is that over the read bandwidth. ``--beside-load``
times everything while another process runs 2-thread PyTorch GEMMs (a shared machine: a parallel region waits for
its descheduled threads); the bandwidth is then measured beside it too, and ``ext, unwatched`` joins: the ext layers
with the decode op's shared-CPU watch off (``deepseek_moe.ext.shared_cpu_watch``: its threads whatever the load).

``--crossover`` times the ext layers with the decode op and with the blocks op at each T (where selection ends
decoding: ``backends.decode_tokens``).

``--prefill`` times forwards of many tokens instead (default T = 512, 2048; compute-bound, so one weight copy),
each contender against a dense SwiGLU FFN of equal active FLOPs (width shared + K routed, 2816), with the active
TFLOP/s each reaches; with ``--beside-load`` beside the other process too. A hot GEMM interleaved with them
(``PROBE``, oneDNN, its operands in the caches) gives the rate the cores had in the same rounds: on this shared
host it moved 2-3x from minute to minute in bf16, and every contender's rate with it.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import subprocess
import sys

import torch

import deepseek_moe as dm
from deepseek_moe import ext
from deepseek_moe.bench.timing import interleaved
from deepseek_moe.experts import SharedExperts


LOAD = ("import torch; torch.set_num_threads(2); a = torch.randn(1024, 1024)\n"
        "while True:\n    a @ a")


# Beside the load, each sample starts after this pause (s): after a parallel region OpenMP's threads spin for a few
# milliseconds (8 ms on a Zen 3 core), CPU time the next contender would lose to the one before it.
SETTLE = 0.03


@contextlib.contextmanager
def beside_load(on: bool):
    """Another process running 2-thread PyTorch GEMMs for the duration (nothing when not ``on``)."""
    if not on:
        yield
        return
    proc = subprocess.Popen([sys.executable, "-c", LOAD])
    try:
        yield
    finally:
        proc.kill()
        proc.wait()


def forcing(call, dtype, decode_tokens: int):
    """``call`` with the ext backend's decode steps ending at ``decode_tokens`` tokens (selection's crossover for
    this CPU's vector ISA, ``backends._DECODE_TOKENS_BESIDE_BLOCKS``, set for the call and restored)."""
    table = dm.backends._DECODE_TOKENS_BESIDE_BLOCKS.setdefault(dm.backends._vector_isa(), {})

    def forced(i):
        saved = table.get(dtype, dm.backends.DECODE_TOKENS)
        table[dtype] = decode_tokens
        try:
            return call(i)
        finally:
            table[dtype] = saved
    return forced


def unwatched(call):
    """``call`` with the decode op's shared-CPU watch off (``deepseek_moe.ext.shared_cpu_watch``), then restored."""
    def off(i):
        was = ext.shared_cpu_watch(False)
        try:
            return call(i)
        finally:
            ext.shared_cpu_watch(was)
    return off


def read_bandwidth(repeats: int = 5) -> float:
    """Bytes per second of the best sum over a 1 GiB fp32 buffer (all threads)."""
    buf = torch.ones(2 ** 28)
    best = float("inf")
    for _ in range(repeats):
        best = min(best, statistics.median(interleaved({"sum": lambda _: buf.sum()}, 1, torch.device("cpu"))["sum"]))
    return buf.numel() * 4 / best


def hf_blocks(cfg: dm.MoEConfig, layers, dtype):
    """transformers' DeepseekV3MoE blocks holding the same weights as ``layers``, or [] without transformers."""
    try:
        from transformers import DeepseekV3Config
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE
    except ImportError:
        return []
    hc = DeepseekV3Config(hidden_size=cfg.hidden_size, moe_intermediate_size=cfg.expert_hidden_size,
                          n_routed_experts=cfg.num_routed_experts, n_shared_experts=cfg.num_shared_experts,
                          num_experts_per_tok=cfg.top_k, n_group=1, topk_group=1, norm_topk_prob=True,
                          routed_scaling_factor=1.0)
    hc._experts_implementation = "grouped_mm"
    blocks = []
    for layer in layers:
        with torch.device("meta"):
            block = DeepseekV3MoE(hc)
        state = {k: v for k, v in layer.state_dict().items() if not k.startswith(("tokens_per", "load_since"))}
        block.load_state_dict(state, strict=False, assign=True)
        block.experts.config._experts_implementation = "grouped_mm"
        blocks.append(block.to(dtype).eval())
    return blocks


PROBE = (2048, 1024, 1024)  # M, K, N of the hot GEMM (bf16: 6 MiB of operands, in the caches after the first call)


def prefill(args) -> int:
    """Forward (inference) of T tokens, each contender against the dense FFN of equal active FLOPs, and the rate of
    a hot GEMM interleaved with them (what the cores could do in those rounds)."""
    torch.manual_seed(0)
    dtype, cpu = getattr(torch, args.dtype), torch.device("cpu")
    cfg = dm.MoEConfig(hidden_size=1024, expert_hidden_size=352, num_routed_experts=64, num_shared_experts=2, top_k=6,
                       score_func="sigmoid", norm_topk_prob=True)
    ext = dm.DeepSeekMoELayer(cfg.replace(backend="ext")).to(dtype).eval()
    contenders = {"ext": ext, "torch": dm.DeepSeekMoELayer(cfg.replace(backend="torch")).to(dtype).eval(),
                  "dense": SharedExperts.dense(cfg.hidden_size, cfg.dense_equivalent_width).to(dtype).eval()}
    contenders["torch"].load_state_dict(ext.state_dict())
    blocks = [] if args.no_hf else hf_blocks(cfg, [ext], dtype)
    if blocks:
        contenders["hf grouped_mm"] = lambda x: blocks[0](x.unsqueeze(0))
    M, K, N = PROBE
    # Without AVX-512, ATen's bf16 GEMMs run at a seventh of fp32's rate or less (no bf16 micro-kernel): the cores'
    # rate is then that of an fp32 GEMM.
    probe_dtype = dtype if dtype != torch.bfloat16 or torch.backends.cpu.get_cpu_capability() == "AVX512" else \
        torch.float32
    a, b = torch.randn(M, K, dtype=probe_dtype), torch.randn(K, N, dtype=probe_dtype)
    repeats = 2  # a sample of a few ms, as the contenders' are
    tokens = args.tokens if args.tokens != "1,4,16" else "512,2048"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}, forward under inference mode; "
          f"dense width {cfg.dense_equivalent_width}; {args.rounds} rounds"
          + ("; beside another 2-thread PyTorch process" if args.beside_load else ""))
    for T in (int(t) for t in tokens.split(",")):
        xs = [torch.randn(T, cfg.hidden_size, dtype=dtype) for _ in range(args.rounds + 1)]
        fns = {name: (lambda r, m=m: m(xs[r])) for name, m in contenders.items()}
        fns["probe"] = lambda r: [torch.mm(a, b) for _ in range(repeats)]
        with torch.inference_mode(), beside_load(args.beside_load):
            times = {k: statistics.median(v) for k, v in
                     interleaved(fns, args.rounds, cpu, settle=SETTLE * args.beside_load).items()}
        hot = repeats * 2 * M * K * N / times.pop("probe")
        flops = 6 * T * cfg.hidden_size * cfg.dense_equivalent_width  # the active FLOPs every contender computes
        for name, t in times.items():
            print(f"T={T:5d} {name:>14s} {t * 1e3:9.2f} ms {t / times['dense']:6.2f}x dense "
                  f"{flops / t / 1e12:5.3g} TFLOP/s {flops / t / hot:5.2f} of hot", flush=True)
        note = "" if probe_dtype == dtype else " (fp32: this CPU has no bf16 micro-kernel)"
        print(f"T={T:5d} hot {M}x{K}x{N} GEMM in the same rounds: {hot / 1e12:.3g} TFLOP/s{note}", flush=True)
    return 0


def split(args) -> int:
    """Where a decode step's time goes: the ext layer against its own pieces on the same cold weights, each piece
    adding one stage called on its own (the experts op on a plan made beforehand; + the gate GEMM; + the rest of
    the router's choice; + the plan), the one op that does all of them (``fused_moe``, what the layer calls) without
    the layer around it, and the dense FFN of the same bytes."""
    torch.manual_seed(0)
    dtype, cpu, T = getattr(torch, args.dtype), torch.device("cpu"), int(args.tokens.split(",")[0])
    cfg = dm.MoEConfig(hidden_size=1024, expert_hidden_size=352, num_routed_experts=64, num_shared_experts=2, top_k=6,
                       score_func="sigmoid", norm_topk_prob=True, backend="ext")
    n = args.layers or 12
    layers = [dm.DeepSeekMoELayer(cfg).to(dtype).eval() for _ in range(n)]
    xs = [torch.randn(T, cfg.hidden_size, dtype=dtype) for _ in range(n + 1)]  # n + 1: fresh routing each round
    dense = [SharedExperts.dense(cfg.hidden_size, (cfg.top_k + cfg.num_shared_experts) * cfg.expert_hidden_size)
             .to(dtype).eval() for _ in range(n)]
    with torch.inference_mode():
        impl = layers[0]._implementation(cpu, dtype, T)
        plans = {(i, j): layers[i].route(xs[j])[1] for i in range(n) for j in range(n + 1)}
    select, step = impl.selector(cfg), {"i": 0}
    fused = impl.fused_step(cfg)
    operands = [(m.router.weight, m.router.e_score_correction_bias, m.experts.gate_up_proj, m.experts.down_proj,
                 m._fused_shared(impl, dtype, None)) for m in layers]

    def piece(stages: int):
        def call(_):
            i = step["i"] = step["i"] + 1
            layer, x, key = layers[i % n], xs[i % (n + 1)], (i % n, i % (n + 1))
            if stages == 4:
                return layer(x)
            if stages == 1:
                torch.nn.functional.linear(x.float(), layer.router.weight)
            routing = layer.gate(x, None, None, select) if stages >= 2 else None
            plan = layer.dispatcher.plan(routing, impl, False) if stages >= 3 else plans[key]
            return layer.experts(x, plan, impl, layer._fused_shared(impl, dtype, None))
        return call

    def fused_call(_):
        i = step["i"] = step["i"] + 1
        return fused(xs[i % (n + 1)], *operands[i % n])

    def dense_call(_):
        i = step["i"] = step["i"] + 1
        return dense[i % n](xs[i % (n + 1)])
    fns = {"op alone": piece(0), "+ gate GEMM": piece(1), "+ choice": piece(2), "+ plan": piece(3),
           "fused op": fused_call, "layer": piece(4), "dense": dense_call}
    with torch.inference_mode():
        times = {k: statistics.median(v) for k, v in interleaved(fns, args.rounds, cpu, warmup=2, calls=n).items()}
    print(f"torch {torch.__version__}, {args.dtype}, T={T}, {impl}; {n} layers cycled, cold weights")
    for name, t in times.items():
        print(f"{name:>12s} {t * 1e3:8.3f} ms {t / times['dense']:6.2f}x dense", flush=True)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", default="1,4,16")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--layers", type=int, default=0, help="weight copies cycled (default: >= 1 GiB of weights)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--calls", type=int, default=0, help="calls per sample (default: one pass over the copies)")
    p.add_argument("--no-hf", action="store_true", help="leave transformers' block out")
    p.add_argument("--beside-load", action="store_true", help="time beside another 2-thread PyTorch process")
    p.add_argument("--prefill", action="store_true", help="many tokens against a dense FFN of equal FLOPs")
    p.add_argument("--compile", action="store_true", help="also the ext layers under torch.compile")
    p.add_argument("--split", action="store_true", help="the ext layer against its pieces (first --tokens value)")
    p.add_argument("--crossover", action="store_true",
                   help="the ext layer with the decode op against itself with the blocks op (where decoding ends)")
    args = p.parse_args(argv)
    if args.prefill:
        return prefill(args)
    if args.split:
        return split(args)
    torch.manual_seed(0)
    dtype, cpu = getattr(torch, args.dtype), torch.device("cpu")
    cfg = dm.MoEConfig(hidden_size=1024, expert_hidden_size=352, num_routed_experts=64, num_shared_experts=2, top_k=6,
                       score_func="sigmoid", norm_topk_prob=True)
    H, I, E, K, Ks = cfg.hidden_size, cfg.expert_hidden_size, cfg.num_routed_experts, cfg.top_k, cfg.num_shared_experts
    size = torch.finfo(dtype).bits // 8
    expert_bytes = 3 * H * I * size
    layer_bytes = (E + Ks) * expert_bytes + E * H * 4
    n = args.layers or max(2, -(-2 ** 30 // layer_bytes))
    calls = args.calls or n
    ours = [dm.DeepSeekMoELayer(cfg.replace(backend="ext")).to(dtype).eval() for _ in range(n)]
    torch_layers = [dm.DeepSeekMoELayer(cfg.replace(backend="torch")).to(dtype).eval() for _ in range(n)]
    for a, b in zip(torch_layers, ours):
        a.load_state_dict(b.state_dict())
    blocks = [] if args.no_hf else hf_blocks(cfg, ours, dtype)
    with beside_load(args.beside_load):
        bandwidth = read_bandwidth()
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}; H={H} {E}x{I} +{Ks} shared "
              f"K={K}; {n} weight copies of {layer_bytes / 2 ** 20:.0f} MiB cycled; read bandwidth {bandwidth / 1e9:.1f} "
              f"GB/s (best sum over 1 GiB); {args.rounds} rounds of {calls} calls"
              f"{'; beside another 2-thread PyTorch process' if args.beside_load else ''}")
        print(f"{'T':>3s} {'contender':>14s} {'ms':>8s} {'MB read':>8s} {'GB/s':>6s} {'of bw':>6s} {'x dense':>8s}")
        for T in (int(t) for t in args.tokens.split(",")):
            xs = [torch.randn(T, H, dtype=dtype) for _ in range(calls)]
            with torch.inference_mode():  # the bytes each input's step must read (its distinct experts)
                distinct = statistics.mean(int(ours[0].route(x)[1].counts_E.count_nonzero()) for x in xs)
            need = (distinct + Ks) * expert_bytes + E * H * 4
            dense = [SharedExperts.dense(H, round(distinct + Ks) * I).to(dtype).eval() for _ in range(n)]
            step = {"i": 0}

            def cycling(models, step=step):
                def call(_):
                    i = step["i"] = step["i"] + 1
                    return models[i % n](xs[i % calls])
                return call

            fns = {"ext": cycling(ours), "torch": cycling(torch_layers), "dense": cycling(dense)}
            if args.compile:
                compiled = [torch.compile(layer, fullgraph=True) for layer in ours]
                with torch.inference_mode():
                    for layer in compiled:  # compile every copy before timing
                        layer(xs[0])
                fns["ext, compiled"] = cycling(compiled)
            if args.crossover:  # the same ext layers with the decode op and with the blocks op at every T
                fns = {"ext, decode op": forcing(cycling(ours), dtype, 2 ** 31),
                       "ext, blocks op": forcing(cycling(ours), dtype, 0), "dense": cycling(dense)}
            elif args.beside_load:  # the decode op with its threads whatever the CPU's load
                fns["ext, unwatched"] = unwatched(cycling(ours))
            if blocks and not args.crossover:
                fns["hf grouped_mm"] = cycling([lambda x, b=b: b(x.unsqueeze(0)) for b in blocks])
            with torch.inference_mode():
                times = {k: statistics.median(v) for k, v in interleaved(fns, args.rounds, cpu, warmup=1, calls=calls,
                                                                         settle=SETTLE * args.beside_load).items()}
            for name, t in times.items():
                mb = round(distinct + Ks) * expert_bytes if name == "dense" else need
                print(f"{T:3d} {name:>14s} {t * 1e3:8.3f} {mb / 1e6:8.1f} {mb / t / 1e9:6.1f} {mb / t / bandwidth:6.2f} "
                      f"{t / times['dense']:7.2f}x", flush=True)
            del dense
    return 0


if __name__ == "__main__":
    sys.exit(main())
