"""Training sequences for QAD: tokenized text in a deterministic order, and the budget of each step."""

from __future__ import annotations

import hashlib
import logging

import numpy as np
import torch

from elastic_cli.elastic.source import ElasticSource
from elastic_cli.errors import UsageError
from elastic_cli.qad.options import QADOptions

log = logging.getLogger(__name__)


class TokenStream:
    """Training sequences in a deterministic shuffled order, epoch after epoch.

    Global sample ``i`` is row ``permutation(e)[i % rows]`` of epoch ``e = i // rows``, where the
    permutation of epoch ``e`` is drawn from a generator seeded by ``(seed, e)``.
    """

    def __init__(self, token_ids: torch.Tensor, seed: int) -> None:
        if token_ids.dim() != 2 or token_ids.shape[0] < 1:
            raise UsageError(
                f"training token ids must be [sequences, seq_len] with at least one sequence, "
                f"got shape {list(token_ids.shape)}",
                "pass a 2-D tensor of token ids",
            )
        self.token_ids = token_ids.to(torch.int32)  # half the memory of int64; ids < 2**31
        self.seed = seed
        self._epoch = -1
        self._order = np.empty(0, dtype=np.int64)

    @property
    def rows(self) -> int:
        return self.token_ids.shape[0]

    def digest(self) -> str:
        """Return the sha256 of the token ids, to recognise the same data on resume."""
        return hashlib.sha256(self.token_ids.numpy().tobytes()).hexdigest()

    def samples(self, start: int, count: int) -> torch.Tensor:
        """Return global samples ``start .. start + count - 1`` as int64 ``[count, seq_len]``."""
        rows = []
        for index in range(start, start + count):
            epoch, position = divmod(index, self.rows)
            if epoch != self._epoch:
                self._order = np.random.default_rng([self.seed, 0, epoch]).permutation(self.rows)
                self._epoch = epoch
            rows.append(int(self._order[position]))
        return self.token_ids[torch.tensor(rows, dtype=torch.long)].to(torch.int64)


def sample_budget(step: int, seed: int, probabilities: tuple[float, ...]) -> int:
    """Return the budget index (0 for the largest) of step ``step``, counted from 1.

    The index is drawn from a generator seeded by ``(seed, step)``, so it depends on nothing else.
    """
    return int(np.random.default_rng([seed, 1, step]).choice(len(probabilities), p=np.asarray(probabilities)))


def load_training_tokens(source: ElasticSource, options: QADOptions) -> TokenStream:
    """Tokenize the training text with the checkpoint's tokenizer into ``seq_len`` windows."""
    from elastic_cli.quantize.calib_data import load_texts, load_tokenizer, tokenize

    tokenizer = load_tokenizer(source.checkpoint.root)
    texts = load_texts(options.data, tokenizer)
    requested = options.total_steps() * options.batch_size
    token_ids = tokenize(texts, tokenizer, requested, options.seq_len)
    if token_ids.shape[0] < requested:
        log.info(
            "the training text fills %d sequence(s) of %d tokens; QAD repeats it over %.1f epochs",
            token_ids.shape[0], options.seq_len, requested / token_ids.shape[0],
        )
    return TokenStream(token_ids, options.seed)
