"""Configuration of the hf_moe architecture: a Llama-style decoder whose MLPs are sparse Mixture-of-Experts blocks.

This file ships as Hub remote code next to `modeling_hf_moe.py`: it imports only torch, transformers and
huggingface_hub (a transformers dependency).
"""

from huggingface_hub.dataclasses import strict
from transformers.configuration_utils import PreTrainedConfig
from transformers.modeling_rope_utils import RopeParameters

# Keys of the router registry in `modeling_hf_moe.ROUTERS`; kept here too so a config can be validated
# without importing the modeling code.
ROUTER_TYPES = ("topk_softmax", "softmax_topk", "sigmoid_topk", "noisy_topk", "switch", "expert_choice")
ROUTER_BIAS_UPDATE_MODES = ("forward", "manual")
# Written into every saved config: all three Auto classes, not only the class that saved (vLLM's Transformers
# backend, for one, builds the base model with AutoModel from remote code).
AUTO_MAP = {
    "AutoConfig": "configuration_hf_moe.HfMoeConfig",
    "AutoModel": "modeling_hf_moe.HfMoeModel",
    "AutoModelForCausalLM": "modeling_hf_moe.HfMoeForCausalLM",
}


def _invalid(field: str, value, allowed: str) -> ValueError:
    return ValueError(f"HfMoeConfig: invalid `{field}`={value!r}; {allowed}.")


