"""Sampling (minirlhf/generation.py): the fast top-k / top-p filter against a full sort of the
vocabulary, and the inverse-CDF draw against the probabilities it draws from."""

from __future__ import annotations

import pytest
import torch

from minirlhf.generation import NUCLEUS_CANDIDATES, draw, filter_logits, sample_next


def reference_filter(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Top-k then top-p by sorting all V logits (Holtzman et al. 2020, section 3.1): keep logits >= the
    k-th largest, then, in descending order, the tokens whose better-ranked tokens hold < top_p."""
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        remove_sorted = (probs.cumsum(-1) - probs) >= top_p
        logits = logits.masked_fill(remove_sorted.scatter(-1, order, remove_sorted), float("-inf"))
    return logits


@pytest.mark.parametrize("top_k, top_p", [(5, None), (None, 0.9), (7, 0.6), (None, 0.5), (3000, 0.95),
                                          (None, None), (0, 1.0)])
@pytest.mark.parametrize("scale", [0.5, 4.0])
def test_filter_matches_full_sort(top_k, top_p, scale):
    """Peaked (scale 4) and flat (0.5) rows over a vocabulary larger than NUCLEUS_CANDIDATES: a flat
    row's nucleus reaches past the candidates, so the full-sort fallback runs too."""
    g = torch.Generator().manual_seed(0)
    logits = scale * torch.randn(6, 3 * NUCLEUS_CANDIDATES, generator=g)
    assert torch.equal(filter_logits(logits, top_k, top_p).isinf(), reference_filter(logits, top_k, top_p).isinf())


def test_filter_keeps_ties_with_the_kth():
    logits = torch.tensor([[3.0, 1.0, 2.0, 2.0, 0.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    got = filter_logits(logits, 2, None)
    assert torch.equal(got.isfinite(), torch.tensor([[True, False, True, True, False], [True] * 5]))
    # top-p after it: row 0 keeps only the 3 (p = 0.58 >= 0.5); in row 1 five equal tokens (p = 0.2 each)
    # leave three in the nucleus, which three depending on how the sort orders equal values
    nucleus = filter_logits(logits, 2, 0.5).isfinite()
    assert torch.equal(nucleus[0], torch.tensor([True, False, False, False, False])) and nucleus[1].sum() == 3


def test_filter_with_many_ties_matches_full_sort():
    """bf16 logits tie often, at the k-th value too: every token tied with it survives."""
    g = torch.Generator().manual_seed(4)
    logits = (3 * torch.randn(8, 2000, generator=g)).to(torch.bfloat16).float()
    for k in (5, 50, 300):
        assert torch.equal(filter_logits(logits, k, None).isinf(), reference_filter(logits, k, None).isinf())
        got = sample_next(logits, 1.0, k, None, torch.Generator().manual_seed(5))[0]
        assert reference_filter(logits, k, None).isfinite().gather(-1, got[:, None]).all()


def test_draw_follows_the_probabilities():
    """40000 draws from p = (0.5, 0.3, 0, 0.15, 0.05): each frequency within 4 standard errors
    (sqrt(p (1 - p) / n) <= 0.0025 -> 0.01), and the zero-probability entry never drawn."""
    p = torch.tensor([0.5, 0.3, 0.0, 0.15, 0.05])
    n = 40_000
    idx = draw(p.expand(n, 5), torch.Generator().manual_seed(1))
    freq = torch.bincount(idx, minlength=5).double() / n
    assert freq[2] == 0
    assert (freq - p.double()).abs().max() < 0.01


def test_sampling_is_reproducible_and_respects_the_filter():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(64, 500, generator=g)
    a = sample_next(logits, 0.8, 10, 0.9, torch.Generator().manual_seed(3))
    b = sample_next(logits, 0.8, 10, 0.9, torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    allowed = reference_filter(logits / 0.8, 10, 0.9).isfinite()
    assert allowed.gather(-1, a[0][:, None]).all()
    # the log-prob is that of the unfiltered temperature-scaled distribution (see GenerationOutput)
    want = torch.log_softmax(logits / 0.8, -1).gather(-1, a[0][:, None])[:, 0]
    torch.testing.assert_close(a[1], want)


def test_non_finite_probabilities_raise_as_multinomial_does():
    """ppo turns this RuntimeError into its one-line "non-finite sampling probabilities" error."""
    logits = torch.tensor([[0.0, float("nan"), 1.0]])
    with pytest.raises(RuntimeError, match="inf.*nan"):
        sample_next(logits, 1.0, None, None, None)
