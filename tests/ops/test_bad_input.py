"""Bad input gives a clear error naming the argument, never a silently wrong result."""

import pytest
import torch

import ptm_kernels as pk

from ..conftest import DEVICE

x = torch.randn(4, 32, device=DEVICE)
w = torch.ones(32, device=DEVICE)
q = torch.randn(1, 2, 5, 16, device=DEVICE)
cos, sin = (t.to(DEVICE) for t in pk.rope_cos_sin(16, 8))

CASES = {
    "rms_norm weight size": (lambda: pk.rms_norm(x, torch.ones(31, device=DEVICE)), ValueError, "weight must have shape"),
    "rms_norm residual shape": (lambda: pk.rms_norm(x, w, residual=x[:2]), ValueError, "residual must have shape"),
    "rms_norm residual dtype": (lambda: pk.rms_norm(x, w, residual=x.double()), TypeError, "residual has dtype"),
    "rms_norm integer input": (lambda: pk.rms_norm(x.long(), w), TypeError, "x must have dtype"),
    "rms_norm device": (lambda: pk.rms_norm(x, w.to("meta")), ValueError, "weight is on meta"),
    "rms_norm cast": (lambda: pk.rms_norm(x, w, cast="gemma"), ValueError, "cast must be"),
    "rms_norm not a tensor": (lambda: pk.rms_norm([1.0, 2.0], None), TypeError, "x must be a torch.Tensor"),
    "layer_norm bias size": (lambda: pk.layer_norm(x, w, torch.zeros(3, device=DEVICE)), ValueError, "bias must have shape"),
    "layer_norm scalar": (lambda: pk.layer_norm(torch.tensor(1.0), None), ValueError, "at least 1 dimension"),
    "gelu approximate": (lambda: pk.gelu(x, "fast"), ValueError, "approximate must be"),
    "bias_gelu bias size": (lambda: pk.bias_gelu(x, torch.zeros(4, device=DEVICE)), ValueError, "bias must have shape"),
    "swiglu shapes": (lambda: pk.swiglu(x, x[:, :16]), ValueError, "up must have shape"),
    "swiglu dtypes": (lambda: pk.swiglu(x, x.bfloat16()), TypeError, "up has dtype"),
    "rope 3-D q": (lambda: pk.rope(q[0], None, cos, sin), ValueError, "q must be 4-D"),
    "rope k shape": (lambda: pk.rope(q, q[..., :8], cos, sin), ValueError, "k must have shape"),
    "rope cos width": (lambda: pk.rope(q, None, cos[:, :4], sin[:, :4]), ValueError, "cos must have shape"),
    "rope odd rotary_dim": (lambda: pk.rope(q, None, cos, sin, rotary_dim=7), ValueError, "rotary_dim must be even"),
    "rope offset past cache": (lambda: pk.rope(q, None, cos, sin, offset=4), ValueError, "outside the cos/sin cache"),
    "rope position out of range": (lambda: pk.rope(q, None, cos, sin, position_ids=torch.tensor([0, 1, 2, 3, 8])),
                                   ValueError, "positions must lie in"),
    "rope position_ids shape": (lambda: pk.rope(q, None, cos, sin, position_ids=torch.arange(4)), ValueError,
                                "position_ids must have shape"),
    "rope float positions": (lambda: pk.rope(q, None, cos, sin, position_ids=torch.zeros(5)), TypeError,
                             "position_ids must have dtype"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_raises_clear_error(case):
    fn, exc, message = CASES[case]
    with pytest.raises(exc, match=message):
        fn()


def test_unavailable_backend_override_raises():
    """Asking for a backend that cannot run here is an error, not a silent fallback."""
    from ptm_kernels import backend

    name = "cuda" if DEVICE.type == "cpu" else "cpu"
    with backend.use(name), pytest.raises(RuntimeError, match=f"backend '{name}' cannot run"):
        pk.rms_norm(x, w)
    with pytest.raises(ValueError, match="unknown backend"):
        with backend.use("fast"):
            pass
