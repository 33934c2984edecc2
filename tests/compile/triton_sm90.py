"""Compile ptm_kernels' Triton kernels for sm_90 without a GPU, driving the real launchers (helper of
test_triton_compile.py; run as `python tests/compile/triton_sm90.py FAMILY`, with TRITON_INTERPRET unset).

The launchers run on small CPU tensors with their device helpers patched to answer as an H100 would
(capability 9.0, 132 SMs, not interpreted). Each kernel launch is intercepted by a stand-in for the kernel
object: it binds the launch's arguments exactly as Triton's launcher would (signature, constexprs,
divisibility specialisation, options), compiles them for GPUTarget("cuda", 90, 32) (Triton -> PTX -> ptxas ->
cubin), and, like the CUDA driver when a kernel is loaded, raises OutOfResources if the kernel needs more
shared memory than an H100 block may have. Launchers with a fallback ladder (attention's config lists,
relative attention's stages / band -> gather options) then step down as they would on the GPU.

Prints one line `RESULT {json}` per compile (ok, out_of_resources or error) and per case (ok / error). With
PTM_SM90_DUMP=FOLDER it also writes each compile's TTGIR, PTX and cubin there (`cuobjdump -sass` reads the cubin).
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

os.environ.pop("TRITON_INTERPRET", None)  # compile for real: Triton reads it when a kernel is defined

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.compiler import compile as triton_compile  # noqa: E402
from triton.compiler import make_backend  # noqa: E402
from triton.runtime.errors import OutOfResources  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

import ptm_kernels.triton._common as COMMON  # noqa: E402
import ptm_kernels.triton.activations as ACT  # noqa: E402
import ptm_kernels.triton.attention as ATTN  # noqa: E402
import ptm_kernels.triton.losses as LOSSES  # noqa: E402
import ptm_kernels.triton.norms as NORMS  # noqa: E402
import ptm_kernels.triton.relative_attention as REL  # noqa: E402
import ptm_kernels.triton.rope as ROPE  # noqa: E402
from ptm_kernels.kernel_params import (AttentionParams, Bias, Dropout, RelativeParams, RelativeStream,  # noqa: E402
                                        Visibility, replaced)
import sm90_artefacts  # noqa: E402  (beside this file: registers, spills, MMA kind, TMA from the cubin)

CAPABILITY = (9, 0)
NUM_SMS = 132  # H100 SXM
SMEM_LIMIT = 232448  # bytes of shared memory an H100 / H200 block may have (227 KB, opt-in)
TARGET = GPUTarget("cuda", 90, 32)
BACKEND = make_backend(TARGET)
CUDA = torch.device("cuda", 0)

_case = ""  # the case being run (for the records)


def emit(**rec):
    print("RESULT " + json.dumps(rec), flush=True)


def _brief(x):
    return x if isinstance(x, (bool, int, float, str)) or x is None else type(x).__name__


class CompilingKernel:
    """Stands in for a JITFunction: `kernel[grid](*args, **kwargs)` compiles the launch for sm_90."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getattr__(self, name):  # .fn, .arg_names, ... as the real kernel
        return getattr(self.kernel, name)

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launch(grid, args, kwargs)

    def launch(self, grid, args, kwargs):
        k = self.kernel
        name = k.fn.__name__
        const = {a: _brief(v) for a, v in kwargs.items() if a[:1].isupper() or a.startswith("num_")}
        t0 = time.time()
        try:
            compiled, options = self.compile(args, kwargs)
        except Exception as e:
            msg = f"{type(e).__name__}: {e}"
            cause = e.__cause__ or e.__context__
            while cause is not None and len(msg) < 20000:
                msg += f"\n  caused by {type(cause).__name__}: {cause}"
                cause = cause.__cause__ or cause.__context__
            emit(case=_case, kernel=name, config=const, status="error", error=msg[-6000:],
                 seconds=round(time.time() - t0, 2))
            raise CompileFailed(name) from e
        shared = int(compiled.metadata.shared)
        if os.environ.get("PTM_SM90_DUMP"):  # a folder: keep each compile's TTGIR, PTX and cubin for reading
            stem = os.path.join(os.environ["PTM_SM90_DUMP"], f"{_case} {name} {options.num_stages}".replace(" ", "_"))
            for ext, mode in (("ttgir", "w"), ("ptx", "w"), ("cubin", "wb")):
                with open(f"{stem}.{ext}", mode) as f:
                    f.write(compiled.asm[ext])
        status = "ok" if shared <= SMEM_LIMIT else "out_of_resources"
        try:
            figures = sm90_artefacts.describe_triton(compiled)
        except Exception as e:  # cuobjdump missing or unreadable: the compile result still stands
            figures = dict(figures_error=f"{type(e).__name__}: {e}")
        emit(case=_case, kernel=name, config=const, status=status, shared=shared, grid=_grid(grid),
             num_stages=options.num_stages, num_warps=options.num_warps, seconds=round(time.time() - t0, 2),
             **figures)
        if status != "ok":
            raise OutOfResources(shared, SMEM_LIMIT, "shared memory")
        if os.environ.get("PTM_SM90_DROPOUT_TWINS"):
            self.dropout_twin(name, const, args, kwargs)

    def compile(self, args, kwargs):
        k = self.kernel
        binder = create_function_from_signature(k.signature, k.params, BACKEND)
        bound_args, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = k._pack_args(BACKEND, dict(kwargs), bound_args, specialization,
                                                             options)
        return triton_compile(ASTSource(k, signature, constexprs, attrs), target=TARGET,
                              options=options.__dict__), options

    def dropout_twin(self, name, const, args, kwargs):
        """A launch with dropout compiled again with its dropout constexpr(s) off, all else equal: the pair
        gives the dropout instruction ratio (status "dropout_twin"; tests/compile/sm90_report.py)."""
        off = {a: False for a, v in kwargs.items() if "DROPOUT" in a and v is True}
        twin_args, twin_kwargs, marker = list(args), {**kwargs, **off}, {}
        names = list(self.kernel.arg_names)
        if not any("DROPOUT" in a for a in kwargs) and "drop" in names:  # no constexpr flag: `drop` is it
            # the grouped attention kernels take dropout as one argument, `drop`: (seed, threshold, scale), or
            # None when off (a specialisation, as a constexpr flag would be)
            i = names.index("drop")
            if i < len(twin_args) and twin_args[i] is not None:
                twin_args[i] = None
                marker = {"DROPOUT(drop)": False}
            elif twin_kwargs.get("drop") is not None:
                twin_kwargs["drop"] = None
                marker = {"DROPOUT(drop)": False}
        if off or marker:
            compiled, options = self.compile(tuple(twin_args), twin_kwargs)
            emit(case=_case, kernel=name, config={**const, **off, **marker}, status="dropout_twin",
                 shared=int(compiled.metadata.shared), num_stages=options.num_stages, num_warps=options.num_warps,
                 **sm90_artefacts.describe_triton(compiled))


