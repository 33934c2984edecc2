"""What ptxas made of a kernel for sm_90, read from the compiled artefacts (no GPU needed).

From the cubin (the cuobjdump that ships in triton's NVIDIA backend, or $PTM_CUOBJDUMP):
  * registers per thread and stack frame (`cuobjdump -res-usage`);
  * the SASS (`cuobjdump -sass`): spill bytes (the widths of its local-memory stores STL / loads LDL: what
    ptxas -v reports as "bytes spill stores / loads" for code that keeps no arrays in local memory, which
    Triton kernels never do), the MMA instructions (HGMMA = wgmma, HMMA = mma.sync, with their operand type),
    UTMALDG (TMA loads), the instruction count and the count inside loops (the spans of backward branches).
From the PTX: wgmma.mma_async / mma.sync and cp.async.bulk.tensor, as a cross-check of the SASS.

`occupancy_warps` turns registers / shared memory / warps into resident warps per SM under sm_90's limits.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
import tempfile
from collections import Counter

# sm_90 (H100 / H200) per-SM limits, CUDA C Programming Guide, "Compute capabilities" table.
SM90_MAX_WARPS = 64
SM90_MAX_BLOCKS = 32
SM90_REGISTERS = 65536
SM90_REG_ALLOC_UNIT = 256  # registers are allocated per warp in units of 256 (8 per thread)
SM90_SHARED_PER_SM = 233472  # 228 KB
SM90_SHARED_RESERVED_PER_BLOCK = 1024  # the driver keeps 1 KB per resident block
SM90_SHARED_ALLOC_UNIT = 128


@functools.lru_cache(maxsize=None)
def cuobjdump() -> str:
    """Path of cuobjdump: $PTM_CUOBJDUMP, else the one beside triton's ptxas."""
    found = os.environ.get("PTM_CUOBJDUMP")
    if not found:
        import triton
        found = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.access(found, os.X_OK):
        raise FileNotFoundError(f"cuobjdump not found at {found} (set PTM_CUOBJDUMP)")
    return found


