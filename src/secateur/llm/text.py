"""Built-in calibration text: the Python language reference that ships with Python (`pydoc_data.topics`).

Why this source: it is real English prose with code, present in every Python install, so one-shot
pruning needs no download. It is tokenised with the model's own tokenizer and cut into random windows,
as the Wanda / SparseGPT papers cut C4 documents."""
from __future__ import annotations

import torch

from secateur.errors import fail


def calibration_text() -> str:
    """The language reference topics joined in a fixed (sorted) order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def token_batches(tokenizer, n_samples: int = 128, seq_len: int = 128, *, batch_size: int = 8,
                  seed: int = 0) -> list[torch.Tensor]:
    """``n_samples`` random windows of ``seq_len`` tokens of the built-in text, as LongTensor batches
    ``[batch_size, seq_len]`` (the last batch may be smaller)."""
    for name, v in (("n_samples", n_samples), ("seq_len", seq_len), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise fail(f"{name} must be a positive integer", value=v)
    if tokenizer is None:
        raise fail("built-in calibration text needs the model's tokenizer", value=None,
                   hint="Pass tokenizer=AutoTokenizer.from_pretrained(...) or calibration=<token batches>")
    ids = tokenizer(calibration_text(), add_special_tokens=False, return_attention_mask=False,
                    verbose=False)["input_ids"]
    ids = torch.as_tensor(ids, dtype=torch.long)
    if ids.numel() <= seq_len:
        raise fail("built-in text is shorter than seq_len tokens", shape=ids.shape, value=seq_len)
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len, (n_samples,), generator=gen)
    windows = ids[starts[:, None] + torch.arange(seq_len)]
    return list(windows.split(batch_size))