def _grid(grid):
    """The launch grid as a list of ints (None for a callable grid)."""
    if callable(grid):
        return None
    return [int(g) for g in (grid if isinstance(grid, (tuple, list)) else (grid,))]


class CompileFailed(Exception):
    pass


def patch_device():
    """The launchers' device helpers answer as an H100 would (this process only)."""
    # every module of ptm_kernels.triton (the attention packages launch from their launch.py)
    for mod in [m for name, m in list(sys.modules.items()) if name.startswith("ptm_kernels.triton")]:
        for attr in dir(mod):
            obj = getattr(mod, attr)
            if isinstance(obj, triton.runtime.jit.JITFunction) and attr.endswith("_kernel"):
                setattr(mod, attr, CompilingKernel(obj))
    NORMS.num_programs = ACT.num_programs = lambda device: NUM_SMS
    COMMON.interpreted = lambda device: False  # the attention families' device checks (ptm_kernels.triton._common)
    COMMON.capability = lambda device: CAPABILITY
    COMMON.num_sms = lambda device: NUM_SMS


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ------------------------------------------------------------------------------------------------ cases
def norm_cases():
    for dn, dt in DTYPES.items():
        # C: one-pass with 4 / 16 warps (forward), and the two-pass loop
        for C in (1000, 8192, 20000):
            x = torch.randn(4, C, dtype=dt)
            full = dn == "bf16" or C == 1000
            combos = [(r, w, b) for r in (False, True) for w in (False, True) for b in (False, True)] if full \
                else [(False, False, False), (True, True, True)]
            for res, hw, hb in combos:
                w = torch.randn(C, dtype=dt if not (dn == "bf16" and hb) else torch.float32) if hw else None
                bias = torch.randn(C, dtype=dt) if hb else None
                r = torch.randn(4, C, dtype=dt) if res else None
                tag = f"{dn} C={C} residual={res} weight={hw}{'(fp32)' if w is not None and w.dtype != dt else ''}"
                yield f"rms_norm_fwd {tag} round={hb}", lambda: NORMS.rms_norm_fwd(x, w, r, 1e-6, hb)
                yield f"rms_norm_bwd {tag}", lambda: NORMS.rms_norm_bwd(x, x, w, torch.ones(4), r)
                yield f"layer_norm_fwd {tag} bias={hb}", lambda: NORMS.layer_norm_fwd(x, w, bias, r, 1e-5)
                yield (f"layer_norm_bwd {tag} bias={hb}",
                       lambda: NORMS.layer_norm_bwd(x, x, w, torch.zeros(4), torch.ones(4), r, hb))


