import os, sys, json, time, torch, torch.nn.functional as F
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", ".."))  # the repository root
torch.set_num_threads(1)
import deepseek_moe as dm
from benchmarks.quality import run as R
from benchmarks.quality.lm import TinyLM, byte_batches, load_text
name, init_seed, data_seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ovr = json.loads(os.environ.get("OVR", "{}"))
if ovr:
    _lc = R.layer_config
    R.layer_config = lambda n: None if _lc(n) is None else _lc(n).replace(**ovr)
clip = float(sys.argv[4]) if len(sys.argv) > 4 else 0.0
steps = 1000
text = torch.frombuffer(bytearray(load_text(None, 8_000_000)), dtype=torch.uint8)
split = int(0.9 * text.numel()); data = {"train": text[:split], "val": text[split:]}
VAL = R.val_batches(data["val"], 16)
split = os.environ.get("SPLIT")
if split:
    a, b = map(int, split.split(","))
    torch.manual_seed(a)
    model = TinyLM(256, R.HIDDEN, R.LAYERS, R.SEQ, torch.nn.Identity)
    torch.manual_seed(b)
    for blk in model.blocks: blk.mlp = dm.DeepSeekMoELayer(R.layer_config(name)) if R.layer_config(name) else R.SharedExperts.dense(R.HIDDEN, 2 * R.WIDTH)
    init_seed = f"split{a}-{b}"
else:  # the first round's build: the whole model from one seed, MLPs created between the attention layers
    torch.manual_seed(init_seed)
    make = (lambda: dm.DeepSeekMoELayer(R.layer_config(name))) if R.layer_config(name) else \
        (lambda: R.SharedExperts.dense(R.HIDDEN, 2 * R.WIDTH))
    model = TinyLM(256, R.HIDDEN, R.LAYERS, R.SEQ, make)
moe = [m for m in model.modules() if isinstance(m, dm.DeepSeekMoELayer)]
opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
stream = byte_batches(data["train"], R.BATCH, R.SEQ, torch.Generator().manual_seed(data_seed))
ent = []
def hook(m, a, routing):
    p = routing.scores_TE.detach()
    ent.append(float(-(p * p.clamp_min(1e-20).log()).sum(-1).mean()))
for m in moe: m.gate.register_forward_hook(hook)
log = []; acc = []; gn = []
t0 = time.time()
for step in range(1, steps + 1):
    ids, target = next(stream)
    loss = F.cross_entropy(model(ids).reshape(-1, 256), target.reshape(-1))
    opt.zero_grad(set_to_none=True)
    (loss + dm.aux_loss(model)).backward()
    g = torch.nn.utils.clip_grad_norm_(model.parameters(), clip if clip > 0 else float("inf"))
    opt.step(); sched.step()
    for l in moe: l.update_bias()
    acc.append(loss.item()); gn.append(g.item())
    if step % 50 == 0:
        e = sum(ent[-len(moe):]) / max(len(moe), 1) if ent else 0
        rec = dict(step=step, loss=sum(acc) / len(acc), gnorm_mean=sum(gn) / len(gn), gnorm_max=max(gn), entropy=e,
                   max_vio=sum(m.last_stats["max_vio"] for m in moe) / len(moe) if moe else 0)
        if step % 100 == 0: rec["val"] = R.evaluate(model, VAL)[0]
        log.append(rec); acc, gn = [], []
tag = "_".join(f"{k}{v}" for k, v in ovr.items())
json.dump(log, open(f"sv_{name}_{init_seed}_{data_seed}_{clip}{tag}.json", "w"))
print(name, init_seed, data_seed, clip, ovr, "final val", log[-1]["val"], f"{time.time()-t0:.0f}s", flush=True)
