"""The similarity filter: skip frames that barely differ from the last processed one.

A small state holder (like ComfyUI's EasyCache holder): the last processed input, the last output, how
many frames were skipped in a row and the random source that decides a skip; :meth:`reset` clears it.
Disabled, it holds nothing and costs nothing.
"""

from __future__ import annotations

import random

import torch

from .config import SimilarityFilterConfig


class SimilarityFilter:
    """Decides per call whether the stream may skip this input and repeat its last output.

    With cosine similarity ``s`` between this input and the last processed one, a frame is skipped with
    probability ``max(0, 1 - (1 - s) / (1 - threshold))``, never more than ``max_skip`` in a row. The
    similarity is read on the host: one synchronisation per call, only when the filter is on.
    """

    def __init__(self, config: SimilarityFilterConfig, image_shape: tuple[int, ...], *, seed: int,
                 device: torch.device, dtype: torch.dtype) -> None:
        self.config = config
        self.enabled = config.enabled
        self._seed = seed
        self._previous = torch.zeros(image_shape, device=device, dtype=dtype) if self.enabled else None
        self.last_output: torch.Tensor | None = None
        self.reset()

    def reset(self) -> None:
        """Forget the last input and output; the skip decisions start over from the seed."""
        self._rng = random.Random(self._seed)
        self._skipped_in_row = 0
        self.last_output = None
        if self._previous is not None:
            self._previous.zero_()

    def should_skip(self, image: torch.Tensor) -> bool:
        """Whether to skip ``image`` (remembered as the last processed input when it is not skipped)."""
        if not self.enabled:
            return False
        if self.last_output is not None:
            cos = float(torch.nn.functional.cosine_similarity(image.float().flatten(), self._previous.float().flatten(),
                                                              dim=0))
            skip_prob = max(0.0, 1.0 - (1.0 - cos) / (1.0 - self.config.threshold))
            if self._skipped_in_row < self.config.max_skip and self._rng.random() < skip_prob:
                self._skipped_in_row += 1
                return True
        self._skipped_in_row = 0
        self._previous.copy_(image)
        return False

    def remember(self, output: torch.Tensor) -> None:
        """Keep a copy of the output handed over, to repeat it for skipped frames."""
        if not self.enabled:
            return
        if self.last_output is None:
            self.last_output = torch.empty_like(output)
        self.last_output.copy_(output)
