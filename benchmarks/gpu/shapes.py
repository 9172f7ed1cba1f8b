"""The device program's shapes and its check of every backend against a float64 eager truth."""
from __future__ import annotations

import copy
from typing import Dict, List

import torch

import deepseek_moe as dm
from deepseek_moe.testing import rel_rms

# Inputs are (T, H) token batches, so DeepSeekMoE-16B's balance loss is taken over the batch (seq_aux needs
# (B, S, H)); its cost is a few reductions over (T, E).
SHAPES = {
    "deepseek-moe-16b": {"name": "DeepSeekMoE-16B: H 2048, 64 x 1408 + 2 shared, top-6",
                         "config": dm.MoEConfig.preset("deepseek-moe-16b", seq_aux=False)},
    "qwen3-30b-a3b": {"name": "Qwen3-30B-A3B: H 2048, 128 x 768, top-8", "config": dm.MoEConfig.preset("qwen3-30b-a3b")},
    "mixtral-8x7b": {"name": "Mixtral 8x7B: H 4096, 8 x 14336, top-2", "config": dm.MoEConfig.preset("mixtral-8x7b")},
}
# The same routing at toy sizes, for --smoke (CPU, Triton's interpreter).
SMOKE_SHAPES = {key: {"name": f"{s['name'].split(':')[0]} at toy size",
                      "config": s["config"].replace(hidden_size=64, expert_hidden_size=32,
                                                    num_routed_experts=min(s["config"].num_routed_experts, 16))}
                for key, s in SHAPES.items()}


def _outputs(layer, x, ids, grad_out) -> List[torch.Tensor]:
    """[output, grad of x, grad of every parameter] of one forward and backward with the experts ``ids``, then the
    output of an inference forward (eval, no autograd: the implementations' inference paths)."""
    x = x.detach().clone().requires_grad_()
    y = layer(x, topk_idx=ids)
    (y.to(grad_out.dtype) * grad_out).sum().backward()
    with torch.no_grad():
        inference = layer.eval()(x.detach(), topk_idx=ids)
    layer.train()
    return [y, x.grad] + [p.grad for _, p in sorted(layer.named_parameters())] + [inference]


def oracle_check(cfg: dm.MoEConfig, names: List[str], dtype, device, T: int) -> Dict[str, object]:
    """Each backend in ``names`` against the eager layer in float64 on the same (dtype-rounded) weights, tokens and
    experts (ids from the eager router, passed to every layer: a near-tie rounded differently would otherwise pick
    another expert): output, input gradient and every parameter's gradient. ok when each relative RMS error is at
    most 2x the eager layer's in ``dtype`` (plus 1e-3); the same for an inference forward's output. A backend that
    cannot run here is listed with the reason."""
    torch.manual_seed(0)
    base = dm.DeepSeekMoELayer(cfg.replace(backend="eager")).to(device, dtype)
    truth = copy.deepcopy(base).double()
    x = torch.randn(T, cfg.hidden_size, device=device).to(dtype)
    with torch.no_grad():
        ids = base.route(x)[0].topk_idx_TK
    grad_out = torch.randn(T, cfg.hidden_size, device=device, dtype=torch.float64)
    want = _outputs(truth, x.double(), ids, grad_out)
    twin = [rel_rms(a, b) for a, b in zip(_outputs(base, x, ids, grad_out), want)]
    report: Dict[str, object] = {"eager worst": max(twin), "tokens": T}
    for name in names:
        try:
            layer = copy.deepcopy(base)
            layer.config = layer.router.cfg = layer.routed_experts.cfg = cfg.replace(backend=name)
            layer.backend  # noqa: B018  (raises BackendUnavailable with the reason)
        except Exception as err:
            report[name] = {"not_run": f"{type(err).__name__}: {str(err)[:200]}"}
            continue
        errors = [rel_rms(a, b) for a, b in zip(_outputs(layer, x, ids, grad_out), want)]
        ok = all(e <= 2 * t + 1e-3 for e, t in zip(errors, twin))
        report[name] = {"ok": ok, "worst": max(errors), "selected": repr(layer.backend)}
    return report
