"""Upcycle a small Llama into DeepSeekMoE: train it dense, turn its MLPs into DeepSeekMoE layers (function-preserving),
balance the routers on real inputs, and go on training the MoE.

    pip install -e ".[hf,bench]"
    python examples/hf_moefy_train.py                      # 600 dense + 300 MoE steps on the standard library's source
    python examples/hf_moefy_train.py --data my.txt --steps 500
    python examples/hf_moefy_train.py --dense-steps 0      # upcycle the random model: watch the routing collapse

No downloads: the Llama is built from a config, the tokenizer is a 4096-token byte-level BPE trained here with the
`tokenizers` library, and the text is the standard library's own .py files (or --data PATH). Prints loss and MaxVio
(a progress bar on a terminal, a line every 10 steps in a log), then saves the model with save_pretrained and loads it
back into a freshly moefied Llama.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import deepseek_moe as dm  # noqa: E402
from deepseek_moe import hf  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # the repository root
from benchmarks.quality.lm import byte_batches, load_text  # noqa: E402


def progress(total: int):
    """A rich progress bar on a terminal; None (plain lines instead) in a log or without rich."""
    if not sys.stdout.isatty():
        return None
    try:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    except ImportError:
        return None
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())


def bpe_ids(text: bytes, vocab_size: int) -> torch.Tensor:
    """The text as token ids of a byte-level BPE trained on it. Bytes alone would leave every indentation space
    its own token (29% of this corpus), and tokens that identical all route to the same experts."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    decoded = text.decode("utf-8", "replace")
    chunks = [decoded[i: i + 100_000] for i in range(0, len(decoded), 100_000)]
    tokenizer.train_from_iterator(chunks, trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False))
    return torch.tensor(tokenizer.encode(decoded).ids)