@strict
class HfMoeConfig(PreTrainedConfig):
    r"""Configuration of an [`HfMoeForCausalLM`] model.

    The decoder is Llama-style (RMSNorm, rotary embeddings, grouped-query attention) with the options needed to
    represent Llama, Mistral (sliding window), Qwen2 (q/k/v bias), Qwen3 (q/k RMSNorm) and GLM-4.5 (partial
    rotary) exactly. Each MLP is either dense (`intermediate_size`) or a sparse MoE block: a router chosen by
    `router_type`, `num_experts` SwiGLU experts of width `moe_intermediate_size`, and optional shared experts.

    Invalid combinations raise `ValueError` naming the field, the value and what is allowed.

    Example:
    ```python
    >>> import hf_moe
    >>> from transformers import AutoConfig, AutoModelForCausalLM
    >>> config = AutoConfig.for_model("hf_moe", num_experts=8, num_experts_per_tok=2, router_type="softmax_topk")
    >>> model = AutoModelForCausalLM.from_config(config)
    ```
    """

    model_type = "hf_moe"
    keys_to_ignore_at_inference = ["past_key_values"]
    attribute_map = {"num_local_experts": "num_experts", "n_routed_experts": "num_experts"}
    base_model_tp_plan = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise",
        "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.mlp.experts.gate_up_proj": "packed_colwise",
        "layers.*.mlp.experts.down_proj": "rowwise",
        "layers.*.mlp.gate_proj": "colwise",
        "layers.*.mlp.up_proj": "colwise",
        "layers.*.mlp.down_proj": "rowwise",
    }
    base_model_pp_plan = {
        "embed_tokens": (["input_ids"], ["inputs_embeds"]),
        "layers": (["hidden_states", "attention_mask"], ["hidden_states"]),
        "norm": (["hidden_states"], ["hidden_states"]),
    }

    # --- decoder -------------------------------------------------------------------------------------------
    vocab_size: int = 32000  # tokens in the vocabulary
    hidden_size: int = 1024  # width of the residual stream
    intermediate_size: int = 2816  # width of the dense SwiGLU MLP (layers that stay dense)
    num_hidden_layers: int = 16  # decoder layers
    num_attention_heads: int = 16  # query heads
    num_key_value_heads: int | None = None  # key/value heads (GQA); None = num_attention_heads
    head_dim: int | None = None  # per-head width; None = hidden_size // num_attention_heads
    hidden_act: str = "silu"  # activation of the SwiGLU gate
    max_position_embeddings: int = 4096  # longest sequence the rotary tables are built for
    initializer_range: float = 0.02  # std of the normal initialisation of linear layers
    rms_norm_eps: float = 1e-6  # RMSNorm epsilon
    use_cache: bool = True  # return a KV cache
    tie_word_embeddings: bool = False  # lm_head shares the input embedding (SmolLM2, Qwen small models)
    rope_parameters: RopeParameters | dict | None = None  # rope_theta, rope_type and scaling options
    attention_bias: bool = False  # bias on q/k/v projections (Qwen2, GLM-4.5)
    attention_output_bias: bool = False  # bias on the output projection (Llama with attention_bias=True)
    attention_dropout: float | int = 0.0  # dropout on attention probabilities (training only)
    use_qk_norm: bool = False  # RMSNorm on each query/key head before rotary (Qwen3, GLM-4.5 option)
    sliding_window: int | None = None  # sliding-window attention span (Mistral); None = full attention
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2

    # --- mixture of experts ---------------------------------------------------------------------------------
    num_experts: int = 8  # routed experts per MoE layer
    num_experts_per_tok: int = 2  # experts each token is routed to (top-k)
    moe_intermediate_size: int = 1408  # width of each routed expert
    norm_topk_prob: bool = True  # renormalise the top-k weights to sum to one (softmax_topk, sigmoid_topk)
    num_shared_experts: int = 0  # always-active experts, stored fused as one SwiGLU MLP
    shared_expert_intermediate_size: int | None = None  # None = num_shared_experts * moe_intermediate_size
    shared_expert_gate: bool = False  # sigmoid gate on the shared-expert output (Qwen2-MoE)
    mlp_only_layers: list[int] | None = None  # layer indices that keep a dense MLP
    first_k_dense_replace: int = 0  # the first k layers keep a dense MLP (DeepSeek / GLM-4.5)
    decoder_sparse_step: int = 1  # every n-th layer is MoE (Qwen2-MoE); 1 = every layer
    router_type: str = "softmax_topk"  # key of the router registry, see ROUTER_TYPES
    capacity_factor: float | None = None  # per-expert capacity = factor * tokens * k / experts; None = dropless
    router_jitter_noise: float = 0.0  # multiplicative input jitter in training (Switch / Mixtral)
    n_group: int = 1  # expert groups for group-limited routing (sigmoid_topk)
    topk_group: int = 1  # groups each token may pick experts from (sigmoid_topk)
    routed_scaling_factor: float = 1.0  # scale applied to the routed output weights (sigmoid_topk)
    router_bias_update_rate: float = 0.0  # aux-loss-free balancing step size (sigmoid_topk); 0 = off
    router_bias_update: str = "forward"  # when the bias moves: after each training forward, or "manual"
    router_aux_loss_coef: float = 0.001  # weight of the load-balancing loss in the LM loss
    router_z_loss_coef: float = 0.0  # weight of the router z-loss in the LM loss (ST-MoE)
    output_router_logits: bool = False  # return router logits and add the router losses to the loss

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None and self.num_attention_heads > 0:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.mlp_only_layers is None:
            self.mlp_only_layers = []
        if self.shared_expert_intermediate_size is None:
            self.shared_expert_intermediate_size = self.num_shared_experts * self.moe_intermediate_size
        self._check_moe()
        super().__post_init__(**kwargs)

    # Checked in `__post_init__` rather than in a `validate_*` hook so the error is a plain `ValueError`.
    def _check_moe(self) -> None:
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "head_dim"):
            if getattr(self, name) <= 0:
                raise _invalid(name, getattr(self, name), "must be a positive integer")
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise _invalid(
                "num_key_value_heads",
                self.num_key_value_heads,
                f"must divide num_attention_heads={self.num_attention_heads}",
            )
        if self.router_type not in ROUTER_TYPES:
            raise _invalid("router_type", self.router_type, f"allowed: {', '.join(ROUTER_TYPES)}")
        if self.num_experts < 1:
            raise _invalid("num_experts", self.num_experts, "must be >= 1")
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise _invalid(
                "num_experts_per_tok", self.num_experts_per_tok, f"must be in [1, num_experts={self.num_experts}]"
            )
        if self.moe_intermediate_size < 1:
            raise _invalid("moe_intermediate_size", self.moe_intermediate_size, "must be >= 1")
        if self.num_shared_experts < 0:
            raise _invalid("num_shared_experts", self.num_shared_experts, "must be >= 0")
        if self.num_shared_experts > 0 and self.shared_expert_intermediate_size < 1:
            raise _invalid(
                "shared_expert_intermediate_size", self.shared_expert_intermediate_size, "must be >= 1"
            )
        if self.shared_expert_gate and self.num_shared_experts == 0:
            raise _invalid("shared_expert_gate", True, "needs num_shared_experts >= 1")
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise _invalid("capacity_factor", self.capacity_factor, "must be > 0, or None for dropless routing")
        if self.capacity_factor is not None and self.router_type not in ("switch", "expert_choice"):
            raise _invalid(
                "capacity_factor",
                self.capacity_factor,
                f"token dropping is implemented by router_type 'switch' and 'expert_choice', not "
                f"{self.router_type!r}; use None (dropless)",
            )
        if self.router_type == "switch" and self.num_experts_per_tok != 1:
            raise _invalid("num_experts_per_tok", self.num_experts_per_tok, "router_type='switch' routes top-1: use 1")
        if self.router_type == "expert_choice" and self.use_cache:
            raise _invalid(
                "use_cache",
                True,
                "router_type='expert_choice' lets each expert pick tokens among all tokens of the forward pass, "
                "so cached one-token decoding would route differently from the full sequence; set use_cache=False "
                "(generate then recomputes the whole sequence) or use a token-choice router",
            )
        if self.router_jitter_noise < 0:
            raise _invalid("router_jitter_noise", self.router_jitter_noise, "must be >= 0")
        if self.n_group < 1 or self.num_experts % self.n_group != 0:
            raise _invalid("n_group", self.n_group, f"must be >= 1 and divide num_experts={self.num_experts}")
        if not 1 <= self.topk_group <= self.n_group:
            raise _invalid("topk_group", self.topk_group, f"must be in [1, n_group={self.n_group}]")
        if self.n_group > 1:
            if self.router_type != "sigmoid_topk":
                raise _invalid("n_group", self.n_group, "group-limited routing needs router_type='sigmoid_topk'")
            per_group = self.num_experts // self.n_group
            if per_group < 2 or self.topk_group * per_group < self.num_experts_per_tok:
                raise _invalid(
                    "topk_group",
                    self.topk_group,
                    f"the {self.topk_group} selected groups of {per_group} experts (need >= 2 per group) must "
                    f"hold num_experts_per_tok={self.num_experts_per_tok} experts",
                )
        if self.router_bias_update_rate < 0:
            raise _invalid("router_bias_update_rate", self.router_bias_update_rate, "must be >= 0")
        if self.router_bias_update_rate > 0 and self.router_type != "sigmoid_topk":
            raise _invalid(
                "router_bias_update_rate", self.router_bias_update_rate, "aux-loss-free balancing needs 'sigmoid_topk'"
            )
        if self.router_bias_update not in ROUTER_BIAS_UPDATE_MODES:
            raise _invalid("router_bias_update", self.router_bias_update, f"allowed: {ROUTER_BIAS_UPDATE_MODES}")
        if self.routed_scaling_factor <= 0:
            raise _invalid("routed_scaling_factor", self.routed_scaling_factor, "must be > 0")
        for name in ("router_aux_loss_coef", "router_z_loss_coef"):
            if getattr(self, name) < 0:
                raise _invalid(name, getattr(self, name), "must be >= 0")
        bad = [i for i in self.mlp_only_layers if not 0 <= i < self.num_hidden_layers]
        if bad:
            raise _invalid("mlp_only_layers", bad, f"layer indices must be in [0, {self.num_hidden_layers})")
        if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
            raise _invalid(
                "first_k_dense_replace", self.first_k_dense_replace, f"must be in [0, {self.num_hidden_layers}]"
            )
        if self.decoder_sparse_step < 1:
            raise _invalid("decoder_sparse_step", self.decoder_sparse_step, "must be >= 1")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise _invalid("sliding_window", self.sliding_window, "must be >= 1 or None")

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs) -> None:
        if self._auto_class is not None:  # registered by `import hf_moe`: the checkpoint carries its code
            self.auto_map = {**(getattr(self, "auto_map", None) or {}), **AUTO_MAP}
        super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Whether decoder layer `layer_idx` holds a sparse MoE block (else a dense MLP)."""
        return (
            layer_idx not in self.mlp_only_layers
            and layer_idx >= self.first_k_dense_replace
            and (layer_idx + 1) % self.decoder_sparse_step == 0
        )

    @property
    def moe_layers(self) -> list[int]:
        """Indices of the layers that hold a sparse MoE block."""
        return [i for i in range(self.num_hidden_layers) if self.is_moe_layer(i)]


__all__ = ["HfMoeConfig"]
