"""Gather token-level model outputs across processes, keeping gradients for the local slice.

Used by training (the global-batch loss) and by evaluation (sharded scoring): it sits below both, so
neither imports the other for it (the package's folders depend one way: training → evaluation →
retrieval → the model files and this module).

With data parallelism each process encodes its own batch; the GRM loss wants every process's images and
captions as negatives. `gather_output` all-gathers every tensor field of a `GranAlignImageOutput` /
`GranAlignTextOutput` (batch sizes and token lengths may differ between processes: tensors are padded
for the transfer and trimmed back), then puts the *local* tensors, with their autograd history, in
place of this process's slice. Every process then computes the loss on the global batch; the gradient
reaching each process's parameters is the gradient of that loss with respect to its own slice. DDP
averages the gradients over W processes, so the trainer multiplies the loss by W to obtain exactly the
gradient of the global-batch loss (as if one process had encoded everything).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist
from transformers.utils import ModelOutput

__all__ = ["all_gather_tensors", "gather_output", "gather_tensor", "world_size"]

OutputT = TypeVar("OutputT", bound=ModelOutput)


def world_size() -> int:
    """Number of processes in the default group (1 without `torch.distributed`)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_gather_tensors(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Every process's `tensor` (any shapes with the same number of dims), in rank order.

    The entry of this process is `tensor` itself (differentiable); the others carry no gradient.
    """
    size = world_size()
    if size == 1:
        return [tensor]
    rank = dist.get_rank()
    shape = torch.tensor(tensor.shape, dtype=torch.long, device=tensor.device)
    shapes = [torch.empty_like(shape) for _ in range(size)]
    dist.all_gather(shapes, shape)
    shapes = [s.tolist() for s in shapes]
    if any(len(s) != tensor.dim() for s in shapes):
        raise ValueError(f"all processes must gather tensors with {tensor.dim()} dims, got shapes {shapes}")
    longest = [max(dims) for dims in zip(*shapes, strict=True)]
    transport = tensor.detach()
    if transport.dtype == torch.bool:  # gloo has no bool all_gather
        transport = transport.to(torch.uint8)
    if list(transport.shape) != longest:
        pad = []
        for dim in reversed(range(transport.dim())):
            pad += [0, longest[dim] - transport.shape[dim]]
        transport = torch.nn.functional.pad(transport, pad)
    buffers = [torch.empty_like(transport) for _ in range(size)]
    dist.all_gather(buffers, transport.contiguous())
    gathered = []
    for i, (buffer, s) in enumerate(zip(buffers, shapes, strict=True)):
        if i == rank:
            gathered.append(tensor)
        else:
            gathered.append(buffer[tuple(slice(0, n) for n in s)].to(tensor.dtype))
    return gathered


def gather_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every process's `tensor` along dim 0 (other dims must match); local slice keeps grad."""
    return torch.cat(all_gather_tensors(tensor), dim=0)


def gather_output(output: OutputT, concat: Callable[[list[OutputT]], OutputT]) -> OutputT:
    """All-gather every tensor field of a batch-first `ModelOutput` and merge with `concat`.

    `concat` is `concat_image_outputs` or `concat_text_outputs` (they pad token dims). Fields that are
    `None` on this process must be `None` on all. The local slice keeps its autograd history.
    """
    size = world_size()
    if size == 1:
        return output
    per_rank: list[dict[str, torch.Tensor]] = [{} for _ in range(size)]
    for name, value in output.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(
                f"cannot gather field {name!r} of type {type(value).__name__}; expected a tensor"
            )
        for rank, tensor in enumerate(all_gather_tensors(value)):
            per_rank[rank][name] = tensor
    return concat([type(output)(**fields) for fields in per_rank])
