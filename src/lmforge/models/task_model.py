"""A task model is a backbone plus a head, by composition (nothing subclasses a backbone).

    hidden = backbone.encode(input_ids, attention_mask, token_type_ids)   # (B, T, d_model)
    out = head(hidden, batch)                                             # the task's own outputs

The state dict keeps the backbone under its base names (`embeddings.*`, `encoder.layer.*`,
`transformer.h.*`, ...) and the head under `head.*`, so a fine-tuned checkpoint still works as a base
for export, embed, attention and `--init_from`, and its head sits beside it.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

_BACKBONE = "backbone."


class TaskModel(nn.Module):
    """`backbone` (any lmforge model with `encode`) + `head` (an nn.Module taking (hidden, batch))."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self._register_state_dict_hook(_strip_backbone_prefix)
        self._register_load_state_dict_pre_hook(_add_backbone_prefix)

    @property
    def config(self) -> Any:
        return self.backbone.config

    def encode(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, T, d_model) hidden states of the batch's tokens."""
        return self.backbone.encode(batch["input_ids"], attention_mask=batch.get("attention_mask"),
                                    token_type_ids=batch.get("token_type_ids"))

    def forward(self, batch: dict[str, torch.Tensor]) -> Any:
        return self.head(self.encode(batch), batch)


def _strip_backbone_prefix(module, state_dict, prefix, local_metadata):
    for key in list(state_dict):
        if key.startswith(prefix + _BACKBONE):
            state_dict[prefix + key[len(prefix) + len(_BACKBONE):]] = state_dict.pop(key)
    return state_dict


def _add_backbone_prefix(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    for key in list(state_dict):
        rest = key[len(prefix):]
        if key.startswith(prefix) and not rest.startswith("head."):
            state_dict[prefix + _BACKBONE + rest] = state_dict.pop(key)
