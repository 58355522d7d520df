"""Tiny, randomly initialised diffusers pipelines built from configs in code (no hub).

    >>> from pipelines.tiny import build_tiny
    >>> pipe = build_tiny("pixart")
    >>> image = pipe("a red circle", **pipe.tiny_call_kwargs).images[0]

They exist to exercise the plumbing (hooks, step tracking, the benchmark harness) offline. Their
weights are random, so any quality number measured on them means nothing; quality claims come from
the trained reference models.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

ARCHITECTURES = ("pixart", "flux", "sd3", "wan", "cogvideox", "hunyuan")

_WORDS = (
    "a an the of and with on in left right above below small large big tiny red green blue yellow "
    "purple orange white black circle square triangle star cat dog photo painting moving video "
    "fast slow up down"
).split()


def word_tokenizer(max_length: int = 16) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over a small fixed vocabulary; unknown words map to <unk>."""
    vocab = {"<pad>": 0, "<unk>": 1, "</s>": 2, "<s>": 3}
    for word in _WORDS:
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        eos_token="</s>",
        bos_token="<s>",
        model_max_length=max_length,
    )


def _eval(pipe):
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval().requires_grad_(False)
    return pipe


def _t5(d_model=16, layers=1, cls=None):
    from transformers import T5Config, T5EncoderModel

    cls = cls or T5EncoderModel
    cfg = T5Config(
        vocab_size=64, d_model=d_model, d_kv=8, d_ff=32, num_layers=layers, num_heads=2,
        relative_attention_num_buckets=8, dropout_rate=0.0,
    )
    return cls(cfg)


def _clip(hidden=16, projection=False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(
        vocab_size=64, hidden_size=hidden, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=77, projection_dim=hidden,
        bos_token_id=3, eos_token_id=2, pad_token_id=0,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)


def _vae2d(latent_channels=4, blocks=(8, 8), shift_factor=None):
    from diffusers import AutoencoderKL

    return AutoencoderKL(shift_factor=shift_factor,
        block_out_channels=blocks, latent_channels=latent_channels, norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * len(blocks),
        up_block_types=("UpDecoderBlock2D",) * len(blocks), layers_per_block=1,
    )


def build_pixart(num_layers: int = 2, heads: int = 2, head_dim: int = 8, sample_size: int = 8,
                 patch_size: int = 2, seed: int = 0):
    from diffusers import DDIMScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel

    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(
        num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4, out_channels=8,
        num_layers=num_layers, cross_attention_dim=heads * head_dim, sample_size=sample_size,
        patch_size=patch_size, caption_channels=16, norm_num_groups=1,
    )
    pipe = PixArtAlphaPipeline(
        tokenizer=word_tokenizer(), text_encoder=_t5(), vae=_vae2d(),
        transformer=transformer, scheduler=DDIMScheduler(clip_sample=False),
    )
    vae_scale = pipe.vae_scale_factor
    pipe.tiny_call_kwargs = dict(
        height=sample_size * vae_scale, width=sample_size * vae_scale, num_inference_steps=4,
        use_resolution_binning=False, max_sequence_length=16, clean_caption=False, output_type="pt",
    )
    return _eval(pipe)


def build_flux(seed: int = 0):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=16,
        axes_dims_rope=(2, 2, 4),
    )
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae2d(shift_factor=0.0),
        text_encoder=_clip(), tokenizer=word_tokenizer(77), text_encoder_2=_t5(),
        tokenizer_2=word_tokenizer(16), transformer=transformer,
    )
    pipe.tiny_call_kwargs = dict(
        height=32, width=32, num_inference_steps=4, max_sequence_length=16, output_type="pt",
        guidance_scale=1.0,
    )
    return _eval(pipe)


def build_sd3(seed: int = 0):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
        pooled_projection_dim=32, out_channels=4, pos_embed_max_size=16,
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae2d(shift_factor=0.0),
        text_encoder=_clip(projection=True), tokenizer=word_tokenizer(77),
        text_encoder_2=_clip(projection=True), tokenizer_2=word_tokenizer(77),
        text_encoder_3=None, tokenizer_3=None,
    )
    pipe.tiny_call_kwargs = dict(height=16, width=16, num_inference_steps=4, output_type="pt",
                                 max_sequence_length=16)
    return _eval(pipe)


def build_wan(seed: int = 0):
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5EncoderModel

    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4,
        out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32,
    )
    vae = AutoencoderKLWan(base_dim=4, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True],
                           latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    pipe = WanPipeline(
        tokenizer=word_tokenizer(16), text_encoder=_t5(cls=UMT5EncoderModel), vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), transformer=transformer,
    )
    pipe.tiny_call_kwargs = dict(height=16, width=16, num_frames=5, num_inference_steps=4,
                                 max_sequence_length=16, output_type="pt", guidance_scale=5.0)
    return _eval(pipe)


def build_cogvideox(seed: int = 0):
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel

    torch.manual_seed(seed)
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=16, num_layers=2, sample_width=4, sample_height=4, sample_frames=9,
        patch_size=2, temporal_compression_ratio=4, max_text_seq_length=16,
    )
    vae = AutoencoderKLCogVideoX(
        block_out_channels=(8, 8, 8, 8), latent_channels=4, layers_per_block=1, norm_num_groups=2,
        temporal_compression_ratio=4,
    )
    pipe = CogVideoXPipeline(
        tokenizer=word_tokenizer(16), text_encoder=_t5(), vae=vae, transformer=transformer,
        scheduler=CogVideoXDDIMScheduler(clip_sample=False, timestep_spacing="trailing"),
    )
    pipe.tiny_call_kwargs = dict(height=16, width=16, num_frames=9, num_inference_steps=4,
                                 max_sequence_length=16, output_type="pt", guidance_scale=6.0)
    return _eval(pipe)


def build_hunyuan(seed: int = 0):
    from diffusers import (
        AutoencoderKLHunyuanVideo,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideoPipeline,
        HunyuanVideoTransformer3DModel,
    )
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(seed)
    transformer = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
        num_single_layers=2, num_refiner_layers=1, patch_size=1, patch_size_t=1, text_embed_dim=16,
        pooled_projection_dim=16, rope_axes_dim=(2, 2, 4),
    )
    vae = AutoencoderKLHunyuanVideo(
        latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4,
        down_block_types=("HunyuanVideoDownBlock3D",) * 4, up_block_types=("HunyuanVideoUpBlock3D",) * 4,
        spatial_compression_ratio=8, temporal_compression_ratio=4, mid_block_add_attention=False,
    )
    llama = LlamaModel(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512))
    pipe = HunyuanVideoPipeline(
        text_encoder=llama, tokenizer=word_tokenizer(512), transformer=transformer, vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=_clip(),
        tokenizer_2=word_tokenizer(77),
    )
    pipe.tiny_call_kwargs = dict(height=16, width=16, num_frames=5, num_inference_steps=4,
                                 max_sequence_length=16, output_type="pt",
                                 prompt_template={"template": "{}", "crop_start": 0})
    return _eval(pipe)


_BUILDERS = {
    "pixart": build_pixart, "flux": build_flux, "sd3": build_sd3, "wan": build_wan,
    "cogvideox": build_cogvideox, "hunyuan": build_hunyuan,
}


def build_tiny(arch: str, **kwargs):
    """Build the tiny pipeline for ``arch`` (one of :data:`ARCHITECTURES`), in eval mode, fp32, CPU."""
    if arch not in _BUILDERS:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    return _BUILDERS[arch](**kwargs)
