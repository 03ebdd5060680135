"""Where the peak RSS of a chatsft --local run is made: VmRSS and VmHWM (reset after every line
through /proc/self/clear_refs, so each line's HWM is the peak since the previous line) around
setup, evaluations, each step's loss-head forward, backward, clipping and optimizer step, and the
final save, on peers.py's recipe (one worker, padded rows).

    PYTHONPATH=platform python benchmarks/rss_phases.py [--model qwen|tiny] [--steps 3] [--head learned|full]
"""
import argparse, os, shutil, sys, tempfile, time, functools
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peers
from chatsft.train import loop
from chatsft.train.engines import ddp, deepspeed as ds_engine, fsdp2

def vm():
    d = {}
    for line in open("/proc/self/status"):
        if line.startswith(("VmRSS", "VmHWM")):
            k, v = line.split(":"); d[k] = int(v.split()[0]) // 1024
    return d

T0 = time.time()
def mark(what):
    v = vm()
    try:
        open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM: each line's HWM is its own interval's
    except OSError as e:
        print("clear_refs", e)
    print(f"{time.time()-T0:7.1f}s {what:40s} RSS {v['VmRSS']:6d} MB  HWM {v['VmHWM']:6d} MB", flush=True)

def wrap(mod, name):
    f = getattr(mod, name)
    @functools.wraps(f)
    def g(*a, **k):
        mark(f"> {name}")
        try:
            return f(*a, **k)
        finally:
            mark(f"< {name}")
    setattr(mod, name, g)

for n in ("setup", "before_training", "one_step", "validation_loss", "save", "finish"):
    wrap(loop, n)
for cls in (ddp.DDPEngine, ds_engine.DeepSpeedEngine, fsdp2.FSDP2Engine):
    for n in ("backward", "step"):
        wrap(cls, n)
from chatsft.model import loss as L
orig = L._ChunkedCE.forward
def fwd(ctx, *a):
    mark("> chunked CE forward")
    try:
        return orig(ctx, *a)
    finally:
        mark("< chunked CE forward")
L._ChunkedCE.forward = staticmethod(fwd)
import torch
orig_clip = torch.nn.utils.clip_grad_norm_
def clip(*a, **k):
    mark("> clip"); r = orig_clip(*a, **k); mark("< clip"); return r
torch.nn.utils.clip_grad_norm_ = clip
p = argparse.ArgumentParser()
p.add_argument("--model", default="qwen")
p.add_argument("--steps", type=int, default=3, help="at least 3 (peers.py times steps 2 on)")
p.add_argument("--rows", type=int, default=8)
p.add_argument("--head", default="learned")
args = p.parse_args()
from transformers import AutoTokenizer

folder = peers.model_dir(args.model, os.path.join(os.environ["CHATSFT_CACHE"], "bench"))
tok = AutoTokenizer.from_pretrained(folder)
work = tempfile.mkdtemp(prefix="rss-phases-")
try:
    peers.write_rows(peers.TRAIN, tok, work + "/train", packed=False, capacity=256)
    peers.write_rows(peers.HELDOUT, tok, work + "/eval", packed=False, capacity=256, limit=64)
    a = {"model": folder, "threads": 2, "steps": max(args.steps, 3), "rows": args.rows, "lr": 3e-3, "max_length": 256,
         "packed": False, "train_dir": work + "/train", "eval_dir": work + "/eval", "head": args.head,
         "out": work + "/out"}
    mark("start")
    r = peers.child_chatsft(a)
    mark("end")
    print({k: r[k] for k in ("peak_mb", "eval_loss", "train_loss")})
finally:
    shutil.rmtree(work, ignore_errors=True)
