"""The SwAV swapped-prediction loss, with the optional queue of past embeddings."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from swav.losses.objective import Objective, StepOutputs
from swav.losses.sinkhorn import hard_assignment, sinkhorn


class SwAVLoss(Objective):
    """Predict the codes of each assignment crop from every other crop, as the official code does.

    ``forward(scores, iteration, embeddings, prototypes)`` takes prototype scores
    ``[num_crops * B, K]`` stacked crop-major (all images' crop 0, then crop 1, ...), or a list of
    them, one per prototype set; the loss is averaged over other crops, assignment crops and sets.

    ``temp_hard_assignment_iters``: one-hot (argmax) codes for that many first iterations; -1
    means for the whole run (the hard-assignment ablation, paper table 9).

    The queue (``queue_length`` rows per assignment crop, on this rank) stores past embeddings;
    from ``queue_start_iter`` on, its scores against the current prototypes are prepended to
    the batch before Sinkhorn, which helps when the batch is much smaller than the number of
    prototypes (the paper uses 3840 rows at batch 256). It lives in buffers, so in the checkpoint.
    """

    def __init__(
        self,
        num_crops: int,
        crops_for_assign: Sequence[int] = (0, 1),
        temperature: float = 0.1,
        epsilon: float = 0.05,
        num_iters: int = 3,
        use_double_precision: bool = False,
        temp_hard_assignment_iters: int = 0,
        queue_length: int = 0,
        queue_start_iter: int = 0,
        embedding_dim: int = 128,
        output_dir: str = "",
        num_prototypes: Sequence[int] = (),
    ) -> None:
        super().__init__()
        crops_for_assign = tuple(int(c) for c in crops_for_assign)
        if num_crops < 2:
            raise ValueError(
                f"num_crops={num_crops}: the swapped prediction needs at least 2 crops"
            )
        if not crops_for_assign or len(set(crops_for_assign)) != len(crops_for_assign):
            raise ValueError(
                f"crops_for_assign={crops_for_assign} must be non-empty and without repeats"
            )
        if not all(0 <= c < num_crops for c in crops_for_assign):
            raise ValueError(
                f"crops_for_assign={crops_for_assign} must index crops 0..{num_crops - 1}"
            )
        if temperature <= 0 or epsilon <= 0:
            raise ValueError(f"temperature={temperature} and epsilon={epsilon} must be positive")
        if queue_length < 0:
            raise ValueError(f"queue_length={queue_length} must be >= 0")
        self.num_crops = int(num_crops)
        self.crops_for_assign = crops_for_assign
        self.temperature = float(temperature)
        self.epsilon = float(epsilon)
        self.num_iters = int(num_iters)
        self.use_double_precision = bool(use_double_precision)
        self.temp_hard_assignment_iters = int(temp_hard_assignment_iters)
        self.queue_length = int(queue_length)
        self.queue_start_iter = int(queue_start_iter)
        self.output_dir = output_dir
        self.num_prototypes = tuple(int(k) for k in num_prototypes)
        # Newest rows first; only the first `queue_filled` rows hold real embeddings.
        self.register_buffer(
            "queue", torch.zeros(len(crops_for_assign), self.queue_length, embedding_dim)
        )
        self.register_buffer("queue_filled", torch.zeros((), dtype=torch.long))
        # Host-side copy of queue_filled, so slicing the queue needs no device sync each step.
        self._filled: int | None = 0

    def extra_repr(self) -> str:
        return (
            f"num_crops={self.num_crops}, crops_for_assign={self.crops_for_assign}, "
            f"temperature={self.temperature}, epsilon={self.epsilon}, num_iters={self.num_iters}, "
            f"queue_length={self.queue_length}, queue_start_iter={self.queue_start_iter}"
        )

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._filled = None  # re-read from the loaded buffer on next use

    @property
    def num_filled(self) -> int:
        """Queue rows (per assignment crop) that hold real embeddings."""
        if self._filled is None:
            self._filled = int(self.queue_filled.item())
        return self._filled

    def step(self, outputs: StepOutputs, iteration: int) -> Tensor:
        # The codes never carry gradient; the queue stores embeddings, not their graph.
        return self(outputs.scores, iteration=iteration, embeddings=outputs.embeddings.detach(),
                    prototypes=outputs.prototypes, check_finite=outputs.check_finite)

    def collapse_level(self) -> float | None:
        # Uniform codes and predictions give ln K for a set of K prototypes; the loss averages
        # the sets, so with several the level is the mean of their ln K.
        if not self.num_prototypes:
            return None
        return sum(math.log(k) for k in self.num_prototypes) / len(self.num_prototypes)

    def queue_active(self, iteration: int) -> bool:
        return self.queue_length > 0 and iteration >= self.queue_start_iter

    def forward(
        self,
        scores: Tensor | Sequence[Tensor],
        iteration: int = 0,
        embeddings: Tensor | None = None,
        prototypes: Sequence[Tensor] | None = None,
        check_finite: bool = True,
    ) -> Tensor:
        """Scalar float32 loss. ``embeddings`` ``[num_crops * B, D]`` (crop-major, like the scores)
        and ``prototypes`` (one ``[K_j, D]`` matrix per score set) are needed only by the queue.
        ``check_finite``: stop at a non-finite loss here, saving the scores and codes (a host sync)."""
        score_sets = [scores] if isinstance(scores, Tensor) else list(scores)
        batch = self._batch_size(score_sets)
        use_queue = self.queue_active(iteration)
        if use_queue:
            self._check_queue_inputs(score_sets, embeddings, prototypes)

        codes = [
            self._codes(s, batch, iteration, prototypes[j] if use_queue else None)
            for j, s in enumerate(score_sets)
        ]
        if use_queue:
            self._push(embeddings, batch)  # after the codes: the batch is not its own queue
        loss = sum(
            self._swapped_prediction(s, q, batch) for s, q in zip(score_sets, codes, strict=True)
        )
        loss = loss / len(score_sets)
        # One host sync per step; the price of stopping at the first bad iteration with its inputs.
        if check_finite and not bool(torch.isfinite(loss)):
            self._report_non_finite(loss, score_sets, codes, iteration)
        return loss

    def _batch_size(self, score_sets: list[Tensor]) -> int:
        if not score_sets:
            raise ValueError("SwAVLoss got an empty list of scores")
        rows = score_sets[0].shape[0]
        for s in score_sets:
            if s.ndim != 2 or s.shape[0] != rows:
                raise ValueError(
                    f"every score tensor must be [num_crops * B, K] with the same rows; got "
                    f"{[tuple(t.shape) for t in score_sets]}"
                )
        if rows == 0 or rows % self.num_crops:
            raise ValueError(
                f"{rows} score rows are not a positive multiple of num_crops={self.num_crops}"
            )
        return rows // self.num_crops

    def _check_queue_inputs(self, score_sets, embeddings, prototypes) -> None:
        if embeddings is None or prototypes is None:
            raise ValueError(
                "the SwAV queue is active (queue_length > 0 and iteration >= queue_start_iter): "
                "pass embeddings= and prototypes= to the loss"
            )
        if len(prototypes) != len(score_sets):
            raise ValueError(
                f"{len(prototypes)} prototype matrices for {len(score_sets)} score sets"
            )
        rows, dim = embeddings.shape[0], self.queue.shape[2]
        if embeddings.ndim != 2 or rows != score_sets[0].shape[0] or embeddings.shape[1] != dim:
            raise ValueError(
                f"embeddings must be [num_crops * B, {dim}] like the scores, got {tuple(embeddings.shape)}"
            )

    @torch.no_grad()
    def _codes(
        self, scores: Tensor, batch: int, iteration: int, prototypes: Tensor | None
    ) -> list[Tensor]:
        """Codes [B, K] for each assignment crop, float32, without gradient."""
        filled = self.num_filled if prototypes is not None else 0
        codes = []
        with torch.autocast(device_type=scores.device.type, enabled=False):
            for i, crop in enumerate(self.crops_for_assign):
                out = scores[crop * batch : (crop + 1) * batch].detach().float()
                if filled:
                    # The queue's scores recomputed with today's prototypes (stored ones would be
                    # stale), written straight into one buffer that Sinkhorn then works in: at
                    # 100,000 prototypes each extra [filled, K] copy costs about a second on a CPU.
                    buffer = out.new_empty(filled + batch, out.shape[1])
                    torch.mm(self.queue[i, :filled], prototypes.detach().float().t(), out=buffer[:filled])
                    buffer[filled:] = out
                    out = buffer
                q = sinkhorn(out, self.epsilon, self.num_iters, self.use_double_precision,
                             overwrite=bool(filled))[-batch:]
                if self.temp_hard_assignment_iters < 0 or iteration < self.temp_hard_assignment_iters:
                    q = hard_assignment(q)
                codes.append(q.float())
        return codes

    @torch.no_grad()
    def _push(self, embeddings: Tensor, batch: int) -> None:
        """Put this batch's assignment-crop embeddings at the front, dropping the oldest rows."""
        n = min(batch, self.queue_length)
        new = torch.stack([embeddings[c * batch : c * batch + n] for c in self.crops_for_assign])
        if n < self.queue_length:
            self.queue[:, n:] = self.queue[:, :-n].clone()
        self.queue[:, :n] = new.detach().to(self.queue.dtype)
        self._filled = min(self.queue_length, self.num_filled + batch)
        self.queue_filled.fill_(self._filled)

    def _swapped_prediction(self, scores: Tensor, codes: list[Tensor], batch: int) -> Tensor:
        # float32 log-softmax even under bf16 autocast: low-precision logits bias the loss.
        with torch.autocast(device_type=scores.device.type, enabled=False):
            log_p = F.log_softmax(scores.float() / self.temperature, dim=1)
        log_p = log_p.view(self.num_crops, batch, -1)
        total = 0.0
        for crop, q in zip(self.crops_for_assign, codes, strict=True):
            per_view = -(q.unsqueeze(0) * log_p).sum(dim=2).mean(dim=1)  # [num_crops]
            # The mean over the other crops, without a Python-list index (a host-to-device copy per crop on a GPU).
            total = total + (per_view.sum() - per_view[crop]) / (self.num_crops - 1)
        return total / len(self.crops_for_assign)

    def _report_non_finite(self, loss: Tensor, score_sets, codes, iteration: int) -> None:
        saved = ""
        if self.output_dir:
            distributed = dist.is_available() and dist.is_initialized()
            suffix = f"_rank{dist.get_rank()}" if distributed else ""
            path = Path(self.output_dir) / f"nan_dump_iter{iteration}{suffix}.pt"
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(
                {
                    "iteration": iteration,
                    "loss": loss.detach().cpu(),
                    "scores": [s.detach().cpu() for s in score_sets],
                    "codes": [[q.cpu() for q in per_set] for per_set in codes],
                },
                path,
            )
            saved = f" Scores and codes saved to {path}."
        raise FloatingPointError(
            f"SwAV loss is {loss.item()} at iteration {iteration}.{saved} Try: a lower learning rate "
            "(or a longer warm-up); if the codes overflowed (a small epsilon does that), "
            "use_double_precision=true or a larger epsilon; check the data for NaN/inf images; "
            "disable AMP (config.MODEL.AMP_PARAMS.USE_AMP=false)."
        )