def train(model, stream, steps: int, lr: float, label: str, on_step=None) -> float:
    """AdamW steps with gradient clipping at 1, closing each with the balancing-bias update; ``on_step(step, max
    MaxVio over the layers)`` after each when the model has DeepSeekMoE layers. Returns the last loss."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    layers = hf.moe_layers(model)
    bar = progress(steps)
    task = bar.add_task(label, total=steps) if bar else None
    start = time.perf_counter()
    if bar:
        bar.start()
    try:
        for step in range(1, steps + 1):
            ids, _ = next(stream)
            out = model(ids, labels=ids)
            loss = out.loss + dm.aux_loss(model)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            hf.update_biases(model)
            line = f"{label} step {step} loss {out.loss.item():.3f}"
            if layers:
                max_vio = max(l.last_stats["max_vio"] for l in layers.values())
                line += f" max MaxVio {max_vio:.2f}"
                if on_step:
                    on_step(step, max_vio)
            if bar:
                bar.update(task, advance=1, description=line)
            elif step % 10 == 0 or step == 1:
                print(f"{line} ({time.perf_counter() - start:.0f} s)", flush=True)
    finally:
        if bar:
            bar.stop()
    return out.loss.item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="a text file to train on (default: the standard library's source)")
    p.add_argument("--dense-steps", type=int, default=600, help="steps of dense training before upcycling")
    p.add_argument("--steps", type=int, default=300, help="steps of MoE training after upcycling")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--dense-lr", type=float, default=2e-3)
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate after upcycling")
    args = p.parse_args()

    torch.manual_seed(0)
    text = load_text(args.data, 4_000_000)
    started = time.perf_counter()
    data = bpe_ids(text, 4096)
    split = int(0.95 * data.numel())
    train_ids, held_out = data[:split], data[split:]
    print(f"text: {len(text) / 1e6:.2f} MB ({'--data' if args.data else 'stdlib *.py'}), {data.numel() / 1e6:.2f} M "
          f"tokens of a 4096-token BPE trained on it in {time.perf_counter() - started:.0f} s", flush=True)

    cfg = LlamaConfig(vocab_size=4096, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=args.seq)
    model = LlamaForCausalLM(cfg)
    stream = byte_batches(train_ids, args.batch, args.seq, torch.Generator().manual_seed(1))
    if args.dense_steps:
        model.train()
        loss = train(model, stream, args.dense_steps, args.dense_lr, "dense")
        print(f"dense Llama trained {args.dense_steps} steps: loss {loss:.3f}", flush=True)

    # bias_update_speed is in units of the scores: softmax scores over 64 experts average 1/64, so DeepSeek-V3's
    # 1e-3 (for sigmoid scores, ~0.5) would move a bias by 6% of a mean score each step and shake the balance.
    moe = dm.MoEConfig(hidden_size=cfg.hidden_size, expert_hidden_size=44, num_routed_experts=64,
                       num_shared_experts=1, top_k=6, aux_loss_alpha=0.001, seq_aux=True, bias_update_speed=1e-4)
    probe = train_ids[: args.seq].unsqueeze(0)
    model.eval()
    with torch.no_grad():
        dense_logits = model(probe).logits
    n = hf.moefy(model, moe, init="upcycle")
    with torch.no_grad():
        moe_logits = model(probe).logits
    diff = (moe_logits - dense_logits).abs().max().item()
    print(f"moefied {n} MLPs into DeepSeekMoE layers (shared expert = the dense FFN, routed experts start at zero); "
          f"max |logit difference| right after conversion: {diff:.2e}")
    assert diff < 1e-4, "upcycling must preserve the dense model's function"
    print(f"parameters: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M")

    ceiling = moe.num_routed_experts / moe.top_k - 1
    print(f"MaxVio = max expert load / mean expert load - 1 over a batch's {args.batch * args.seq} tokens, the worst "
          f"of the {n} layers:\n  0 is an even load, {ceiling:.2f} every token on the same {moe.top_k} experts "
          f"(docs/integration.md, 'Routing right after upcycling').", flush=True)
    calibration, _ = next(byte_batches(train_ids, 4 * args.batch, args.seq, torch.Generator().manual_seed(2)))
    calibrated = hf.calibrate_routing(model, calibration)
    before = max(r["max_vio_before"] for r in calibrated.values())
    after = max(r["max_vio_after"] for r in calibrated.values())
    print(f"routers calibrated on {calibration.numel()} tokens (hf.calibrate_routing): MaxVio {before:.2f} with the "
          f"random routers -> {after:.2f} with the balancing bias", flush=True)

    worst_early = []
    model.train()
    start = time.perf_counter()
    last = train(model, stream, args.steps, args.lr, "moe",
                 lambda step, max_vio: worst_early.append(max_vio) if step <= 20 else None)
    for name, stats in sorted(hf.expert_load(model).items()):
        if name.endswith("max_vio"):
            print(f"  MaxVio of the last batch, {name}: {stats:.2f}")
    model.eval()
    with torch.no_grad():
        ids = held_out[: args.seq + 1].unsqueeze(0)
        held = model(ids[:, :-1], labels=ids[:, :-1]).loss.item()
    print(f"trained {args.steps} MoE steps in {time.perf_counter() - start:.0f} s: train loss {last:.3f}, held-out "
          f"loss {held:.3f} (uniform over the vocabulary: {torch.log(torch.tensor(4096.)):.3f})")
    if worst_early:
        print(f"worst batch MaxVio over MoE steps 1-{len(worst_early)}: {max(worst_early):.2f}")

    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        from safetensors.torch import load_file

        reloaded = LlamaForCausalLM(cfg)
        hf.moefy(reloaded, moe, init="upcycle")
        reloaded.load_state_dict(load_file(os.path.join(tmp, "model.safetensors")))
        reloaded.eval()
        with torch.no_grad():
            same = torch.equal(reloaded(probe).logits, model(probe).logits)
    print(f"save_pretrained -> load into a freshly moefied Llama: logits identical = {same}")


if __name__ == "__main__":
    main()
