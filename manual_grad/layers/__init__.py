"""One file per layer kind; each holds ``*_fwd``, ``*_bwd``, the registered op and its ``*_ref`` twin."""
from manual_grad.layers.attention import attention, attention_ref
from manual_grad.layers.cross_attention import cross_attention, cross_attention_ref
from manual_grad.layers.dropout import dropout, dropout_ref
from manual_grad.layers.embedding import embedding, embedding_ref
from manual_grad.layers.layernorm import layernorm, layernorm_ref
from manual_grad.layers.linear import linear, linear_ref
from manual_grad.layers.lora import lora_linear, lora_linear_ref
from manual_grad.layers.loss import logits, logits_loss, logits_loss_ref, logits_ref
from manual_grad.layers.mlp import gelu, gelu_ref, mlp, mlp_ref, relu, relu_ref

__all__ = ["attention", "attention_ref", "cross_attention", "cross_attention_ref",
           "dropout", "dropout_ref", "embedding", "embedding_ref", "layernorm", "layernorm_ref",
           "linear", "linear_ref", "lora_linear", "lora_linear_ref", "logits", "logits_ref",
           "logits_loss", "logits_loss_ref", "gelu", "gelu_ref", "mlp", "mlp_ref", "relu", "relu_ref"]
