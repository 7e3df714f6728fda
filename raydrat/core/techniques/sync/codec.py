"""The quantized exchange: the mean of a vector across workers, sent in fp32, bf16, or int8
with one fp32 scale per block of values (``sync.quantization``, ``sync.quant_block``).

``none``: one ring all-reduce. ``bf16``/``int8``: the vector is cut into ``W`` equal chunks
(zero-padded to a multiple of ``W``), quantized and exchanged with an all-to-all (each rank
receives every worker's copy of its own chunk), reduced in fp32, re-quantized and
all-gathered; every rank dequantizes the same gathered bytes, so every rank gets the same
result. The int8 scales travel in the same buffers as the values (two collectives in all).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from raydrat.core.techniques.sync.comm import ring_allreduce_bytes


def quantize(x: torch.Tensor, quantization: str, block: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``x`` (rows, m), fp32 → (payload, scales). ``bf16``: the values in bf16, no scales.
    ``int8``: each row cut into blocks of ``block`` values (the last one partial), each
    scaled by its absmax / 127 and rounded to the nearest int8 in [-127, 127]; scales
    (rows, ceil(m / block)) in fp32."""
    if quantization == "bf16":
        return x.to(torch.bfloat16), None
    rows, m = x.shape
    nb = math.ceil(m / block)
    xb = F.pad(x, (0, nb * block - m)).view(rows, nb, block)
    scale = xb.abs().amax(dim=-1) / 127.0  # (rows, nb)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(xb / scale.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
    return q.view(rows, nb * block)[:, :m].contiguous(), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor | None, block: int) -> torch.Tensor:
    """Inverse of :func:`quantize`: (rows, m) fp32."""
    if scale is None:
        return q.float()
    rows, m = q.shape
    nb = scale.shape[1]
    qb = F.pad(q.float(), (0, nb * block - m)).view(rows, nb, block)
    return (qb * scale.unsqueeze(-1)).view(rows, nb * block)[:, :m]


def _all_gather_flat(out: torch.Tensor, inp: torch.Tensor) -> None:
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out.view(-1), inp.reshape(-1))


def _pack(q: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """One byte buffer per row: the quantized values, then the row's fp32 scales (one
    collective instead of two)."""
    if scale is None:
        return q
    return torch.cat([q.view(torch.uint8), scale.view(torch.uint8)], dim=1)


def _unpack(buf: torch.Tensor, m: int, quantization: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    if quantization != "int8":
        return buf, None
    return buf[:, :m].view(torch.int8), buf[:, m:].contiguous().view(torch.float32)


def exchange_mean(flat: torch.Tensor, quantization: str, block: int) -> tuple[torch.Tensor, int]:
    """The mean across workers of the fp32 vector ``flat``, exchanged in ``quantization``
    (see the module docstring), and the bytes this worker sent."""
    world = dist.get_world_size()
    if quantization == "none":
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        return flat.div_(world), ring_allreduce_bytes(flat.numel() * flat.element_size(), world)
    n = flat.numel()
    m = math.ceil(n / world)
    chunks = F.pad(flat, (0, world * m - n)).view(world, m)
    out = _pack(*quantize(chunks, quantization, block))
    received = torch.empty_like(out)
    dist.all_to_all_single(received, out)  # row r of `received`: rank r's copy of this rank's chunk
    sent = out.numel() * out.element_size() * (world - 1) // world
    mine = dequantize(*_unpack(received, m, quantization), block).sum(dim=0, keepdim=True).div_(world)
    mine_q = _pack(*quantize(mine, quantization, block))  # (1, ...): this rank's chunk of the mean
    gathered = torch.empty_like(out)
    _all_gather_flat(gathered, mine_q)
    sent += mine_q.numel() * mine_q.element_size() * (world - 1)
    return dequantize(*_unpack(gathered, m, quantization), block).reshape(-1)[:n], sent
