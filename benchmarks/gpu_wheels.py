"""Fetch the wheels that benchmarks/gpu.py and the gpu-marked tests need on a GPU machine which has
torch, transformers and the rest of a CUDA image but no network, into .whl/ (git-ignored).

    python benchmarks/gpu_wheels.py [--skip bitsandbytes] [--python 3.12]

Wheels for that machine's Python (3.12) on manylinux x86_64, without their dependencies: each one
needed that the machine lacks is named below, the rest (numpy, pyarrow, pandas, accelerate,
huggingface-hub, triton, ninja, psutil, msgpack, einops, py-cpuinfo, nvidia-ml-py, pytest, ...)
are already there. Not torch, not transformers: the machine's own builds are used. DeepSpeed is on
PyPI as source only: it is built here into a pure-Python wheel (DS_BUILD_OPS=0; any op it needs is
JIT-built there, where nvcc is). Not carried: flash-attn (PyPI has its source only, a long nvcc
build: gpu.py's flash row is SKIPPED and its headline uses sdpa), Ray (about 70 MB; gpu.py runs
--local) and MLflow (tracking is off).

What travels to the machine (tracked and untracked files that git does not ignore, plus the
carried .whl/) may be 64 MiB at most; this script adds it up and stops when it does not fit.
bitsandbytes is the largest wheel (43 MB: its CUDA libraries for every toolkit); --skip
bitsandbytes leaves it out (then the QLoRA row and QLoRA test are skipped there).
Then run the one line in gpu.py's docstring with `.whl` carried.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
OUT = os.path.join(ROOT, ".whl")
LIMIT = 64 * 2**20
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")
# requirement -> why it travels (the versions this repository is tested with where it has them)
WHEELS = {
    "trl==1.16.0": "TRL's SFTTrainer, the peer (pyproject's bench extra)",
    "datasets==5.2.0": "TRL's training set",
    "dill==0.4.1": "datasets",
    "multiprocess==0.70.19": "datasets",
    "peft==0.22.0": "LoRA and QLoRA, at the version chatsft is tested with",
    "liger-kernel==0.8.5": "train.loss_head=liger and TRL's use_liger_kernel",
    "cut-cross-entropy==25.1.1": "train.loss_head=cce",
    "bitsandbytes==0.50.2": "QLoRA's 4-bit weights (its CUDA 13 library included)",
    "hjson==3.1.0": "deepspeed",
    "pydantic==2.14.4": "deepspeed's config",
    "pydantic-core==2.50.5": "pydantic",
    "annotated-types==0.8.0": "pydantic",
    "typing-inspection==0.4.5": "pydantic",
    "typing-extensions==4.16.0": "pydantic 2.14 needs >= 4.16",
}
SOURCE_ONLY = {"deepspeed==0.19.8": "the default engine (ZeRO-2 row, DeepSpeed on NCCL)"}


def project(filename: str) -> tuple[str, str]:
    """('name', 'version') of a wheel file, the name normalized as PyPI does."""
    name, version = os.path.basename(filename).split("-")[:2]
    return re.sub(r"[-_.]+", "-", name).lower(), version


def pip(*args: str, env: dict | None = None) -> None:
    proc = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-2000:] + proc.stderr[-4000:])
        raise SystemExit(f"pip {args[0]} {args[-1]} failed")


def travelling_bytes() -> int:
    """Tracked and untracked-not-ignored files of the working tree (what travels besides .whl)."""
    names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.split(b"\0")
    return sum(os.path.getsize(os.path.join(ROOT, n.decode())) for n in names
               if n and os.path.isfile(os.path.join(ROOT, n.decode())))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--skip", default="", help="comma-separated project names to leave out")
    p.add_argument("--python", default="3.12", help="the GPU machine's Python version")
    args = p.parse_args()
    skip = {re.sub(r"[-_.]+", "-", s.strip()).lower() for s in args.skip.split(",") if s.strip()}
    wanted = {re.sub(r"[-_.]+", "-", r.split("==")[0]).lower(): r.split("==")[1]
              for r in (*WHEELS, *SOURCE_ONLY)}
    wanted = {n: v for n, v in wanted.items() if n not in skip}
    os.makedirs(OUT, exist_ok=True)
    for f in os.listdir(OUT):  # one version of each: two would stop the whole install there
        if not f.endswith(".whl") or project(f) != (project(f)[0], wanted.get(project(f)[0])):
            os.remove(os.path.join(OUT, f))
    have = {project(f)[0] for f in os.listdir(OUT)}
    flags = ["--no-deps", "--only-binary=:all:", "--python-version", args.python, "--implementation", "cp",
             *[x for plat in PLATFORMS for x in ("--platform", plat)], "-d", OUT]
    for req in WHEELS:
        name = re.sub(r"[-_.]+", "-", req.split("==")[0]).lower()
        if name in wanted and name not in have:
            print(f"  {req}", flush=True)
            pip("download", "-q", *flags, req)
    for req in SOURCE_ONLY:
        name = req.split("==")[0]
        if name in wanted and name not in have:
            print(f"  {req} (built from its source, no ops)", flush=True)
            # the torch of this environment satisfies its build; the ops are built where they run
            pip("wheel", "-q", "--no-deps", "--no-build-isolation", "--no-cache-dir", "-w", OUT, req,
                env={"DS_BUILD_OPS": "0"})
    files = sorted(os.listdir(OUT))
    got = {project(f)[0] for f in files}
    if got != set(wanted):
        raise SystemExit(f"missing wheels: {sorted(set(wanted) - got)}; unexpected: {sorted(got - set(wanted))}")
    wheels = sum(os.path.getsize(os.path.join(OUT, f)) for f in files)
    tree = travelling_bytes()
    for f in files:
        print(f"  {os.path.getsize(os.path.join(OUT, f)) / 2**20:7.2f} MiB  {f}")
    print(f"{len(files)} wheels {wheels / 2**20:.1f} MiB + working tree {tree / 2**20:.1f} MiB = "
          f"{(wheels + tree) / 2**20:.1f} MiB of the {LIMIT / 2**20:.0f} MiB that may travel"
          + (f"; skipped: {', '.join(sorted(skip))}" if skip else ""))
    if wheels + tree > LIMIT:
        raise SystemExit("over the limit: --skip bitsandbytes (the largest), or remove untracked files")


if __name__ == "__main__":
    main()
