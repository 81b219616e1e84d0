"""Postprocess a whole batch where the model ran, so only what answers need crosses back.

For C = 1000 classes a batch's logits are 4 KB a row, and ranking them on the host costs the
event loop a softmax and a partition per row. On the device, the softmax, the ranking and the
unit vectors are a handful of kernels for the whole batch; the host then receives K scores and
indices per row, the embedding and its unit vector, and the logits only when an item asked.

The numbers are those of service.postprocess: the softmax in float64 after subtracting the
row's maximum, the ranking a stable descending sort (ties go to the lower index, as best_k
breaks them; torch.topk does not promise that), the norm summed in float64.
"""

from __future__ import annotations

import torch

from service.postprocess import BatchOutputs


def rank(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ([B, k] class indices, [B, k] float64 probabilities) of `logits`, best first."""
    wide = logits.float().double()  # the host path receives float32 logits, then widens them
    shifted = wide - wide.amax(dim=1, keepdim=True)
    exp = shifted.exp()
    probabilities = exp / exp.sum(dim=1, keepdim=True)
    # A full sort of [B, C] is a few microseconds on a GPU; `stable` keeps equal scores
    # (zeros underflowed from very negative logits, duplicated logits) in index order.
    scores, indices = torch.sort(probabilities, dim=1, descending=True, stable=True)
    return indices[:, :k], scores[:, :k]


def unit_rows(embedding: torch.Tensor) -> torch.Tensor:
    """Scale each float32 row to unit L2 norm, the norm summed in float64; zero rows stay zero."""
    vectors = embedding.float()
    norms = vectors.double().square().sum(dim=1, keepdim=True).sqrt().float()
    return torch.where(norms > 0, vectors / norms, vectors)


def postprocess(
    logits: torch.Tensor, embedding: torch.Tensor, *, top_k: int, want_logits: bool
) -> BatchOutputs:
    """Rank and normalise the batch on its device; return what the host needs, as numpy.

    `top_k` is the most any request may ask for (capped here at the number of classes);
    `want_logits` says whether some item of the batch asked for the raw logits.
    """
    k = min(top_k, logits.shape[1])
    indices, scores = rank(logits, k)
    vectors = embedding.float()
    unit = unit_rows(vectors)
    # .cpu() on the instance's stream waits for it: everything is complete on return.
    return BatchOutputs(
        logits.float().cpu().numpy() if want_logits else None,
        vectors.cpu().numpy(),
        ranked=(indices.cpu().numpy(), scores.cpu().numpy()),
        unit=unit.cpu().numpy(),
    )
