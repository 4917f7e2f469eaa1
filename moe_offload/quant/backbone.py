"""Quantized backbone linears (attention projections) stored in backbone.safetensors, self-describing:

    <module>.weight [N, K]   ->   <module>.qweight  uint8 packed codes (kernels.PackedMatrix layout)
                                  <module>.qsz      bf16 [G, N, 2] scales and offsets (meta_bits=16; held
                                                    in the kernel's order once adopted, see QuantLinear._build)

K comes from the model, G from qsz, the bit width from the packed length, so no side table is needed. On
load (runtime.engine.build_model) every module with a `.qweight` in the file becomes a QuantLinear, which
runs the same kernels as the quantized experts (int4pack / int8pack on CPU, dequantise + GEMM elsewhere).
`quantize --head-bits 8|4` stores lm_head the same way (head_view). Routers, norms, embeddings, shared
experts and dense MLPs stay as they are.
"""

from __future__ import annotations

import torch
from torch import nn

from .hqq import group_size_for, quantize
from .kernels import LEGACY_LAYOUT, PackedMatrix, make_linear
from .pack import packed_nbytes

STORED_AS_IS = (".qweight", ".qsz")  # suffixes build_model must not cast to the compute dtype


def attention_linears(model: nn.Module) -> list[str]:
    """Names of the nn.Linear modules inside attention blocks (q/k/v/o and MLA's projections)."""
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and ".self_attn." in f".{name}"]


def quantize_weight(W: torch.Tensor, bits: int, group_size: int | None) -> dict[str, torch.Tensor]:
    """W [N, K] -> {"qweight": uint8, "qsz": bf16 [G, N, 2]}."""
    q = quantize(W.float(), bits, group_size, meta_bits=16)
    return {"qweight": PackedMatrix.from_quantized(q).packed, "qsz": q.sz}


def bits_of(nbytes: int, N: int, K: int) -> int:
    for b in (2, 3, 4, 8):
        if packed_nbytes(N * K, b) == nbytes:
            return b
    raise ValueError(f"{nbytes} bytes are no packing of a {N}x{K} matrix")


class QuantLinear(nn.Module):
    """y = x W^T (+ b) with W stored as codes + bf16 meta; the kernel is picked on first use per device."""

    def __init__(self, in_features: int, out_features: int, nbytes: int, groups: int, bias: bool):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.empty(nbytes, dtype=torch.uint8))
        self.register_buffer("qsz", torch.empty(groups, out_features, 2, dtype=torch.bfloat16))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self._lin = None
        self.layout = LEGACY_LAYOUT  # qweight's nibble order (quantize writes b64; the kernel's, once adopted)

    @property
    def bits(self) -> int:
        return bits_of(self.qweight.numel(), self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lin = self._lin
        if lin is None or lin.pm.sz.data_ptr() != self.qsz.data_ptr():  # (re)built after loading or moving
            lin = self._lin = self._build()
        y = lin(x.reshape(-1, self.in_features)).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def prepare(self) -> None:
        """Build the kernel now (at load) rather than on the first forward."""
        if self._lin is None:
            self._lin = self._build()

    def _build(self):
        """The kernel for qweight. A 4-bit kernel that reads another nibble order (the native one's r64; the
        file holds b64) makes one new stream: it becomes qweight, so the module holds one copy, not two."""
        bits = self.bits
        lin = make_linear(PackedMatrix(self.qweight, self.qsz, bits, self.out_features, self.in_features,
                                       self.layout))
        pm = lin.pm
        if bits == 4 and pm.packed.numel() == self.qweight.numel() and \
                pm.packed.untyped_storage().data_ptr() != self.qweight.untyped_storage().data_ptr():
            self.qweight, self.qsz, self.layout = pm.packed, pm.sz, pm.layout
        return lin

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}"


def use_quantized_linears(model: nn.Module, source) -> list[str]:
    """Swap every nn.Linear whose `<name>.qweight` is in `source` (keys()/shape_of()) for a QuantLinear
    (on the meta device, before loading). Returns the swapped names."""
    have = set(source.keys())
    swapped = []
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.Linear) and f"{name}.qweight" in have:
            nbytes = source.shape_of(f"{name}.qweight")[0]
            groups = source.shape_of(f"{name}.qsz")[0]
            with torch.device("meta"):
                q = QuantLinear(m.in_features, m.out_features, nbytes, groups, m.bias is not None)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, q)
            swapped.append(name)
    model.stored_dtype_keys = STORED_AS_IS
    return swapped


class QuantizedSource:
    """A read-only view of a checkpoint source where `names` (module.weight) appear quantized
    (module.qweight, module.qsz); quantization runs when a tensor is first read. For write_safetensors."""

    def __init__(self, source, names: list[str], bits: int, group_size: int | None):
        self.source, self.bits, self.group_size = source, bits, group_size
        self.weights = {f"{n[:-len('.weight')]}.{p}": n for n in names for p in ("qweight", "qsz")}
        self.names = set(names)
        self._last: tuple[str, dict] | None = None

    def rename(self, names: list[str]) -> list[str]:
        out = []
        for k in names:
            stem = k[: -len(".weight")]
            out += [f"{stem}.qweight", f"{stem}.qsz"] if k in self.names else [k]
        return out

    def keys(self) -> list[str]:
        return self.rename(self.source.keys())

    def _parts(self, name: str) -> dict[str, torch.Tensor]:
        w = self.weights[name]
        if self._last is None or self._last[0] != w:
            self._last = (w, quantize_weight(self.source.get(w), self.bits, self.group_size))
        return self._last[1]

    def get(self, name: str) -> torch.Tensor:
        if name not in self.weights:
            return self.source.get(name)
        return self._parts(name)[name.rpartition(".")[2]]

    def dtype_of(self, name: str) -> str:
        if name not in self.weights:
            return self.source.dtype_of(name)
        return "U8" if name.endswith(".qweight") else "BF16"

    def shape_of(self, name: str) -> list[int]:
        if name not in self.weights:
            return self.source.shape_of(name)
        N, K = self.source.shape_of(self.weights[name])
        if name.endswith(".qweight"):
            return [packed_nbytes(N * K, self.bits)]
        return [K // group_size_for(K, self.group_size), N, 2]


def linears_view(names: list[str], bits: int, group_size: int | None):
    """convert(backbone_view=...) hook: store the linears `names` (module.weight) quantized."""

    def view(source, backbone: list[str], keep: tuple[str, ...]):
        q = QuantizedSource(source, [n for n in names if n in set(backbone)], bits, group_size)
        return q, q.rename(backbone), (*keep, *STORED_AS_IS)

    return view


def attention_view(model: nn.Module, bits: int, group_size: int | None):
    """convert(backbone_view=...) hook: store the model's attention linears quantized."""
    return linears_view([f"{n}.weight" for n in attention_linears(model)], bits, group_size)


def head_view(model: nn.Module, bits: int, group_size: int | None):
    """convert(backbone_view=...) hook: store lm_head quantized (as llama.cpp's Q4_0 / Q8_0 files do; a
    model whose lm_head is the embedding (tied) keeps it). At Mixtral width the 16-bit lm_head is 250 MiB
    of the 820 MiB backbone, and decode reads all of it every token."""
    return linears_view([] if getattr(model, "tie", False) else ["lm_head.weight"], bits, group_size)


def chain(views: list):
    """One backbone_view hook applying `views` in turn (their linears are disjoint)."""

    def view(source, backbone: list[str], keep: tuple[str, ...]):
        for v in views:
            source, backbone, keep = v(source, backbone, keep)
        return source, backbone, keep

    return view
