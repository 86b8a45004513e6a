import sys, time, math, argparse, json, copy, os, torch, numpy as np
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from data import make
from dalle_lightning.models.dvae import DVAEConfig, DiscreteVAE
from dalle_lightning.models.schedules import cosine_schedule
from dalle_lightning.synth.checker import read_shapes, compare, summarise
from dalle_lightning.data.transforms import to_tensor, to_uint8
p = argparse.ArgumentParser()
p.add_argument("--name", default="run")
p.add_argument("--size", type=int, default=32); p.add_argument("--gc", type=int, default=2)
p.add_argument("--nh", type=int, default=32); p.add_argument("--V", type=int, default=512)
p.add_argument("--nb", type=int, default=1); p.add_argument("--ninit", type=int, default=64)
p.add_argument("--ntrain", type=int, default=4000); p.add_argument("--budget", type=float, default=240)
p.add_argument("--bs", type=int, default=32)
p.add_argument("--lr", type=float, default=1e-3); p.add_argument("--lr_end", type=float, default=1e-5)
p.add_argument("--beta_start", type=float, default=0.0)
p.add_argument("--beta", type=float, default=6.6); p.add_argument("--beta_steps", type=float, default=0.1)
p.add_argument("--t_end", type=float, default=1/16); p.add_argument("--t_steps", type=float, default=0.8)
p.add_argument("--out", default="logit_laplace"); p.add_argument("--neval", type=int, default=300)
p.add_argument("--emb", type=float, default=0.0)
p.add_argument("--overfit", action="store_true"); p.add_argument("--threads", type=int, default=2)
a = p.parse_args()
torch.set_num_threads(a.threads); torch.manual_seed(0)
t0 = time.time()
X, _ = make(a.ntrain, a.size, seed=1)
if a.overfit: Xe, Te = make(a.ntrain, a.size, seed=1)
else: Xe, Te = make(a.neval, a.size, seed=2, split=None)
Xt = to_tensor(X)
def build(steps):
    cfg = DVAEConfig(image_size=a.size, group_count=a.gc, n_hid=a.nh, vocab_size=a.V, n_blk_per_group=a.nb, n_init=a.ninit, output=a.out,
       kl_weight_start=a.beta_start, kl_weight_end=a.beta, kl_weight_steps=int(a.beta_steps*steps), temperature_end=a.t_end, temperature_steps=int(a.t_steps*steps))
    torch.manual_seed(0)
    m = DiscreteVAE(cfg)
    if a.emb: torch.nn.init.normal_(m.decoder.blocks[0].weight, std=a.emb)
    opt = torch.optim.AdamW(m.parameters(), a.lr, betas=(0.9,0.999), eps=1e-8, weight_decay=1e-4)
    return cfg, m, opt
rng = np.random.default_rng(0)
def step_fn(m, opt, cfg, step, steps):
    for g in opt.param_groups: g["lr"] = cosine_schedule(step, steps, a.lr, a.lr_end)
    idx = rng.integers(0, len(Xt), a.bs)
    out = m(Xt[idx], cfg.temperature(step), cfg.kl_weight(step))
    opt.zero_grad(); out.loss.backward(); opt.step()
    return out, idx
start = time.time()
cfg, m, opt = build(1000)
for i in range(8):
    if i == 3: tc = time.time()
    step_fn(m, opt, cfg, 0, 1000)
tstep = (time.time() - tc) / 5
steps = int(0.97 * (a.budget - (time.time() - start)) / tstep)
print(a.name, "data", round(start - t0, 1), "step", round(tstep, 3), "steps", steps, flush=True)
cfg, m, opt = build(steps)
for step in range(steps):
    out, idx = step_fn(m, opt, cfg, step, steps)
    if (step+1) % max(1, steps // 8) == 0:
        mse = ((out.reconstruction - Xt[idx])**2).mean()
        codes = out.logits.argmax(1)
        print(a.name, step+1, f"{time.time()-start:.0f}s loss {out.loss.item():.3f} rec {out.recon_loss.item():.3f} kl {out.kl.item():.3f} psnr {-10*math.log10(mse):.1f} used {codes.unique().numel()/a.V:.2f}", flush=True)
train_time = time.time() - start
m.eval()
with torch.no_grad():
    xe = to_tensor(Xe); codes = m.get_codebook_indices(xe); rec = m.decode_indices(codes)
mse = ((rec - xe)**2).mean(); used = codes.unique().numel()/a.V
res = [compare(read_shapes(im), t) for im, t in zip(to_uint8(rec), Te)]
s = summarise(res)
print("RESULT", a.name, "steps", steps, "train_s", round(train_time), "psnr", round(-10*math.log10(mse),2), "used", round(used,3), {k: round(v,3) for k,v in s.items()}, " ".join(sys.argv[1:]), flush=True)
