"""Chain mode: one draft token per step, verified by transformers' own assisted-decoding loop.

`SpecVLMChainCandidateGenerator` is a transformers `CandidateGenerator`. The stock loop runs the target
(its first forward is the prefill, for which no candidates are proposed); `FeatureTap` records the
target's features of every forward; each `get_candidates` call feeds the draft the true features of the
tokens accepted since the last call, then drafts `chain_length` tokens one by one (greedy, or sampled from
the draft's processed distribution so that transformers' speculative sampling stays exact).

Candidates stop before the first token on which the stopping criteria fire (EOS, stop strings, ...): the
target then produces that token itself as the round's last, and generation ends exactly where plain
decoding would, whatever transformers release runs the loop.
"""

from __future__ import annotations

import torch
from transformers.generation.candidate_generator import CandidateGenerator

from transformers import DynamicCache

from .draft_runner import DraftRunner, prompt_pairs
from .kv_cache import GrowingWindow
from .request_checks import prefix_positions
from .stats import PhaseClock, SpecVLMStats
from .target import FeatureTap
from .tensor_parallel import RankAgreement


class SpecVLMChainCandidateGenerator(CandidateGenerator):
    """Drafts a chain of tokens with a SpecVLM draft for transformers' assisted-decoding loop.

    Args:
        draft: a bound `SpecVLMDraftModel`.
        adapter: the target's `TargetAdapter` (image token and visual layouts).
        tap: the active `FeatureTap` on the target.
        input_ids: `(1, n)` the prompt.
        model_kwargs: `generate`'s model kwargs (for the prompt's attention mask).
        generation_config: the target's generation config (`do_sample`, `max_length`).
        logits_processor: the target's logits processors, applied to the draft's logits when sampling.
        stopping_criteria: the target's stopping criteria (candidates end before the first stop).
    """

    def __init__(
        self,
        draft,
        adapter,
        tap: FeatureTap,
        input_ids,
        model_kwargs,
        generation_config,
        logits_processor,
        stopping_criteria,
    ):
        self.adapter = adapter
        self.draft = draft
        self.tap = tap
        self.generation_config = generation_config
        self.logits_processor = logits_processor
        self.stopping_criteria = stopping_criteria
        self.do_sample = bool(generation_config.do_sample)
        self.prompt_length = input_ids.shape[1]
        self.prompt_ids = input_ids
        self.model_kwargs = model_kwargs
        self.prompt_mask, self.prompt_positions = prefix_positions(input_ids, model_kwargs)
        self.prompt_embeds = None
        self.fed = 0  # sequence positions whose pairs the draft has read
        self.runner = DraftRunner(
            draft, GrowingWindow(DynamicCache(config=draft.config.text_config), self.prompt_mask.new_zeros(0))
        )
        self.stats = draft.stats = SpecVLMStats(mode="chain", prompt_tokens=self.prompt_length)
        self.clock = PhaseClock(input_ids.device)
        self.verified_once = False
        self.input_length: int | None = None  # of the sequence `get_candidates` last drafted from
        self.agreement = RankAgreement.for_target(adapter.model, "chain")  # on a tensor-parallel target

    def _agree(self, input_ids: torch.Tensor, candidates: torch.Tensor) -> None:
        """On a tensor-parallel target, checks that every rank holds the same sequence and candidates before
        the target verifies them (ranks with different candidates would feed its collectives different shapes)."""
        if self.agreement is not None:
            self.agreement.add(input_ids[0, self.agreement.length :].tolist())
            self.agreement.check(pending=candidates[0, input_ids.shape[1] :].tolist())

    def _position(self, index: int) -> int:
        """Position id of sequence index `index`."""
        if index < self.prompt_length:
            return int(self.prompt_positions[index])
        return int(self.prompt_positions[-1]) + index - self.prompt_length + 1

    def _catch_up(self, input_ids: torch.Tensor):
        """Feeds the draft the target's features of every token verified since the last call."""
        n = input_ids.shape[1]
        count = n - 1 - self.fed  # pairs (x_{t+1}, f_t) for t = fed .. n-2
        features = self.tap.last_hidden_state[:, :count]
        if self.fed == 0:  # the prompt, straight after the prefill: compressed image, if any
            pairs = prompt_pairs(
                self.adapter,
                self.draft,
                self.prompt_ids,
                self.prompt_embeds,
                features,
                input_ids[:, n - 1 : n],
                self.prompt_mask,
                self.prompt_positions,
                self.model_kwargs,
            )
            hidden, log_probs, info = self.runner.prefill(pairs)
            self.stats.visual_branch = info["branch"]
            self.stats.draft_visual_tokens = info["draft_visual_tokens"]
            self.stats.target_visual_tokens = info["target_visual_tokens"]
        else:
            positions = torch.tensor([self._position(i) for i in range(self.fed, n - 1)], device=input_ids.device)
            hidden, log_probs = self.runner.append(
                self.draft.embed(input_ids[:, self.fed + 1 : n]), features, positions
            )
            hidden, log_probs = hidden[-1], log_probs[-1]
        self.fed = n - 1
        return hidden, log_probs

    def _choose(self, sequence: torch.Tensor, log_probs: torch.Tensor) -> tuple[int | None, torch.Tensor | None]:
        """The next drafted token (None: none can be proposed) and, when sampling, the processed scores it was drawn
        from, which transformers' speculative sampling reads as the draft's distribution."""
        log_probs = self.draft.full_vocab(log_probs)  # a reduced vocabulary's columns back to token ids
        if not self.do_sample:
            return int(log_probs.argmax()), None
        scores = self.logits_processor(sequence, log_probs[None].clone())[0]
        # a processor adding to a column the draft scores -inf (outside a reduced vocabulary) can make it NaN, e.g. the
        # length penalty on EOS: such a column is one the draft does not propose (exact: q is what is sampled from)
        scores = scores.masked_fill(torch.isnan(scores), -float("inf"))
        if not bool(torch.isfinite(scores).any()):
            return None, None
        return int(torch.multinomial(torch.softmax(scores, dim=-1), 1)), scores

    @torch.no_grad()
    def get_candidates(self, input_ids: torch.LongTensor, **kwargs):
        """Returns `(1, n + c)` ids with `c` drafted tokens appended, and their draft scores when sampling."""
        self.clock.lap("verify" if self.verified_once else "setup")  # transformers' bookkeeping since the last round
        self.input_length = input_ids.shape[1]  # a candidate sequence this long has no candidates
        if self.prompt_embeds is None:
            if self.tap.inputs_embeds is None:
                self._agree(input_ids, input_ids)
                return input_ids, None  # before the prefill: let the target produce the first token
            self.prompt_embeds = self.tap.inputs_embeds[:, : self.prompt_length]
        n = input_ids.shape[1]
        budget = min(self.draft.config.chain_length, self.generation_config.max_length - n - 1)
        if budget <= 0:
            self._agree(input_ids, input_ids)
            return input_ids, None

        hidden, log_probs = self._catch_up(input_ids)
        step = self.runner.tree_step_fn(self._position(n - 1))
        sequence = input_ids
        draft_scores = []
        for level in range(1, budget + 1):
            token, scores = self._choose(sequence, log_probs)
            if token is None:
                break
            extended = torch.cat([sequence, sequence.new_tensor([[token]])], dim=1)
            if bool(self.stopping_criteria(extended, None).any()):
                break  # leave the stopping token to the target, so the loop ends right after it
            sequence = extended
            if scores is not None:
                draft_scores.append(scores)
            if level == budget:
                break
            ancestors = torch.ones(1, level, dtype=torch.bool, device=input_ids.device)
            hidden, log_probs = step(sequence[0, -1:], hidden[None], level, ancestors)
            hidden, log_probs = hidden[0], log_probs[0]
        self.runner.rewind()
        self.clock.lap("draft")
        candidate_logits = torch.stack(draft_scores)[None] if draft_scores else None
        self._agree(input_ids, sequence)
        return sequence, candidate_logits

    @property
    def num_drafting_tokens(self) -> int:
        """Most tokens drafted per round (transformers 5.25+ sizes the cache's recorded past with it)."""
        return int(self.draft.config.chain_length)

    def update_candidate_strategy(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, num_matches: int):
        """Records the round in `draft.stats` (the first call follows the prefill)."""
        if not self.verified_once:
            self.verified_once = True
            self.clock.lap("prefill")
            return
        self.clock.lap("verify")
        self.stats.rounds += 1
        self.stats.accepted_per_round.append(int(num_matches) + 1)

    def finish(self, sequences: torch.Tensor) -> None:
        """Completes `draft.stats` after the loop (`sequences`: the returned ids)."""
        self.stats.new_tokens = sequences.shape[1] - self.prompt_length
        self.clock.fill(self.stats)
