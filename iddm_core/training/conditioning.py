"""What the UNet is conditioned on: CLIP hidden states for SD 1/2, :class:`SDXLConditioning` for SDXL.

Every UNet call (training, prior preservation, sampling, and PGD's in protection/pgd.py) takes its conditioning
through :func:`unet_conditioning`; for SDXL it is built by :func:`sdxl_conditioning` only (both encoders'
penultimate hidden states, the pooled text embedding, size/crop ids at the training resolution).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


def is_sdxl(bundle) -> bool:
    return getattr(bundle, "text_encoder_2", None) is not None


@dataclass(frozen=True)
class SDXLConditioning:
    """What the SDXL UNet is conditioned on, one row per prompt:

    - ``context`` ``[N, 77, D1 + D2]``: the penultimate hidden states of both text encoders, concatenated;
    - ``text_embeds`` ``[N, P]``: the pooled, projected embedding of ``text_encoder_2``;
    - ``time_ids`` ``[N, 6]``: original size (h, w), crop top-left (0, 0), target size (h, w), all the resolution.

    It answers the few tensor operations the SD1 code applies to its hidden-state tensor (``shape``, row indexing,
    ``expand`` of one row, ``to`` / ``float`` / ``detach`` / ``clone``), so that code takes either unchanged;
    :func:`unet_conditioning` turns either into the UNet's keyword arguments.
    """

    context: torch.Tensor
    text_embeds: torch.Tensor
    time_ids: torch.Tensor

    def _map(self, fn) -> "SDXLConditioning":
        return SDXLConditioning(fn(self.context), fn(self.text_embeds), fn(self.time_ids))

    @property
    def shape(self) -> torch.Size:
        return self.context.shape

    def __len__(self) -> int:
        return int(self.context.shape[0])

    def __getitem__(self, rows) -> "SDXLConditioning":
        return self._map(lambda t: t[rows])

    def expand(self, n: int, *_) -> "SDXLConditioning":
        """Rows repeated to ``n`` (a view, like ``Tensor.expand``); the other sizes stay."""
        return self._map(lambda t: t.expand(n, *t.shape[1:]))

    def to(self, *args, **kwargs) -> "SDXLConditioning":
        return self._map(lambda t: t.to(*args, **kwargs))

    def float(self) -> "SDXLConditioning":
        return self._map(lambda t: t.float())

    def detach(self) -> "SDXLConditioning":
        return self._map(lambda t: t.detach())

    def clone(self) -> "SDXLConditioning":
        return self._map(lambda t: t.clone())

    def unconditional(self) -> "SDXLConditioning":
        """The negative of classifier-free guidance for an empty negative prompt: zero text (context and pooled
        embedding), the same size conditioning (as StableDiffusionXLPipeline's force_zeros_for_empty_prompt)."""
        return SDXLConditioning(torch.zeros_like(self.context), torch.zeros_like(self.text_embeds), self.time_ids)


def sdxl_time_ids(resolution: int, n: int, device=None) -> torch.Tensor:
    """SDXL's micro-conditioning ``[n, 6]`` for square training images: original size = target size =
    ``resolution``, crop top-left (0, 0) (photos are resized whole, never cropped at random)."""
    r = float(resolution)
    return torch.tensor([[r, r, 0.0, 0.0, r, r]], device=device).expand(n, 6).clone()


def sdxl_conditioning(bundle, prompts: list[str], resolution: Optional[int] = None) -> SDXLConditioning:
    """The SDXL conditioning of ``prompts`` at ``resolution`` (default: the model's): both encoders' penultimate
    hidden states, text_encoder_2's pooled projection, and the size/crop ids. The only place it is built."""
    def encode(tokenizer, encoder):
        tok = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt")
        return encoder(tok.input_ids.to(bundle.device), output_hidden_states=True)

    out_1 = encode(bundle.tokenizer, bundle.text_encoder)
    out_2 = encode(bundle.tokenizer_2, bundle.text_encoder_2)
    context = torch.cat([out_1.hidden_states[-2], out_2.hidden_states[-2]], dim=-1)
    time_ids = sdxl_time_ids(resolution or bundle.resolution, len(prompts), bundle.device).to(context.dtype)
    return SDXLConditioning(context, out_2.text_embeds, time_ids)


def encode_prompts(bundle, prompts: list[str], resolution: Optional[int] = None):
    """CLIP hidden states ``[len(prompts), 77, D]`` (padded to the tokenizer's max length, as SD expects); for
    SDXL an :class:`SDXLConditioning` (``resolution``, default the model's, sets its size conditioning)."""
    if is_sdxl(bundle):
        return sdxl_conditioning(bundle, prompts, resolution)
    tok = bundle.tokenizer(prompts, padding="max_length", max_length=bundle.tokenizer.model_max_length,
                           truncation=True, return_tensors="pt")
    return bundle.text_encoder(tok.input_ids.to(bundle.device))[0]


def cat_conditioning(parts: list):
    """Rows of several conditionings (hidden-state tensors or :class:`SDXLConditioning`) in one."""
    if isinstance(parts[0], SDXLConditioning):
        return SDXLConditioning(*(torch.cat([getattr(p, f) for p in parts])
                                  for f in ("context", "text_embeds", "time_ids")))
    return torch.cat(parts)


def unet_conditioning(cond, dtype) -> dict:
    """Keyword arguments of ``bundle.unet(...)`` for a conditioning, cast to the UNet's ``dtype``: SD 1/2 get
    ``encoder_hidden_states``; SDXL also ``added_cond_kwargs`` (pooled text embedding and time ids)."""
    if isinstance(cond, SDXLConditioning):
        cond = cond.to(dtype)
        return {"encoder_hidden_states": cond.context,
                "added_cond_kwargs": {"text_embeds": cond.text_embeds, "time_ids": cond.time_ids}}
    return {"encoder_hidden_states": cond.to(dtype)}
