"""Live registers of a compiled Triton kernel, per SASS instruction, without a GPU: where its register pressure
peaks and what stays live across its loops (the view behind the spill figures of sm90-static.md).

    PTM_SM90_DUMP=/tmp/dump python tests/compile/triton_sm90.py relative_attention-bf16 "D=128 band seg"
    python -m tests.compile.sm90_liveness /tmp/dump/<case>__rel_bwd_dq_kernel_3.ptx [--at 55a0]

nvdisasm prints life ranges (-lrm) only for a cubin in the ELF layout the CUDA toolkit's ptxas writes (Triton's
bundled ptxas writes a newer one), and not for a kernel that uses all 255 registers. So the PTX is compiled again
with the toolkit's nvcc (the same registers and spill bytes: CUDA 13.0 against triton 3.7.1's ptxas 12.8), the
copy's register count is lowered to 254 (EIATTR_REGCOUNT, for reading only), and Triton's nvdisasm reads it.

Prints the loops (backward branches) with the registers live at their heads, the peak and where it is, and
with --at ADDR the registers live there, grouped by the instruction that last wrote them before ADDR."""

from __future__ import annotations

import argparse
import re
import struct
import subprocess
import sys
import tempfile
from collections import namedtuple
from pathlib import Path

from . import sm90_records as R

Instr = namedtuple("Instr", "addr text live columns")

_REGCOUNT = 0x2F  # EIATTR_REGCOUNT in .nv.info: (kernel symbol, registers), format EIFMT_SVAL
_LINE = re.compile(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;?\s*//\s*\|\s*(\d+)\s(.{255})")


def nvdisasm() -> str:
    import triton
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm")


def lower_regcount(cubin: bytes, to: int = 254) -> bytes:
    """cubin with every kernel's EIATTR_REGCOUNT of 255 set to `to` (nvdisasm refuses 255 for life ranges)."""
    data = bytearray(cubin)
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize) for i in range(shnum)]
    names_at = sections[shstrndx][4]
    for name, _, _, _, offset, size in sections:
        if not data[names_at + name:].split(b"\0", 1)[0].startswith(b".nv.info"):
            continue
        p = offset
        while p < offset + size:
            fmt, attr = data[p], data[p + 1]
            if fmt == 4:  # EIFMT_SVAL: a 16-bit size, then the value
                length = struct.unpack_from("<H", data, p + 2)[0]
                if attr == _REGCOUNT and struct.unpack_from("<I", data, p + 8)[0] == 255:
                    struct.pack_into("<I", data, p + 8, to)
                p += 4 + length
            else:  # EIFMT_NVAL (2 bytes) or EIFMT_HVAL (4 bytes)
                p += 4 if fmt == 3 else 2
    return bytes(data)


def life_ranges(ptx: Path) -> str:
    """nvdisasm -lrm narrow of the PTX compiled for sm_90a by the toolkit (see the module docstring)."""
    nvcc = R.find_nvcc()
    if nvcc is None:
        raise FileNotFoundError("nvcc not found (not on PATH, nor $CUDA_HOME/bin/nvcc)")
    with tempfile.TemporaryDirectory() as d:
        cubin = Path(d) / "k.cubin"
        subprocess.run([nvcc, "-cubin", "-arch=sm_90a", str(ptx), "-o", str(cubin)], check=True,
                       capture_output=True, text=True)
        cubin.write_bytes(lower_regcount(cubin.read_bytes()))
        out = subprocess.run([nvdisasm(), "-lrm", "narrow", "-c", str(cubin)], capture_output=True, text=True)
    if "|" not in out.stdout:
        raise RuntimeError(f"nvdisasm printed no life ranges:\n{out.stderr[-2000:]}")
    return out.stdout


def parse(listing: str) -> tuple:
    """-> ([Instr], {label: address}, {address: label it branches to})."""
    instrs, labels, branches, pending = [], {}, {}, []
    for line in listing.splitlines():
        label = re.match(r"\s*\.L_x_(\d+):", line)
        if label:
            pending.append(int(label.group(1)))
            continue
        m = _LINE.match(line)
        if not m:
            continue
        addr = int(m.group(1), 16)
        for lab in pending:
            labels[lab] = addr
        pending = []
        instrs.append(Instr(addr, m.group(2).strip(), int(m.group(3)), m.group(4)))
        target = re.search(r"BRA `\(\.L_x_(\d+)\)", m.group(2))
        if target:
            branches[addr] = int(target.group(1))
    return instrs, labels, branches


def loops(instrs: list, labels: dict, branches: dict) -> list:
    """(branch address, loop head address, registers live at the head) per backward branch."""
    live = {i.addr: i.live for i in instrs}
    return [(a, labels[t], live[labels[t]]) for a, t in branches.items() if t in labels and labels[t] < a]


def live_at(instrs: list, addr: int) -> dict:
    """{defining instruction (address, text): [registers]} for the registers live at addr (the instruction at addr
    among the writers: nvdisasm marks the registers it writes live there)."""
    at = next(i for i, x in enumerate(instrs) if x.addr == addr)
    groups = {}
    for reg, mark in enumerate(instrs[at].columns):
        if mark == " ":
            continue
        writer = (0, "?")
        for x in reversed(instrs[:at + 1]):  # the last instruction up to addr that marks reg as written
            if x.columns[reg] in "^x":
                writer = (x.addr, x.text)
                break
        groups.setdefault(writer, []).append(reg)
    return groups


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("ptx", type=Path, help="a kernel's PTX (PTM_SM90_DUMP of tests/compile/triton_sm90.py)")
    ap.add_argument("--at", help="a SASS address (hex): the registers live there, by the instruction that wrote them")
    args = ap.parse_args(argv)
    instrs, labels, branches = parse(life_ranges(args.ptx))
    for branch, head, n in loops(instrs, labels, branches):
        print(f"loop {head:#06x}..{branch:#06x}: {n} registers live at its head")
    peak = max(instrs, key=lambda x: x.live)
    print(f"peak {peak.live} registers at {peak.addr:#06x}: {peak.text}")
    if args.at:
        groups = live_at(instrs, int(args.at, 16))
        print(f"live at {args.at}: {sum(len(r) for r in groups.values())}")
        for (addr, text), regs in sorted(groups.items()):
            print(f"  {addr:#06x} {text[:70]:<70} R{', R'.join(map(str, regs))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
