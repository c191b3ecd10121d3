"""Weight-only low precision for generation, applied to a trained model from the outside.

Decoding one sequence at a time reads every weight matrix once per token and does little arithmetic
with it, so its speed is set by memory bandwidth: storing the weights in fewer bytes is what makes it
faster. `prepare_for_generation(model, weights)` (what `lmforge generate --weights ...` calls) swaps
every `nn.Linear` of a model (the output head included, tied or not) for a module that keeps its weight
in low precision, in place; everything else (embeddings, LayerNorms, the KV cache, the residual stream)
stays as it was, so the model's code and calling conventions do not change. It is meant for inference:
the new modules have no gradients. With 'fp32' (the default) only the weights' memory layout changes.

    weights   stored as                                  computed as
    'fp16'    IEEE half, 2 bytes (fbgemm's packed        fp32 activations x fp16 weights, fp32
              layout on CPU)                             accumulation (FBGEMM's AVX2/AVX-512 kernel)
    'bf16'    bfloat16, 2 bytes                          activations cast to bf16, fp32 accumulation,
                                                         output cast back (oneDNN / cuBLAS)
    'int8'    int8, 1 byte, one fp32 scale per output    bf16 activations x int8 weights (ATen's
              row (symmetric, round to nearest)          `_weight_int8pack_mm`), output cast back

Measured (bench/RESULTS.md, GPT-2 124M shape, batch 1, 2 threads on the project's 2-core AVX2 machine):
fp32 23 tokens/s, fp16 50, int8 45, bf16 40; transformers' fp32 `generate` 16. Without native bf16 or
int8 instructions (no AVX-512) the int8 and bf16 kernels are compute-bound here; fp16 streams the weights.

Quality: fp16 keeps 11 significant bits of each weight (bf16 8, int8 about 7 relative to its row's
largest value); `tests/test_quantize.py` checks each against fp32 (logits, greedy tokens, perplexity of a
trained model) and the benchmark reports the same on its model (`bench/bench_cpu.py --work gpt2_generate`).
"""
from __future__ import annotations

from collections import Counter

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.errors import ConfigError

WEIGHTS = ("fp16", "bf16", "int8")
_FP16_MAX = 65504.0


def _fbgemm_fp16_available() -> bool:
    """FBGEMM's fp16-weight GEMM (x86 with AVX2 or better; PyTorch's own dynamic-quantization kernel)."""
    return (torch.backends.quantized.engine in ("fbgemm", "x86")
            and torch.backends.cpu.get_cpu_capability() not in ("DEFAULT", "NO AVX"))


class LowPrecisionLinear(nn.Module):
    """`y = x W^T + b` with W stored in low precision (see the module docstring); input and output
    keep their dtype. Build it with `LowPrecisionLinear.from_linear(linear, weights)`."""

    def __init__(self, in_features: int, out_features: int, weights: str, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features, self.weights = in_features, out_features, weights
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.packed = None  # fbgemm's packed fp16 weight and bias (an opaque CPU object; not in state_dict)

    @classmethod
    def from_linear(cls, linear: nn.Linear, weights: str) -> "LowPrecisionLinear":
        w = linear.weight.detach()
        m = cls(linear.in_features, linear.out_features, weights, linear.bias)
        if weights == "int8":
            scale = w.float().abs().amax(dim=1).clamp(min=1e-12) / 127.0  # (out,) one scale per output row
            m.register_buffer("weight", torch.round(w.float() / scale[:, None]).clamp(-127, 127).to(torch.int8))
            m.register_buffer("scale", scale)
            m.register_buffer("scale_bf16", scale.to(torch.bfloat16))
        elif weights == "fp16":
            if w.abs().max() > _FP16_MAX:
                raise ConfigError(f"a weight exceeds fp16's range ({_FP16_MAX}); use weights 'bf16'")
            if w.device.type == "cpu" and _fbgemm_fp16_available():  # packed for fbgemm: its only copy
                bias = None if linear.bias is None else linear.bias.detach().float()
                m.packed = torch.ops.quantized.linear_prepack_fp16(w.float().contiguous(), bias)
            else:
                m.register_buffer("weight", w.to(torch.float16))
        elif weights == "bf16":
            m.register_buffer("weight", w.to(torch.bfloat16))
        else:
            raise ConfigError(f"weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
        return m

    def dequantized(self) -> torch.Tensor:
        """The weight this module multiplies by, in fp32 (out, in): the reference its output is tested against."""
        if self.weights == "int8":
            return self.weight.float() * self.scale[:, None]
        if self.packed is not None:
            return torch.ops.quantized.linear_unpack_fp16(self.packed)[0].float()  # the fp16 values, as fp32
        return self.weight.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)  # (N, in)
        if self.weights == "fp16" and self.packed is not None and x2.dtype == torch.float32:
            y = torch.ops.quantized.linear_dynamic_fp16(x2.contiguous(), self.packed)  # bias included
        elif self.weights == "int8" and x2.device.type == "cpu" and self.in_features % 16 == 0:
            # PyTorch's CPU int8 kernel is only right for in_features a multiple of 16: measured on an AMD
            # EPYC, K=24 or 40 gave wrong sums and K=8 crashed the process; other widths take the path below
            y = torch.ops.aten._weight_int8pack_mm(x2.to(torch.bfloat16), self.weight, self.scale_bf16).to(x.dtype)
            if self.bias is not None:
                y = y + self.bias
        elif self.weights == "int8":  # elsewhere: dequantize on the fly (correct, not faster)
            y = F.linear(x2, self.weight.to(x.dtype)) * self.scale.to(x.dtype)
            if self.bias is not None:
                y = y + self.bias
        else:  # bf16 / fp16 weights: compute in that dtype (fp32 accumulation inside the GEMM), cast back
            y = F.linear(x2.to(self.weight.dtype), self.weight,
                         None if self.bias is None else self.bias.to(self.weight.dtype)).to(x.dtype)
        return y.view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, weights={self.weights}, "
                f"bias={self.bias is not None}")


