"""`generate`'s beam search (transformers' vectorised `_beam_search`, deterministic), one step per `step`.

Tensors are [batch, beams, ...]. Each step keeps the top `2 * beams` continuations (more with several
end-of-sequence ids) so that `beams` of them can go on even if the best ones all end; continuations
that end compete, with the length penalty applied, for the `beams` finished slots. The arithmetic and
tie-breaking follow transformers step for step, so the chosen tokens are the same.
"""

from __future__ import annotations

import torch
from torch import nn

from ectrans.models.generation import DecoderInputs, DecoderModel, SearchPlan, as_ids

_FAR_BELOW = -1.0e9  # transformers' score for "cannot be chosen"


class BeamSearch:
    """One batch's beam search; every tensor of its state is an attribute, nothing lives elsewhere."""

    def __init__(self, plan: SearchPlan, inputs: DecoderInputs, batch_size: int) -> None:
        self.plan = plan
        self.inputs = inputs
        beams, device = plan.num_beams, inputs.encoder_mask.device
        self.batch_size = batch_size
        self.cur_len = 1  # the decoder start token
        self.keep = max(2, 1 + plan.eos.shape[0]) * beams
        self.top_beams_mask = torch.cat(
            (torch.ones(beams, dtype=torch.bool), torch.zeros(self.keep - beams, dtype=torch.bool))
        ).to(device)
        # `generate` fills unused positions with the pad id, or the first eos id when the pad id is 0.
        fill = plan.pad_token_id or int(plan.eos[0])
        self.running = torch.full((batch_size, beams, plan.max_length), fill, dtype=torch.long, device=device)
        self.running[:, :, 0] = plan.start_token_id
        self.sequences = self.running.clone()
        # Only the first beam starts live, so the first step does not pick the same token N times.
        self.running_scores = torch.zeros((batch_size, beams), dtype=torch.float, device=device)
        self.running_scores[:, 1:] = _FAR_BELOW
        self.scores = torch.full((batch_size, beams), _FAR_BELOW, dtype=torch.float, device=device)
        self.is_finished = torch.zeros((batch_size, beams), dtype=torch.bool, device=device)
        self.can_improve = torch.ones((batch_size, 1), dtype=torch.bool, device=device)
        steps = plan.max_length - 1
        self.running_indices = torch.full((batch_size, beams, steps), -1, dtype=torch.int32, device=device)
        self.indices = self.running_indices.clone()
        self.finished = False

    @property
    def new_tokens(self) -> int:
        return self.cur_len - 1

    def step(self, model: DecoderModel) -> None:
        batch, beams, cur_len = self.batch_size, self.plan.num_beams, self.cur_len
        flat_running = self.running[:, :, :cur_len].reshape(batch * beams, cur_len)
        logits = self.inputs.next_token_logits(model, flat_running[:, -1:])
        log_probs = self.plan.processors(as_ids(flat_running), nn.functional.log_softmax(logits, dim=-1))
        vocab = log_probs.shape[-1]
        log_probs = log_probs.reshape(batch, beams, vocab) + self.running_scores[:, :, None]
        top_scores, top_sequences, top_indices = self._top_continuations(log_probs.reshape(batch, beams * vocab))
        ended = self.plan.stopping(top_sequences[:, :, : cur_len + 1].reshape(batch * self.keep, -1), None)
        ended = ended.reshape(batch, self.keep)
        self._continue_best_open(top_scores, top_sequences, top_indices, ended)
        self._keep_best_finished(top_scores, top_sequences, top_indices, ended)
        self.inputs.cache.reorder_cache(as_ids(self.running_indices[..., cur_len - 1].reshape(batch * beams)))
        self.cur_len += 1
        self._update_can_improve()
        open_beams = ~(torch.all(self.is_finished) & (self.plan.early_stopping is True))
        self.finished = not bool(torch.any(self.can_improve) & open_beams & ~torch.all(ended))

    def _top_continuations(self, log_probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        vocab = log_probs.shape[-1] // self.plan.num_beams
        top_scores, top_flat = torch.topk(log_probs, k=self.keep)
        source_beams = top_flat // vocab
        top_indices = _gather_beams(self.running_indices, source_beams)
        top_sequences = _gather_beams(self.running, source_beams)
        top_sequences[:, :, self.cur_len] = top_flat % vocab
        # Beam indices are recorded batch-flat (beam + batch offset), as transformers does.
        offset = torch.arange(self.batch_size, device=top_flat.device).view(-1, 1) * self.plan.num_beams
        top_indices[:, :, self.cur_len - 1] = source_beams + offset
        return top_scores, top_sequences, top_indices

    def _continue_best_open(
        self, top_scores: torch.Tensor, top_sequences: torch.Tensor, top_indices: torch.Tensor, ended: torch.Tensor
    ) -> None:
        open_scores = top_scores + ended.to(torch.float32) * _FAR_BELOW
        best = torch.topk(open_scores, k=self.plan.num_beams)[1]
        self.running = _gather_beams(top_sequences, best)
        self.running_scores = _gather_beams(open_scores, best)
        self.running_indices = _gather_beams(top_indices, best)

    def _keep_best_finished(
        self, top_scores: torch.Tensor, top_sequences: torch.Tensor, top_indices: torch.Tensor, ended: torch.Tensor
    ) -> None:
        just_finished = ended & self.top_beams_mask[None, :]
        scores = top_scores / (self.cur_len**self.plan.length_penalty)  # new tokens once this one is in
        full = torch.all(self.is_finished, dim=-1, keepdim=True) & (self.plan.early_stopping is True)
        scores += full.to(torch.float32) * _FAR_BELOW
        scores += (~self.can_improve).to(torch.float32) * _FAR_BELOW
        scores += (~just_finished) * _FAR_BELOW
        merged_scores = torch.cat((self.scores, scores), dim=1)
        best = torch.topk(merged_scores, k=self.plan.num_beams)[1]
        self.sequences = _gather_beams(torch.cat((self.sequences, top_sequences), dim=1), best)
        self.scores = _gather_beams(merged_scores, best)
        self.indices = _gather_beams(torch.cat((self.indices, top_indices), dim=1), best)
        self.is_finished = _gather_beams(torch.cat((self.is_finished, just_finished), dim=1), best)

    def _update_can_improve(self) -> None:
        """Can the best open beam still beat the worst finished one (transformers' early-stop heuristic)?"""
        if self.plan.early_stopping == "never" and self.plan.length_penalty > 0.0:
            best_length = self.plan.max_length - 1
        else:
            best_length = self.cur_len - 1
        best_open = self.running_scores[:, :1] / (best_length**self.plan.length_penalty)
        worst_finished = torch.where(self.is_finished, torch.min(self.scores, dim=1, keepdim=True)[0], _FAR_BELOW)
        self.can_improve = self.can_improve & torch.any(best_open > worst_finished, dim=-1, keepdim=True)

    def token_ids(self) -> list[list[int]]:
        best = self.sequences[:, 0].tolist()
        lengths = (self.indices[:, 0] >= 0).sum(dim=1).tolist()  # tokens each best hypothesis generated
        return [row[1 : 1 + length] for row, length in zip(best, lengths, strict=True)]

    def tensors(self) -> list[torch.Tensor]:
        own = [self.running, self.sequences, self.running_scores, self.scores, self.running_indices, self.indices]
        return [*own, *self.inputs.tensors()]


def _gather_beams(tensor: torch.Tensor, beam_indices: torch.Tensor) -> torch.Tensor:
    while beam_indices.dim() < tensor.dim():
        beam_indices = beam_indices.unsqueeze(-1)
    return torch.take_along_dim(tensor, beam_indices, dim=1)