def occupancy_warps(regs: int, shared: int, warps: int) -> int:
    """Resident warps per SM for a block of `warps` warps, `regs` registers per thread, `shared` bytes."""
    regs_per_warp = -(-max(regs, 1) * 32 // SM90_REG_ALLOC_UNIT) * SM90_REG_ALLOC_UNIT
    by_regs = SM90_REGISTERS // (regs_per_warp * warps)
    smem = -(-shared // SM90_SHARED_ALLOC_UNIT) * SM90_SHARED_ALLOC_UNIT + SM90_SHARED_RESERVED_PER_BLOCK
    by_shared = SM90_SHARED_PER_SM // smem
    blocks = min(SM90_MAX_BLOCKS, SM90_MAX_WARPS // warps, by_regs, by_shared)
    return blocks * warps


_RES = re.compile(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Za-z0-9_.]*)([^;]*);")
_LOCAL_WIDTH = {"U8": 1, "S8": 1, "U16": 2, "S16": 2, "64": 8, "128": 16}  # bytes; 4 unless suffixed


def _local_bytes(op: str) -> int:
    """Bytes moved by an STL / LDL opcode such as LDL.LU.64."""
    return next((_LOCAL_WIDTH[m] for m in op.split(".")[1:] if m in _LOCAL_WIDTH), 4)


def _run(*args: str) -> str:
    p = subprocess.run([cuobjdump(), *args], capture_output=True, text=True, timeout=300)
    if p.returncode != 0:
        raise RuntimeError(f"cuobjdump {' '.join(args)} failed ({p.returncode}): {p.stderr[-2000:]}")
    return p.stdout


def sass_stats(sass: str) -> dict:
    """Figures from one function's SASS listing (as `cuobjdump -sass` prints it)."""
    instrs = [(int(m.group(1), 16), m.group(3), m.group(4)) for m in _SASS_LINE.finditer(sass)]
    ops = Counter(op.split(".")[0] for _, op, _ in instrs)
    spill_st = sum(_local_bytes(op) for _, op, _ in instrs if op.split(".")[0] == "STL")
    spill_ld = sum(_local_bytes(op) for _, op, _ in instrs if op.split(".")[0] == "LDL")
    # loops: a branch to a lower address closes one; its body is [target, branch]. Branches placed after the
    # function's last EXIT are out-of-line code, not loops: ptxas puts the retry of an mbarrier wait (TMA loads:
    # SYNCS.PHASECHK.TRANS64.TRYWAIT, then `@!P BRA stub`) there, and the stub branches back to the wait, which
    # would otherwise count everything between the wait and the end of the function as loop body.
    last_exit = max((addr for addr, op, _ in instrs if op.split(".")[0] == "EXIT"), default=None)
    spans = []
    for addr, op, rest in instrs:
        if op.split(".")[0] == "BRA" and (last_exit is None or addr < last_exit):
            t = re.search(r"0x([0-9a-f]+)", rest)
            if t and int(t.group(1), 16) < addr:
                spans.append((int(t.group(1), 16), addr))
    in_loop = sum(1 for addr, _, _ in instrs if any(lo <= addr <= hi for lo, hi in spans))
    # spills by where they run: in a loop (once per trip) or in an innermost loop (the per-key-step loop of an
    # attention kernel: once per tile pair), against spills before / after the loops, which run once
    innermost = [s for s in spans if not any(o != s and s[0] <= o[0] and o[1] <= s[1] for o in spans)]
    local = [(addr, _local_bytes(op)) for addr, op, _ in instrs if op.split(".")[0] in ("STL", "LDL")]
    loop_spill = sum(b for addr, b in local if any(lo <= addr <= hi for lo, hi in spans))
    inner_spill = sum(b for addr, b in local if any(lo <= addr <= hi for lo, hi in innermost))
    mma = sorted({op for _, op, _ in instrs if op.startswith(("HGMMA", "HMMA"))})
    # instructions of the innermost loops' bodies: what one trip of each costs (the key step of an attention kernel)
    inner_instrs = sum(1 for addr, _, _ in instrs if any(lo <= addr <= hi for lo, hi in innermost))
    return dict(sass_instructions=len(instrs), loop_instructions=in_loop, inner_loop_instructions=inner_instrs,
                spill_store_bytes=spill_st, spill_load_bytes=spill_ld,
                loop_spill_bytes=loop_spill, inner_loop_spill_bytes=inner_spill,
                mma_sass=mma, utmaldg=ops["UTMALDG"],
                opcodes={k: ops[k] for k in ("IMAD", "LOP3", "HGMMA", "HMMA", "FFMA", "MUFU", "LDGSTS") if ops[k]})


def mma_kind(mma_sass: list, ptx: str = "") -> str:
    """'wgmma' / 'mma.sync' / both / 'none', with the operand types (from the SASS opcodes' suffixes)."""
    kinds = []
    for prefix, name in (("HGMMA", "wgmma"), ("HMMA", "mma.sync")):
        # HGMMA.64x128x16.F32.BF16 / HMMA.16816.F32.TF32: accumulator, then the operand type (none: fp16)
        types = sorted({(op.split(".")[3:] or ["F16"])[0].lower() for op in mma_sass if op.split(".")[0] == prefix})
        if types:
            kinds.append(f"{name}({'/'.join(types)})")
    if not kinds and ptx and ("wgmma.mma_async" in ptx or "mma.sync" in ptx):
        kinds.append("wgmma" if "wgmma.mma_async" in ptx else "mma.sync")
    return " + ".join(kinds) or "none"


def tma_kind(utmaldg: int, ptx: str = "") -> str:
    if utmaldg:
        return f"UTMALDG x{utmaldg}"
    return "PTX only" if "cp.async.bulk.tensor" in ptx else "no"


def describe_cubin(cubin: bytes, ptx: str = "") -> dict:
    """{function name: figures} for every function in a cubin."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        res, sass = _run("-res-usage", path), _run("-sass", path)
    chunks = re.split(r"\n\s*Function : (\S+)\n", sass)
    listings = dict(zip(chunks[1::2], chunks[2::2]))
    out = {}
    for m in _RES.finditer(res):
        name = m.group(1)
        stats = sass_stats(listings.get(name, ""))
        out[name] = dict(regs=int(m.group(2)), stack=int(m.group(3)), static_shared=int(m.group(4)), **stats,
                         mma=mma_kind(stats["mma_sass"], ptx), tma=tma_kind(stats["utmaldg"], ptx))
    return out


def describe_triton(compiled) -> dict:
    """Figures for one compiled Triton kernel (a triton.compiler.CompiledKernel)."""
    (figures,) = describe_cubin(compiled.asm["cubin"], compiled.asm.get("ptx", "")).values()
    return figures


def short_cuda_names(mangled: list) -> list:
    """`glu_bwd_kernel<__nv_bfloat16, 8, (Act)2>` for each mangled CUDA kernel name (c++filt when present)."""
    try:
        out = subprocess.run(["c++filt"], input="\n".join(mangled), capture_output=True, text=True,
                             timeout=60).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        out = []
    return [_strip_demangled(full) or m for m, full in zip(mangled, out + [""] * len(mangled))]


def _strip_demangled(full: str) -> str:
    """`void ns::(anonymous namespace)::f<A, (E)2>(Args)` -> `f<A, (E)2>`; "" if it is not of that shape."""
    if not full.endswith(")"):
        return ""
    depth, i = 0, len(full) - 1
    for i in range(len(full) - 1, -1, -1):  # the parameter list's opening parenthesis
        depth += {")": 1, "(": -1}.get(full[i], 0)
        if depth == 0:
            break
    head, sep, tail = full[:i].partition("<")
    return (head.split()[-1].rsplit("::", 1)[-1] + sep + tail).replace("ptm::cuda::launcher::", "")