class ChunkedLinear(nn.Module):
    """fp32 `y = x W^T + b` for decoding on several CPU threads, on the original Linear's parameters
    (the same Parameter objects: nothing is copied, names and ties are unchanged).

    The row-major weight W (out, in) is viewed, for free, as `chunks` blocks of out/chunks consecutive
    rows, and one batched GEMM (`baddbmm`) multiplies the activations by all blocks, which BLAS spreads
    over its threads one block each. This machine's BLAS does not spread a single matrix-vector product
    over its threads (2 threads measured no faster than 1), so this is what lets decoding read the weights
    with every core: GPT-2 124M batch-1 greedy decoding 1.26x the column-major single GEMV (bench/RESULTS.md).
    """

    def __init__(self, linear: nn.Linear, chunks: int):
        super().__init__()
        out, inp = linear.weight.shape
        if chunks < 2 or out % chunks or not linear.weight.is_contiguous():
            raise ValueError(f"ChunkedLinear needs a contiguous ({out}, {inp}) weight and out % chunks == 0, "
                             f"got chunks={chunks}")
        self.in_features, self.out_features, self.chunks = inp, out, chunks
        self.weight, self.bias = linear.weight, linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c, h, inp, out = self.chunks, self.out_features // self.chunks, self.in_features, self.out_features
        x2 = x.reshape(-1, inp)
        w = self.weight.view(c, h, inp).transpose(1, 2)  # block k: W[k*h:(k+1)*h]^T, (in, h)
        x3 = x2.unsqueeze(0).expand(c, x2.shape[0], inp)
        y = torch.bmm(x3, w) if self.bias is None else torch.baddbmm(self.bias.view(c, 1, h), x3, w)
        return y.transpose(0, 1).reshape(*x.shape[:-1], out)  # (c, N, h) -> (N, c*h): a view when N == 1

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, chunks={self.chunks}"


def _chunks_for(out_features: int, threads: int, min_rows: int = 128) -> int:
    """The most blocks (<= threads, each >= min_rows outputs) that divide out_features evenly; 1: none."""
    for c in range(min(threads, out_features // min_rows), 1, -1):
        if out_features % c == 0:
            return c
    return 1


def prepare_for_generation(model: nn.Module, weights: str = "fp32") -> nn.Module:
    """Make a trained model fast at generating, in place: every `nn.Linear` weight is re-laid out for
    (or stored in low precision for) the matrix-vector products that decoding one token at a time does.

    'fp32' keeps the values, the dtype and the parameters (names, ties) and changes only how each Linear
    reads its weight. On several CPU threads, a Linear whose rows split evenly into blocks of at least 128
    (one per thread) becomes a `ChunkedLinear`: one batched GEMM over the blocks, which BLAS runs one block
    per thread (a single matrix-vector product runs on one core here). Any other Linear keeps `F.linear`
    with its weight stored column-major: the same (out, in) tensor, whose transpose is then contiguous, so
    the product runs as `x @ W^T` on a contiguous (in, out) matrix, which BLAS streams faster for one row of
    activations (the layout GPT-2's Conv1D keeps). Measured on this project's 2-core machine (GPT-2 124M,
    batch 1): 1.2x from the blocks on top of 1.35x from the layout. Results equal the plain model's up to
    float rounding. A model prepared this way is for inference: save checkpoints from the original.

    Args:
        model: a trained model (GPT, LSTM, ...), on the device it will run on.
        weights: 'fp32' (layout only), or 'fp16', 'bf16', 'int8' (see the module docstring).

    Returns:
        the same model, in eval mode.
    """
    if weights not in ("fp32",) + WEIGHTS:
        raise ConfigError(f"weights must be one of fp32, {', '.join(WEIGHTS)}, got {weights!r}")
    targets = [(parent, name) for parent in model.modules() for name, child in parent._modules.items()
               if isinstance(child, nn.Linear)]
    if weights == "fp32":
        threads = torch.get_num_threads()
        for parent, name in targets:
            linear = getattr(parent, name)
            w = linear.weight
            if w.device.type != "cpu" or w.dim() != 2 or not w.is_contiguous():  # (a tied weight: changed once)
                continue
            chunks = _chunks_for(w.shape[0], threads)
            if chunks > 1:  # several threads: one block of rows each
                setattr(parent, name, ChunkedLinear(linear, chunks))
            else:  # same shape and values, column-major storage: x @ W^T runs on a contiguous (in, out) matrix
                w.data = w.data.t().contiguous().t()
        return model.eval()
    # A Linear registered in two places gets one low-precision copy; it is held (so its id stays its own)
    # until done. Every other one is replaced and freed one at a time, which keeps the peak memory low.
    uses = Counter(id(getattr(parent, name)) for parent, name in targets)
    shared: dict[int, tuple[nn.Linear, LowPrecisionLinear]] = {}
    for parent, name in targets:
        child = getattr(parent, name)
        if uses[id(child)] == 1:
            new = LowPrecisionLinear.from_linear(child, weights)
        else:
            new = shared.setdefault(id(child), (child, LowPrecisionLinear.from_linear(child, weights)))[1]
        setattr(parent, name, new)
        del child
    return model.eval()
