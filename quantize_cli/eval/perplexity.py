"""Perplexity over token windows: ppl = exp(mean NLL over every predicted token of every window)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .progress import progress_bar


@dataclass
class Perplexity:
    """Summed negative log-likelihood (nats) over ``tokens`` predicted tokens of ``windows`` windows."""

    nll_sum: float
    tokens: int
    windows: int

    @property
    def nll(self) -> float:
        """Mean NLL per predicted token, in nats."""
        return self.nll_sum / self.tokens

    @property
    def ppl(self) -> float:
        return math.exp(self.nll)


def check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}")


@torch.inference_mode()
def window_logprobs(
    model: torch.nn.Module, windows: torch.Tensor, batch_size: int, device: torch.device, label: str
) -> Iterator[tuple[int, torch.Tensor]]:
    """For each batch of ``windows`` (n, T): (index of its first window, fp32 log-probs (b, T-1, V)).

    Row t of a window's log-probs is the model's distribution for token t+1 given tokens 0..t; the last
    position predicts nothing inside the window and is dropped.
    """
    check_batch_size(batch_size)
    with progress_bar(label, windows.shape[0]) as advance:
        for start in range(0, windows.shape[0], batch_size):
            batch = windows[start : start + batch_size].to(device)
            logits = model(input_ids=batch, use_cache=False).logits[:, :-1]
            yield start, torch.log_softmax(logits.float(), dim=-1)
            advance(batch.shape[0])


def token_nll(logprobs: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
    """NLL of each predicted token: logprobs (b, T-1, V), windows (b, T) -> (b, T-1) fp32."""
    targets = windows[:, 1:].to(logprobs.device)
    return -logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def perplexity(model: torch.nn.Module, windows: torch.Tensor, batch_size: int, device: torch.device) -> Perplexity:
    """Perplexity of ``model`` over ``windows`` (n, T): every token but each window's first is predicted."""
    total = 0.0
    for start, logprobs in window_logprobs(model, windows, batch_size, device, "perplexity"):
        total += float(token_nll(logprobs, windows[start : start + logprobs.shape[0]]).double().sum())
    n, seq_len = windows.shape
    return Perplexity(total, n * (seq_len - 1), n)
