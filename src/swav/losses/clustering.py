"""What DeepCluster-v2 and SeLa-v2 share (appendix D): a memory bank of last epoch's embeddings,
per-epoch pseudo-labels over the whole dataset, and a classification loss against them.

The two methods differ only in how the assignment phase turns the bank into labels (k-means or
Sinkhorn) and in what the crops are scored against (the k-means centroids or learned prototypes):
subclasses implement ``assign`` and ``head_scores``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from swav.losses.collectives import gather_rows
from swav.losses.objective import EpochContext, Objective, StepOutputs, check_finite_loss

logger = logging.getLogger("swav")


class PseudoLabelObjective(Objective):
    """Cross-entropy of every crop's scores / ``temperature`` against its image's pseudo-label,
    mean over the assigned crops of each head, then over heads.

    Memory bank (this rank's state, in buffers, so in the checkpoint): for the images this rank
    trains on in the epoch, their index (``bank_indices [N]``) and the L2-normalised embeddings of
    the ``crops_for_mb`` crops (``bank [len(crops_for_mb), N, D]``). Row ``r`` is the r-th image
    of this rank's epoch: a step writes its batch at rows ``(iteration mod steps per epoch) * B``
    on, so after an epoch the bank holds that epoch's embeddings, which the next epoch's
    assignment phase uses instead of a pass over the data (appendix D.2). When there is no bank
    (the first epoch, or a resume without one) ``start_epoch`` fills it with one no-grad pass.
    Its size is this rank's images per epoch, known once the data is: the buffers start empty and
    take the saved size when a checkpoint is loaded.

    Labels: head ``h`` is labelled from the bank of crop ``crops_for_mb[h % len(crops_for_mb)]``
    (the heads alternate over the crops). Each rank keeps its own rows' labels (``labels [H, N]``
    for the images ``labelled_indices``, with ``labelled_epoch``), so a run resumed inside an
    epoch trains on the labels it had; the lookup table over the whole dataset (images of other
    ranks included) is gathered from them and not saved. An image without a label (not in any
    rank's bank, e.g. left out by the last partial batch) is ignored; a batch with none gives 0.
    """

    # Buffers whose length is the number of images in this rank's bank (the last dimension for
    # `labels`, the row dimension for the others).
    _SIZED_BY_DATA = {"bank": 1, "bank_indices": 0, "labelled_indices": 0, "labels": 1}

    def __init__(
        self,
        num_crops: int,
        num_clusters: Sequence[int],
        crops_for_mb: Sequence[int] = (0,),
        embedding_dim: int = 128,
        temperature: float = 0.1,
    ) -> None:
        super().__init__()
        num_clusters = tuple(int(k) for k in num_clusters)
        crops_for_mb = tuple(int(c) for c in crops_for_mb)
        if num_crops < 1:
            raise ValueError(f"num_crops={num_crops} must be >= 1")
        if not num_clusters or min(num_clusters) < 1:
            raise ValueError(f"num_clusters={list(num_clusters)} needs one or more heads of >= 1 clusters")
        if not crops_for_mb or len(set(crops_for_mb)) != len(crops_for_mb) or not all(
            0 <= c < num_crops for c in crops_for_mb
        ):
            raise ValueError(
                f"memory_params.crops_for_mb={list(crops_for_mb)} must be different crop indices below num_crops={num_crops}"
            )
        if temperature <= 0:
            raise ValueError(f"temperature={temperature} must be positive")
        self.num_crops = int(num_crops)
        self.num_clusters = num_clusters
        self.crops_for_mb = crops_for_mb
        self.embedding_dim = int(embedding_dim)
        self.temperature = float(temperature)
        heads = len(num_clusters)
        self.register_buffer("bank", torch.zeros(len(crops_for_mb), 0, self.embedding_dim))
        self.register_buffer("bank_indices", torch.zeros(0, dtype=torch.long))
        self.register_buffer("labelled_indices", torch.zeros(0, dtype=torch.long))
        self.register_buffer("labels", torch.zeros(heads, 0, dtype=torch.long))
        self.register_buffer("labelled_epoch", torch.full((), -1, dtype=torch.long))
        # dataset index -> label per head (-1: none); the same on every rank, so not saved.
        self.register_buffer("table", torch.zeros(heads, 0, dtype=torch.long), persistent=False)

    def extra_repr(self) -> str:
        return (
            f"num_crops={self.num_crops}, num_clusters={list(self.num_clusters)}, "
            f"crops_for_mb={list(self.crops_for_mb)}, temperature={self.temperature}"
        )

    # ------------------------------------------------------------------ what subclasses define

    def assign(self, epoch: int, context: EpochContext | None) -> Tensor:
        """Labels ``[H, N]`` (long, in ``[0, K_h)``) for this rank's bank rows, computed over the
        banks of all ranks."""
        raise NotImplementedError

    def head_scores(self, outputs: StepOutputs) -> list[Tensor]:
        """Per head, the scores ``[num_crops * B, K_h]`` of the step's crops, with gradient."""
        raise NotImplementedError

    # ------------------------------------------------------------------ the epoch's assignment phase

    def start_epoch(self, epoch: int, context: EpochContext | None = None) -> None:
        if int(self.labelled_epoch) == epoch:
            # Resumed inside an epoch: its labels came with the checkpoint (the bank has since
            # been partly overwritten, so they could not be computed again).
            self._publish_labels()
            return
        if self.bank_indices.numel() == 0:
            self._fill_bank(epoch, context)
        start = time.perf_counter()
        labels = self.assign(epoch, context)
        self.labels = labels.to(self.labels)
        self.labelled_indices = self.bank_indices.clone()
        self.labelled_epoch.fill_(epoch)
        self._publish_labels()
        used = [int(torch.unique(row[row >= 0]).numel()) for row in self.table]
        logger.info(
            "epoch %d assignment: %s clusters hold images (of %s), %d images labelled, %.1f s",
            epoch, used, list(self.num_clusters), int((self.table[0] >= 0).sum()), time.perf_counter() - start,
        )

    @torch.no_grad()
    def _fill_bank(self, epoch: int, context: EpochContext | None) -> None:
        if context is None:
            raise RuntimeError(
                f"{type(self).__name__} has no memory bank yet: start_epoch needs the EpochContext "
                "to fill it with a pass over this rank's images"
            )
        start = time.perf_counter()
        indices, embeddings = context.embed(self.crops_for_mb)
        expected = (len(self.crops_for_mb), indices.numel(), self.embedding_dim)
        if tuple(embeddings.shape) != expected:
            raise ValueError(f"the memory-bank pass gave embeddings {tuple(embeddings.shape)}, expected {expected}")
        self.bank = embeddings.detach().to(self.bank)
        self.bank_indices = indices.to(self.bank_indices)
        logger.info("epoch %d: memory bank filled with %d images in %.1f s (one pass without gradient)",
                    epoch, indices.numel(), time.perf_counter() - start)

    @torch.no_grad()
    def _publish_labels(self) -> None:
        """The lookup table over the dataset, from every rank's labelled rows."""
        indices = gather_rows(self.labelled_indices)
        labels = gather_rows(self.labels.t().contiguous()).t()
        size = int(indices.max()) + 1 if indices.numel() else 0
        table = torch.full((len(self.num_clusters), size), -1, dtype=torch.long, device=self.labels.device)
        table[:, indices] = labels
        self.table = table

    # ------------------------------------------------------------------ the step

    def step(self, outputs: StepOutputs, iteration: int) -> Tensor:
        if outputs.indices is None:
            raise ValueError(f"{type(self).__name__} needs the batch's dataset indices (StepOutputs.indices)")
        indices = outputs.indices.to(self.bank_indices.device)
        self._remember(outputs.embeddings.detach(), indices, iteration)
        loss = self.classification_loss(self.head_scores(outputs), indices)
        return check_finite_loss(loss, type(self).__name__, iteration, outputs.check_finite)

    @torch.no_grad()
    def _remember(self, embeddings: Tensor, indices: Tensor, iteration: int) -> None:
        """Write the batch's memory-bank crops at its rows of this rank's epoch."""
        batch, rows = indices.numel(), self.bank.shape[1]
        if embeddings.shape != (self.num_crops * batch, self.embedding_dim):
            raise ValueError(
                f"embeddings must be [num_crops * B, D] = [{self.num_crops * batch}, {self.embedding_dim}], "
                f"got {tuple(embeddings.shape)}"
            )
        if rows == 0 or rows % batch:
            raise RuntimeError(
                f"the memory bank holds {rows} rows, not whole batches of {batch}: it was filled with another "
                "batch size or number of images (a resume with RESUME_CHANGED?); start the run over"
            )
        start = (iteration % (rows // batch)) * batch
        crops = embeddings.view(self.num_crops, batch, self.embedding_dim)
        self.bank[:, start : start + batch] = crops[list(self.crops_for_mb)].to(self.bank.dtype)
        self.bank_indices[start : start + batch] = indices

    def targets(self, indices: Tensor) -> Tensor:
        """``[H, B]`` pseudo-labels of the images ``indices``; -1 for an image without one."""
        size = self.table.shape[1]
        if size == 0:
            return torch.full((len(self.num_clusters), indices.numel()), -1, dtype=torch.long, device=indices.device)
        # torch.where, not a boolean index: on a GPU that would wait for the device (nonzero) every step.
        looked_up = self.table[:, indices.clamp(max=size - 1)].to(indices.device)
        return torch.where(indices < size, looked_up, -1)

    def classification_loss(self, scores: list[Tensor], indices: Tensor) -> Tensor:
        """Mean over heads of the mean cross-entropy over the crops of labelled images."""
        if len(scores) != len(self.num_clusters):
            raise ValueError(f"{len(scores)} score sets for {len(self.num_clusters)} heads")
        total = scores[0].new_zeros(())
        for s, t in zip(scores, self.targets(indices), strict=True):
            t = t.repeat(self.num_crops)  # crop-major rows: every crop of an image has its label
            with torch.autocast(device_type=s.device.type, enabled=False):
                summed = F.cross_entropy(s.float() / self.temperature, t, ignore_index=-1, reduction="sum")
            # The sum over no labelled row is 0 (with a zero gradient); a mean would be 0/0.
            total = total + summed / (t >= 0).sum().clamp(min=1)
        return total / len(scores)

    def collapse_level(self) -> float | None:
        # Uniform predictions give ln K for a head of K clusters; the loss averages the heads.
        return sum(math.log(k) for k in self.num_clusters) / len(self.num_clusters)

    # ------------------------------------------------------------------ checkpoints

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # The saved bank's size is the run's images per rank: take it before the values are copied
        # (a saved shape that differs elsewhere still fails the strict load).
        for name, dim in self._SIZED_BY_DATA.items():
            saved = state_dict.get(prefix + name)
            current = getattr(self, name)
            if saved is None or saved.ndim != current.ndim:
                continue
            shape = list(current.shape)
            shape[dim] = saved.shape[dim]
            setattr(self, name, current.new_zeros(shape))
        self.table = self.table.new_zeros(len(self.num_clusters), 0)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
