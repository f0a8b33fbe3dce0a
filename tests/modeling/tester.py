"""A slim model-tester mixin of our own (transformers does not ship its test mixins).

A test class sets `config_overrides` (merged over `tests.helpers.tiny.TINY`) and inherits every check below.
Flags turn off the checks a configuration cannot satisfy by design, with the reason next to the flag:
- `causal_routing`: routing of a token depends only on that token (token-choice, dropless). Capacity-limited
  routers (switch with a capacity factor, expert choice) let tokens compete, so cached decoding and batching
  with padding legitimately change the result.
- `supports_cache`: the config allows `use_cache=True` (expert choice forbids it).
"""

import pytest
import torch

from hf_moe import HfMoeConfig, HfMoeForCausalLM
from tests.helpers.tiny import TINY

BATCH, SEQ = 2, 7


class MoeModelTesterMixin:
    config_overrides: dict = {}
    causal_routing: bool = True
    supports_cache: bool = True

    # --- helpers --------------------------------------------------------------------------------------------
    def make_config(self, **extra) -> HfMoeConfig:
        return HfMoeConfig(**{**TINY, **self.config_overrides, **extra})

    def make_model(self, seed: int = 0, **extra) -> HfMoeForCausalLM:
        torch.manual_seed(seed)
        model = HfMoeForCausalLM(self.make_config(**extra)).eval()
        # Non-trivial norms and biases: the default ones/zeros would hide a wrong mapping of those tensors.
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("norm.weight"):
                    param.add_(0.1 * torch.randn_like(param))
                elif name.endswith(".bias"):
                    param.normal_(0.0, 0.1)
        return model

    def input_ids(self, batch: int = BATCH, seq: int = SEQ, seed: int = 1) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return torch.randint(3, TINY["vocab_size"], (batch, seq), generator=generator)  # no pad/bos/eos ids

    # --- checks ---------------------------------------------------------------------------------------------
    def test_output_shapes(self):
        model = self.make_model()
        config = model.config
        with torch.no_grad():
            out = model(self.input_ids(), output_router_logits=True, output_hidden_states=True)
        assert out.logits.shape == (BATCH, SEQ, config.vocab_size)
        assert len(out.hidden_states) == config.num_hidden_layers + 1
        assert all(h.shape == (BATCH, SEQ, config.hidden_size) for h in out.hidden_states)
        num_moe = len(config.moe_layers)
        assert num_moe >= 1
        assert len(out.router_logits) == len(out.router_indices) == num_moe
        slots = config.num_experts if config.router_type == "expert_choice" else config.num_experts_per_tok
        for logits, indices in zip(out.router_logits, out.router_indices):
            assert logits.shape == (BATCH * SEQ, config.num_experts)
            assert indices.shape == (BATCH * SEQ, slots)
            # Index E is the sentinel of a dropped assignment.
            assert int(indices.min()) >= 0 and int(indices.max()) <= config.num_experts
        assert out.aux_loss.dim() == 0 and torch.isfinite(out.aux_loss)
        assert out.z_loss.dim() == 0 and torch.isfinite(out.z_loss)
        # Layer kinds follow the config.
        for i, layer in enumerate(model.model.layers):
            assert hasattr(layer.mlp, "experts") == (i in config.moe_layers)

    def test_save_load_round_trip(self, tmp_path):
        from transformers import AutoModelForCausalLM

        model = self.make_model()
        model.save_pretrained(tmp_path)
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
        assert type(loaded) is HfMoeForCausalLM
        assert loaded.config.to_diff_dict() == model.config.to_diff_dict()
        ids = self.input_ids()
        with torch.no_grad():
            assert torch.equal(model(ids).logits, loaded(ids).logits)
        if model.config.tie_word_embeddings:
            assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()

    def test_generate_cache_matches_no_cache(self):
        model = self.make_model()
        ids = self.input_ids(batch=1, seq=5)
        kwargs = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
        with torch.no_grad():
            no_cache = model.generate(ids, use_cache=False, **kwargs)
            assert no_cache.shape == (1, 9)
        if not (self.supports_cache and self.causal_routing):
            # Expert choice: the run above (recomputing the sequence each step) is its only decoding mode.
            # Capacity routers: tokens compete for slots, so one-token steps legitimately route differently.
            pytest.skip("routing is not causal: cached decoding differs by design")
        with torch.no_grad():
            with_cache = model.generate(ids, use_cache=True, **kwargs)
        assert torch.equal(with_cache, no_cache)

    def test_gradients_reach_exactly_the_used_experts(self):
        model = self.make_model()
        for ids in (self.input_ids(batch=1, seq=1), self.input_ids()):
            model.zero_grad(set_to_none=True)
            out = model(ids, output_router_logits=True)
            # A loss on every logit (the LM loss of a single token would have no target).
            out.logits.square().mean().backward()
            moe_blocks = [
                layer.mlp for i, layer in enumerate(model.model.layers) if i in model.config.moe_layers
            ]
            for block, indices in zip(moe_blocks, out.router_indices):
                counts = torch.bincount(indices.reshape(-1), minlength=model.config.num_experts + 1)
                used = counts[: model.config.num_experts] > 0  # (E,)
                assert used.any()
                for grad in (block.experts.gate_up_proj.grad, block.experts.down_proj.grad):
                    assert grad is not None
                    per_expert = grad.flatten(1).abs().sum(dim=1)  # (E,)
                    assert (per_expert[used] > 0).all()
                    assert (per_expert[~used] == 0).all()
                assert block.gate.weight.grad is not None and block.gate.weight.grad.abs().sum() > 0
            if ids.numel() == 1 and model.config.router_type != "expert_choice":
                # One token, k < E slots: some expert received nothing, so the zero side was exercised.
                assert not used.all()

    def test_eager_matches_sdpa(self):
        model = self.make_model()
        ids = self.input_ids()
        mask = torch.ones_like(ids)
        if self.causal_routing:
            # A padded row exercises the mask conversion of both paths. (Fully masked padding rows differ
            # between eager and sdpa, which capacity routers would let leak into the real tokens' routing.)
            mask[0, :2] = 0
        logits = {}
        for impl in ("eager", "sdpa"):
            model.set_attn_implementation(impl)
            with torch.no_grad():
                logits[impl] = model(ids, attention_mask=mask).logits
        torch.testing.assert_close(logits["eager"][1], logits["sdpa"][1])
        torch.testing.assert_close(logits["eager"][0, 2:], logits["sdpa"][0, 2:])

    def _left_padded(self, lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rows of `input_ids()` cut to `lengths` and left-padded with id 0; returns ids, padded ids, mask."""
        ids = self.input_ids()
        mask = torch.zeros_like(ids)
        padded = torch.zeros_like(ids)
        for row, length in enumerate(lengths):
            padded[row, SEQ - length :] = ids[row, :length]
            mask[row, SEQ - length :] = 1
        return ids, padded, mask

    def test_left_padding_matches_unpadded(self):
        if not self.causal_routing:
            pytest.skip("capacity routers: padding tokens compete for capacity, by design")
        model = self.make_model()
        lengths = [4, SEQ]
        ids, padded, mask = self._left_padded(lengths)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            batched = model(padded, attention_mask=mask, position_ids=position_ids).logits
            for row, length in enumerate(lengths):
                alone = model(ids[row : row + 1, :length]).logits[0]
                torch.testing.assert_close(batched[row, SEQ - length :], alone)

    def test_batched_generate_with_left_padding_matches_single(self):
        """generate() builds the position ids and masks itself: a left-padded batch decodes as each row
        alone."""
        if not (self.causal_routing and self.supports_cache):
            pytest.skip("routing is not causal or the cache is off (see the module docstring)")
        model = self.make_model()
        lengths = [4, SEQ]
        ids, padded, mask = self._left_padded(lengths)
        kwargs = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0)
        with torch.no_grad():
            batched = model.generate(padded, attention_mask=mask, **kwargs)
            for row, length in enumerate(lengths):
                alone = model.generate(ids[row : row + 1, :length], **kwargs)
                assert torch.equal(batched[row, SEQ:], alone[0, length:])