def activation_cases():
    for dn, dt in DTYPES.items():
        for act in ACT._ACTS:
            for C in (1000, 8):  # tiles [2, 1024] and [128, 16]
                x = torch.randn(300, C, dtype=dt)
                for hb in (False, True):
                    b = torch.randn(C, dtype=dt) if hb else None
                    yield f"act_fwd {dn} {act} C={C} bias={hb}", lambda: ACT.act_fwd(x, b, act)
                    yield f"act_bwd {dn} {act} C={C} bias={hb}", lambda: ACT.act_bwd(x, x, b, act)
            g = torch.randn(3000, dtype=dt)
            yield f"glu_fwd {dn} {act}", lambda: ACT.glu_fwd(g, g, act)
            yield f"glu_bwd {dn} {act}", lambda: ACT.glu_bwd(g, g, g, act)


def rope_cases():
    for dn, dt in DTYPES.items():
        for D in (64, 128):
            x = torch.randn(2, 8, 16, D, dtype=dt)
            pos = torch.arange(16).view(1, 16)
            cos = torch.randn(32, D // 2)
            for inter in (False, True):
                for inv in (False, True):
                    for rot in (D, D // 2):
                        if dn != "bf16" and (inv or rot != D):
                            continue
                        c = cos[:, : rot // 2].contiguous()
                        yield (f"rope {dn} D={D} interleaved={inter} inverse={inv} rotary_dim={rot}",
                               lambda: ROPE.rope_fwd(x, c, c, pos, inter, rot, inv))


def loss_cases():
    for dn, dt in DTYPES.items():
        for V in (1000, 32000):  # one block; a 32k vocabulary in four loop steps
            x = torch.randn(4, V, dtype=dt)
            y = torch.randint(0, V, (4,))
            for s, z in ((0.0, 0.0), (0.1, 1e-4)):
                yield (f"cross_entropy_fwd {dn} V={V} smoothing={s} z_loss={z}",
                       lambda: LOSSES.cross_entropy_fwd(x, y, -100, s, z))
            for inplace in (False, True):
                yield (f"cross_entropy_bwd {dn} V={V} inplace={inplace}",
                       lambda: LOSSES.cross_entropy_bwd(torch.ones(4), x, y, torch.zeros(4), -100, 0.1, 1e-4, inplace))


def attention_cases(dn):
    dt = DTYPES[dn]
    B, H, L = 2, 40, 256  # enough query tiles to fill 132 SMs: no split-K outside decoding
    for D in (64, 128):
        q, k, v = (torch.randn(B, H, L, D, dtype=dt) for _ in range(3))
        lse = torch.zeros(B, H, L)
        seg = torch.zeros(B, L, dtype=torch.int64)
        dense = torch.ones(B, H, L, L, dtype=torch.bool)
        bias = torch.randn(1, H, L, L)
        toep = torch.randn(H, 2 * L - 1)
        bm, bn = ATTN.attention_tile(D, dt, CUDA)
        bmap = torch.ones(B, H, triton.cdiv(L, bm), triton.cdiv(L, bn), dtype=torch.int8)
        heavy_vis = Visibility(causal=True, window_left=64, window_right=3, key_lengths=torch.tensor([200]),
                               prefix_lengths=torch.tensor([10]), q_segments=seg, k_segments=seg, dense_mask=dense,
                               block_map=bmap, block_m=bm, block_n=bn)
        masks = {
            "none": AttentionParams(scale=0.1),
            "causal": AttentionParams(scale=0.1, vis=Visibility(causal=True)),
            "causal+window+klen+prefix+seg+dense+bias+toeplitz+dropout+map": AttentionParams(
                scale=0.1, vis=heavy_vis, bias=Bias(dense=bias, toeplitz=toep),
                dropout=Dropout(p=0.1, seed=torch.tensor(7))),
        }
        if dn == "fp16":  # the 16-bit paths are bf16's: a subset
            masks.pop("none")
        for mname, p in masks.items():
            yield f"attention_fwd {dn} D={D} {mname}", lambda: ATTN.attention_fwd(q, k, v, p)
            if p.bias.dense is not None:  # with the bias / Toeplitz gradients
                p = replaced(p, bias=replaced(p.bias, dense_requires_grad=True, toeplitz_requires_grad=True))
                mname += " dbias+dtoeplitz"
            yield f"attention_bwd {dn} D={D} {mname}", lambda: ATTN.attention_bwd(q, q, k, v, q, lse, p)
        qd = torch.randn(1, 2, 1, D, dtype=dt)
        kd, vd = torch.randn(1, 2, 1024, D, dtype=dt), torch.randn(1, 2, 1024, D, dtype=dt)
        yield (f"attention_fwd {dn} D={D} decode (split-K + combine)",
               lambda: ATTN.attention_fwd(qd, kd, vd, AttentionParams(scale=0.1)))
        # GQA 8:1 (LLaMA-70B-like), B = 1, 2 kv heads: the 8 query heads of a kv head share one program, so the
        # grid has B * Hk = 2 programs per key split (test_sm90_properties.test_gqa_decode_one_program_per_kv_head)
        qg = torch.randn(1, 16, 1, D, dtype=dt)
        for mname, p in (("none", AttentionParams(scale=0.1)),
                         ("causal", AttentionParams(scale=0.1, vis=Visibility(causal=True)))):
            yield (f"attention_fwd {dn} D={D} decode GQA 8:1 {mname} (packed, split-K + combine)",
                   lambda: ATTN.attention_fwd(qg, kd, vd, p))
    if dn == "bf16":
        yield "attention_dropout_mask", lambda: ATTN.attention_dropout_mask(3, 0.1, 1, 1, 100, 100, "cpu")


def _stream(B, H, L, D, dt, flags):
    """A RelativeStream; flags: subset of {causal, pos, seg, klen, prefix, vseg, dense}."""
    ids = torch.zeros(B, L, dtype=torch.int64)
    vis = Visibility(causal="causal" in flags,
                     key_lengths=torch.tensor([L] * B) if "klen" in flags else None,
                     prefix_lengths=torch.tensor([4] * B) if "prefix" in flags else None,
                     q_segments=ids if "vseg" in flags else None, k_segments=ids if "vseg" in flags else None,
                     dense_mask=torch.ones(B, 1, L, L, dtype=torch.bool).expand(B, H, L, L) if "dense" in flags
                     else None)
    return RelativeStream(torch.randn(B, H, L, D, dtype=dt), torch.randn(H, D, dtype=dt), torch.randn(H, D, dtype=dt),
                          seg=torch.randn(B, H, L, 2) if "seg" in flags else None,
                          q_ids=ids if "seg" in flags else None,
                          positions=torch.arange(L).view(1, L).expand(B, L) if "pos" in flags else None, vis=vis)


def relative_cases(dn):
    dt = DTYPES[dn]
    B, H, L = 1, 2, 128
    single = {"band causal": {"causal"},
              "band seg+klen+vseg+dense dropout": {"seg", "klen", "vseg", "dense"},
              "gather (positions) causal+klen+prefix": {"causal", "pos", "klen", "prefix"}}
    two = {"two-stream band|gather seg+dense": ({"seg", "dense"}, {"pos", "seg", "dense"})}
    for D in (64, 128):
        k, v = torch.randn(B, H, L, D, dtype=dt), torch.randn(B, H, L, D, dtype=dt)
        r = torch.randn(1, H, 2 * L, D, dtype=dt).expand(B, H, 2 * L, D)
        kids = torch.zeros(B, L, dtype=torch.int64)
        lse = torch.zeros(B, H, L)
        for name, flags in single.items():
            s = _stream(B, H, L, D, dt, flags)
            drop = Dropout(0.1, torch.tensor(5)) if "dropout" in name else Dropout()
            p = RelativeParams(kids if "seg" in flags else None, 0.1, L, L, drop)
            yield f"relative_attention_fwd {dn} D={D} {name}", lambda: REL.relative_attention_fwd(k, v, r, p, s)
            yield (f"relative_attention_bwd {dn} D={D} {name}",
                   lambda: REL.relative_attention_bwd(s.q, s.q, lse, k, v, r, p, s))
        for name, (f0, f1) in two.items():
            s0, s1 = _stream(B, H, L, D, dt, f0), _stream(B, H, L, D, dt, f1)
            p = RelativeParams(kids, 0.1, L, L, Dropout(0.1, torch.tensor(5)))
            yield (f"two_stream_attention_fwd {dn} D={D} {name}",
                   lambda: REL.two_stream_attention_fwd(k, v, r, p, s0, s1))
            yield (f"two_stream_attention_bwd {dn} D={D} {name}",
                   lambda: REL.two_stream_attention_bwd(s0.q, s0.q, lse, s1.q, s1.q, lse, k, v, r, p, s0, s1))


FAMILIES = {
    "norms": norm_cases,
    "activations": activation_cases,
    "rope": rope_cases,
    "losses": loss_cases,
    **{f"attention-{dn}": (lambda dn=dn: attention_cases(dn)) for dn in DTYPES},
    **{f"relative_attention-{dn}": (lambda dn=dn: relative_cases(dn)) for dn in DTYPES},
}


def main(family: str, only: str = "") -> None:
    global _case
    patch_device()
    emit(triton=triton.__version__, family=family)
    for name, run in FAMILIES[family]():
        if only and only not in name:
            continue
        _case = name
        ATTN._FALLBACK.clear()  # each case finds its own first launch option that fits
        REL._GPU_CHOICE.clear()
        try:
            run()
        except CompileFailed as e:
            emit(case=name, status="error", error=f"kernel {e} failed to compile (see its record)")
        except OutOfResources as e:
            emit(case=name, status="error", error=f"no launch option fits an sm_90 block: {e}")
        except Exception:
            emit(case=name, status="error", error="launcher raised:\n" + traceback.format_exc()[-4000:])
        else:
            emit(case=name, status="ok")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "")
